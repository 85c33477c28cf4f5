"""Train a config: python train.py --config configs/X.py [--workdir DIR] [--config.a.b=value ...]

Workdir default: runs/<config.workdir_name>. Without --config, an existing WORKDIR/config.json (the
run's own config) is used, so `python train.py --workdir DIR` resumes DIR as it was started. A run resumes from WORKDIR/checkpoints/latest when it
exists (rerun the same command after a crash or preemption). SIGTERM / Ctrl-C save `latest` at the next
step and exit with 0 / 130; a second Ctrl-C exits at once. One run per workdir (WORKDIR/.lock). Examples:
  python train.py --config configs/demo.py
  python train.py --config configs/exp1.py --config.model.sd_path=/models/sd-v1-4 \
      --config.model.beats_path=/models/beats --config.data.data_dir=/data/tfds
"""

from mtok_jax import environment  # first: sets USE_TF=0 before transformers loads

environment.without_torch_in_transformers()

import logging
import sys

from mtok_jax import cli, config_utils, sharding, signals, train

_CONFIG, _WORKDIR = cli.define_run_flags()
_DISTRIBUTED = cli.define_distributed_flags()


def main():
    config = config_utils.validate(_CONFIG.value)
    cli.setup_logging()
    workdir = _WORKDIR.value or cli.default_workdir(config)
    sharding.initialize_distributed(config, **{name: holder.value for name, holder in _DISTRIBUTED.items()})
    logging.getLogger("mtok_jax").info("config: %s", cli.config_source())
    result = train.train_and_evaluate(config, workdir)
    if result["interrupted"]:
        sys.exit(signals.EXIT_CODES[result["interrupted"]])
    logging.getLogger("mtok_jax").info("done: step %d, epoch %d, best validation loss %.5f → %s",
                                       result["step"], result["epoch"], result["best_val_loss"], workdir)


if __name__ == "__main__":
    cli.run_absl(main)
