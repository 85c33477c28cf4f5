"""Train a config: python train.py --config configs/X.py [--workdir DIR] [--config.a.b=value ...]

Workdir default: runs/<config.workdir_name>. Without --config, an existing WORKDIR/config.json (the
run's own config) is used, so `python train.py --workdir DIR` resumes DIR as it was started. A run resumes from WORKDIR/checkpoints/latest when it
exists (rerun the same command after a crash or preemption). SIGTERM / Ctrl-C save `latest` at the next
step and exit with 0 / 130; a second Ctrl-C exits at once. One run per workdir (WORKDIR/.lock). Examples:
  python train.py --config configs/demo.py
  python train.py --config configs/exp1.py --config.model.sd_path=/models/sd-v1-4 \
      --config.model.beats_path=/models/beats --config.data.data_dir=/data/tfds
"""

import mtok_jax  # noqa: F401  (first: sets USE_TF=0 before transformers loads)

import logging
import os
import sys

from absl import app, flags

from mtok_jax import _compat, cli, config_utils

_CONFIG = cli.define_config_file("config", "configs/demo.py", "Config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config.workdir_name>).")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    config = config_utils.validate(_CONFIG.value)  # first: a bad value fails in a second, not after imports
    _compat.quiet_third_party_loggers()
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes at INFO
    logging.getLogger("mtok_jax").setLevel(logging.INFO)
    from mtok_jax import signals, train

    workdir = _WORKDIR.value or os.path.join("runs", config.workdir_name)
    logging.getLogger("mtok_jax").info("config: %s", cli.config_source())
    result = train.train_and_evaluate(config, workdir)
    if result["interrupted"]:
        sys.exit(signals.EXIT_CODES[result["interrupted"]])
    logging.getLogger("mtok_jax").info("done: step %d, epoch %d, best validation loss %.5f → %s",
                                       result["step"], result["epoch"], result["best_val_loss"], workdir)


if __name__ == "__main__":
    cli.run_absl(main)
