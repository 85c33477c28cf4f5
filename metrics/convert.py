"""Convert the official metric-model checkpoints into params_io folders (params.safetensors + config.json).

  python -m metrics.convert inception pt_inception-2015-12-05-6726825d.pth OUT_DIR
  python -m metrics.convert wav2clip Wav2CLIP.pt OUT_DIR

CLIP needs no conversion: ``metrics.clip_image.load_clip_image`` reads a Hugging Face CLIP folder
(e.g. a local copy of openai/clip-vit-base-patch32: config.json, preprocessor_config.json and
flax_model.msgpack or model.safetensors) directly. torch (the ``torch`` extra) is needed to read .pth/.pt;
a file holding non-tensor objects is refused unless ``--trusted`` is given (as in ``mtok_jax.convert``).
"""

from __future__ import annotations

import argparse
from typing import Sequence

import mtok_jax  # noqa: F401  (environment setup first)
from mtok_jax import cli
from mtok_jax.convert import add_trusted_flag


def _count(directory: str) -> int:
    from mtok_jax.params_io import load_params

    params, _ = load_params(directory)
    import jax

    return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def _cmd_inception(args: argparse.Namespace) -> None:
    from metrics.inception import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out_dir, trusted=args.trusted)
    print(f"Inception-V3 (FID) → {out}: {_count(out):,} parameters")


def _cmd_wav2clip(args: argparse.Namespace) -> None:
    from metrics.wav2clip import convert_checkpoint

    out = convert_checkpoint(args.checkpoint, args.out_dir, trusted=args.trusted)
    print(f"Wav2CLIP audio encoder → {out}: {_count(out):,} values")


def main(argv: Sequence[str] | None = None) -> None:
    parser = cli.ArgumentParser(
        prog="python -m metrics.convert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="model", required=True)
    p = sub.add_parser("inception", help="pytorch-fid's FID Inception weights (pt_inception-2015-12-05-*.pth)")
    p.add_argument("checkpoint", type=cli.existing_file)
    p.add_argument("out_dir")
    add_trusted_flag(p)
    p.set_defaults(func=_cmd_inception)
    p = sub.add_parser("wav2clip", help="official Wav2CLIP.pt (audio_encoder.*, audio_transform.*)")
    p.add_argument("checkpoint", type=cli.existing_file)
    p.add_argument("out_dir")
    add_trusted_flag(p)
    p.set_defaults(func=_cmd_wav2clip)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    cli.run(main)
