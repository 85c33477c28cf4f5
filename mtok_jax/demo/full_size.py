"""Random weights at the released shapes, in the real formats, plus a small full-length dataset: what
benchmarks and memory measurements run on when the pretrained weights are not at hand.

  python -m mtok_jax.demo.full_size [--root ROOT] [--image_size 256] [--clips_per_label 3]

writes (once; ROOT default full_size_assets/):
  ROOT/sd/     SD v1.4's architectures (UNet 860 M, VAE 84 M, CLIP ViT-L/14 text 123 M; diffusers /
               transformers Flax ``save_pretrained``), random weights (demo.models.random_params), the demo
               BPE tokenizer (its ids lie inside CLIP's 49,408-entry vocabulary), SD v1.4's scheduler config
  ROOT/beats/  BEATs iter3+ AS2M's architecture (90 M, beats.init_params), params_io folder
  ROOT/data/   the 18 demo labels as 30 s clips and IMAGE_SIZE px images (the real TFDS builder), builder
               config ``full<IMAGE_SIZE>``: 3 train / 1 validation / 1 test clips per label at the default
Nothing here is trained: the images such a model draws are noise. Then, e.g. (exp2 at 256 px, batch 1):
  python train.py --config configs/exp2.py --config.model.sd_path=ROOT/sd --config.model.beats_path=ROOT/beats \\
      --config.data.data_dir=ROOT/data --config.data.builder_config=full256 --config.data.image_size=256 \\
      --config.train.batch_size=1 --config.train.max_steps=2
"""

from __future__ import annotations

import json
import os
from typing import Sequence

from absl import flags

from mtok_jax import cli
from mtok_jax.data.music_image import build, make_config
from mtok_jax.demo import models as demo_models
from mtok_jax.demo.data import write_demo_sources
from mtok_jax.models import beats


def builder_config_name(image_size: int) -> str:
    return f"full{int(image_size)}"


def write_full_size_assets(root: str = "full_size_assets", *, image_size: int = 256, clips_per_label: int = 3,
                           seed: int = 0) -> dict[str, str]:
    """ROOT/sd, ROOT/beats and ROOT/data (each skipped when already complete; written into a temporary
    sibling and renamed) → {'sd', 'beats', 'data', 'builder_config'}."""
    beats_cfg = beats.BEATS_ITER3_PLUS_AS2M_CFG
    paths = demo_models.write_parts(root, {
        "sd": (lambda d: demo_models.write_full_size_sd(d, seed), demo_models.SD_FILES),
        "beats": (lambda d: beats.save_beats(d, beats_cfg, beats.init_params(beats_cfg, seed)),
                  demo_models.BEATS_FILES)})
    paths["data"] = os.path.join(root, "data")
    name = builder_config_name(image_size)
    if not 1 <= clips_per_label <= 8:
        raise ValueError(f"clips_per_label={clips_per_label}: 1 … 8 (with 1 validation and 1 test clip per label)")
    per_label = {"train": clips_per_label, "validation": 1, "test": 1}  # the builder's 80/10/10 split
    manual = write_demo_sources(os.path.join(root, "manual"), per_label=per_label, clip_seconds=30.0, seed=seed)
    build(manual, paths["data"], make_config("folders", clip_seconds=30.0, image_size=image_size, name=name),
          workers=0, progress=True)
    return {**paths, "builder_config": name}


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_string("root", "full_size_assets", "output folder", flag_values=fv)
    flags.DEFINE_integer("image_size", 256, "image side in pixels", lower_bound=64, flag_values=fv)
    flags.DEFINE_integer("clips_per_label", 3, "training clips per label (1 … 8)", lower_bound=1, upper_bound=8,
                         flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
    fv, _ = cli.parse_command("python -m mtok_jax.demo.full_size", __doc__, _define, argv)
    print(json.dumps(write_full_size_assets(fv.root, image_size=fv.image_size, clips_per_label=fv.clips_per_label)))


if __name__ == "__main__":
    cli.run(main)
