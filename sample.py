"""Generate images from music with a trained run.

  python sample.py --workdir DIR --audio FILE_OR_DIR \
      [--config configs/X.py --num_images 4 --steps 50 --guidance 7.5 --scheduler pndm|ddim|dpm|euler --seed S --out DIR \
       --checkpoint best|latest|STEP|none --per_label K --prompt 'a painting of <*>' --negative_prompt TEXT
       --start SECONDS] [--config.a.b=value ...]
  python sample.py --model DIR --audio FILE_OR_DIR [...]    # a folder written by python -m mtok_jax.export

The config is the run's own `DIR/config.json` (written by train.py; `--config FILE` instead), with
`--config.a.b=value` overrides on top. `--checkpoint` default: `best`, else `latest` (logged). Defaults
work after `make demo`: configs/demo.py, runs/demo, the held-out (test split) demo audio of
demo_assets/manual, settings from `config.sample`, output WORKDIR/samples/ (one PNG per image,
grid.png, samples.jsonl with audio path, label, seed and every setting). Undecodable audio files are
skipped (`path: reason` on the log, listed in skipped.jsonl); the exit status is 0 when at least one
image was made, 2 (with one line) when none.
"""

from mtok_jax import environment  # first: sets USE_TF=0 before transformers loads

environment.without_torch_in_transformers()

import logging
import os
import sys

from absl import flags

from mtok_jax import checkpoints, cli, config_utils, export, sample, sharding
from mtok_jax.constants import SAMPLERS

_CONFIG, _WORKDIR = cli.define_run_flags()
_DISTRIBUTED = cli.define_distributed_flags()
_AUDIO = flags.DEFINE_string("audio", None, "Audio file or folder (default: the dataset's held-out test audio "
                                            "in <data_dir>/../manual).")
_NUM_IMAGES = flags.DEFINE_integer("num_images", None, "Images per audio (default: config.sample.num_images).")
_STEPS = flags.DEFINE_integer("steps", None, "Denoising steps (default: config.sample.steps).")
_GUIDANCE = flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: config.sample.guidance).")
_SCHEDULER = flags.DEFINE_enum("scheduler", None, list(SAMPLERS),
                               "Sampler (default: config.sample.scheduler).")
_SEED = flags.DEFINE_integer("seed", None, "Seed of the first audio file; file i uses seed + i "
                                           "(default: config.sample.seed).")
_OUT = flags.DEFINE_string("out", None, "Output folder (default: WORKDIR/samples).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, cli.CHECKPOINT_HELP)
_MODEL = flags.DEFINE_string("model", None, "Exported model folder (python -m mtok_jax.export): its config.json and "
                                            "weights, no workdir or checkpoint (output default: DIR/samples).")
_PER_LABEL = flags.DEFINE_integer("per_label", 0, "With the default audio: files per label (0 = all).")
_SAME_SEED = flags.DEFINE_bool("same_seed", False, "Use --seed for every audio file (images differ by audio only).")
_PROMPT = flags.DEFINE_string("prompt", None, "Prompt template with exactly one <*> (the audio token) "
                                              "(default: config.prompt.inference).")
_NEGATIVE = flags.DEFINE_string("negative_prompt", "", "Negative prompt: the unconditional branch of guidance "
                                                       "(default: empty).")
_START = flags.DEFINE_float("start", 0.0, "Seconds into each audio file where its clip starts "
                                          "(which config.data.clip_seconds window is used).", lower_bound=0.0)
_BATCH = flags.DEFINE_integer("batch", 8, "Images dispatched per host round trip (each jitted call makes one image "
                                         "per device; the images do not depend on this).")


def main():
    config = config_utils.validate(_CONFIG.value)
    cli.setup_logging()
    # Input errors first, before minutes of model loading.
    if _MODEL.value:  # an exported model folder: its config and weights, no workdir or checkpoint
        config = export.load_model_config(_MODEL.value, [a for a in sys.argv[1:] if a.startswith("--config.")])
        workdir, checkpoint = _MODEL.value, None
    else:
        workdir = _WORKDIR.value or cli.default_workdir(config)
        checkpoint = checkpoints.select(workdir, _CHECKPOINT.value)
    sharding.initialize_distributed(config, **{name: holder.value for name, holder in _DISTRIBUTED.items()})
    s = config.sample
    if _PROMPT.value is not None:
        sample.check_prompt(_PROMPT.value, config.prompt.placeholder)
    audio = sample.find_audio(_AUDIO.value) if _AUDIO.value else None
    manual = None if audio else sample.manual_dir(config)  # (checked before the models load)
    logging.getLogger("mtok_jax").info("config: %s", cli.config_source())
    pipe = sample.load_pipeline(config, workdir, checkpoint, max_batch=_BATCH.value)
    if audio is None:
        audio = sample.held_out_audio(manual, pipe.system.labels, _PER_LABEL.value)
    out = _OUT.value or os.path.join(workdir, "samples")
    records, skipped = sample.sample_files(
        pipe, audio, out, num_images=_NUM_IMAGES.value if _NUM_IMAGES.value is not None else s.num_images,
        steps=_STEPS.value if _STEPS.value is not None else s.steps,
        guidance=_GUIDANCE.value if _GUIDANCE.value is not None else s.guidance,
        scheduler=_SCHEDULER.value or s.scheduler,
        seed=_SEED.value if _SEED.value is not None else s.seed, same_seed=_SAME_SEED.value,
        prompt=_PROMPT.value, negative_prompt=_NEGATIVE.value, start=_START.value)
    note = f"; {len(skipped)} of {len(audio)} audio files skipped (skipped.jsonl)" if skipped else ""
    print(f"wrote {len(records)} images to {out}/ (grid.png, samples.jsonl){note}")


if __name__ == "__main__":
    cli.run_absl(main)
