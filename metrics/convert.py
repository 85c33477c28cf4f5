"""Convert the official metric-model checkpoints into params_io folders (params.safetensors + config.json).

  python -m metrics.convert inception pt_inception-2015-12-05-6726825d.pth OUT_DIR
  python -m metrics.convert wav2clip Wav2CLIP.pt OUT_DIR

CLIP needs no conversion: ``metrics.clip_image.load_clip_image`` reads a Hugging Face CLIP folder
(e.g. a local copy of openai/clip-vit-base-patch32: config.json, preprocessor_config.json and
flax_model.msgpack or model.safetensors) directly. torch (the ``torch`` extra) is needed to read .pth/.pt;
a file holding non-tensor objects is refused unless ``--trusted`` is given (as in ``mtok_jax.convert``).
"""

from __future__ import annotations

from typing import Sequence

import mtok_jax  # noqa: F401  (environment setup first)

import jax
from absl import flags

from metrics import inception, wav2clip
from mtok_jax import cli
from mtok_jax.convert import TRUSTED_HELP
from mtok_jax.params_io import load_params

COMMANDS = {"inception": ("pytorch-fid's FID Inception weights (pt_inception-2015-12-05-*.pth)",
                          inception.convert_checkpoint, "Inception-V3 (FID) → {out}: {n:,} parameters"),
            "wav2clip": ("official Wav2CLIP.pt (audio_encoder.*, audio_transform.*)", wav2clip.convert_checkpoint,
                         "Wav2CLIP audio encoder → {out}: {n:,} values")}


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_bool("trusted", False, TRUSTED_HELP, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
    prog = "python -m metrics.convert"
    fv, (model, checkpoint, out_dir) = cli.parse_command(
        prog, __doc__, _define, argv, args=("CHECKPOINT", "OUT_DIR"), commands={k: c[0] for k, c in COMMANDS.items()})
    _, convert, done = COMMANDS[model]
    out = convert(cli.existing_file("checkpoint", checkpoint), out_dir, trusted=fv.trusted)
    params, _ = load_params(out)
    print(done.format(out=out, n=sum(int(x.size) for x in jax.tree.leaves(params))))


if __name__ == "__main__":
    cli.run(main)
