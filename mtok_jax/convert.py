"""Convert reference PyTorch checkpoints into params_io folders (params.safetensors + config.json).

  python -m mtok_jax.convert beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt OUT_DIR
  python -m mtok_jax.convert embedder learned_embeds.bin OUT_DIR
  python -m mtok_jax.convert embedder model_<timestamp>_<epoch> OUT_DIR [--beats_from DIR] [--sd_path DIR]

Files are read with ``torch.load(weights_only=True)``; one holding other objects than tensors (e.g. a
pickled ``argparse.Namespace``) is refused unless ``--trusted`` is given, since full unpickling can
run code from the file. torch (the optional ``torch`` extra) is imported only inside the subcommands.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import warnings
from typing import Any, Sequence

import mtok_jax  # noqa: F401  (environment setup first)
from mtok_jax import cli, pt_checkpoint


def _to_numpy(state_dict: Any) -> dict[str, Any]:
    return {k: (v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy())
            for k, v in state_dict.items()}


def convert_beats(checkpoint: str, out_dir: str, *, trusted: bool = False) -> dict[str, Any]:
    """Official BEATs ``.pt`` (dict with ``cfg`` and ``model``) → params_io folder. Returns the cfg.

    ``trusted``: allow full unpickling (:func:`mtok_jax.pt_checkpoint.load`). The folder's config.json
    also records the source file name and whether ``predictor.*`` (the AudioSet fine-tuning head,
    present in the ``…finetuned_on_AS2M_cpt2.pt`` AudioToken uses) was there."""
    from mtok_jax.models import beats

    ckpt = pt_checkpoint.load(checkpoint, trusted=trusted)
    if not isinstance(ckpt, dict) or "cfg" not in ckpt or "model" not in ckpt:
        keys = list(ckpt)[:8] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise SystemExit(f"{checkpoint}: expected the official BEATs layout {{'cfg': ..., 'model': ...}}, got {keys}")
    cfg = beats.beats_config(ckpt["cfg"])
    params = beats.params_from_torch(_to_numpy(ckpt["model"]), cfg)
    finetuned = any(k.startswith("predictor.") for k in ckpt["model"])
    beats.save_beats(out_dir, cfg, params, source_checkpoint=os.path.basename(checkpoint), finetuned_head=finetuned)
    if not finetuned:
        print(f"warning: {checkpoint} has no fine-tuning head (predictor.*): it is not {beats.FINETUNED_CHECKPOINT}, "
              f"the AudioSet-fine-tuned checkpoint AudioToken and the thesis use", file=sys.stderr)
    return cfg


def _count(tree: Any) -> int:
    import jax
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _cmd_beats(args: argparse.Namespace) -> None:
    cfg = convert_beats(args.checkpoint, args.out_dir, trusted=args.trusted)
    from mtok_jax.models.beats import load_beats
    with warnings.catch_warnings():  # the provenance warning was printed above
        warnings.simplefilter("ignore")
        _, params = load_beats(args.out_dir)
    print(f"BEATs: {cfg['encoder_layers']} layers × {cfg['encoder_embed_dim']} channels, "
          f"{_count(params):,} parameters → {args.out_dir}")


def convert_wrapper_parts(state_dict: dict[str, Any], source: str, out_dir: str, *, beats_from: str | None = None,
                          sd_path: str | None = None) -> dict[str, str]:
    """The trained BEATs and UNet of a thesis wrapper state dict (exp2) → folders the configs load.

    ``aud_encoder.*`` → ``OUT_DIR/beats`` (params_io, cfg and provenance from the converted BEATs folder
    ``beats_from``); ``unet.*`` → ``OUT_DIR/sd``: an SD folder whose ``unet/`` holds these weights as
    ``diffusion_pytorch_model.safetensors`` with ``sd_path``'s UNet config, every other entry linked to
    ``sd_path``. → {part: folder written}."""
    import numpy as np
    from safetensors.numpy import save_file

    from mtok_jax.models import beats
    from mtok_jax.models.embedder import WRAPPER_PARTS, wrapper_part
    from mtok_jax.params_io import load_params

    written = {}
    part = {p: wrapper_part(state_dict, p) for p in ("beats", "unet")}
    if beats_from:
        if not part["beats"]:
            raise SystemExit(f"{source}: no {WRAPPER_PARTS['beats']}* keys to convert with --beats_from")
        _, recorded = load_params(beats_from)
        cfg = {k: v for k, v in recorded.items() if k not in beats.PROVENANCE_KEYS}
        written["beats"] = os.path.join(out_dir, "beats")
        beats.save_beats(written["beats"], cfg, beats.params_from_torch(_to_numpy(part["beats"]), cfg),
                         source_checkpoint=f"{source} ({WRAPPER_PARTS['beats']}*, from "
                                           f"{recorded.get('source_checkpoint')})",
                         finetuned_head=recorded.get("finetuned_head"))
    if sd_path:
        if not part["unet"]:
            raise SystemExit(f"{source}: no {WRAPPER_PARTS['unet']}* keys to convert with --sd_path")
        sd_out = os.path.join(out_dir, "sd")
        os.makedirs(os.path.join(sd_out, "unet"), exist_ok=True)
        save_file({k: np.ascontiguousarray(v) for k, v in _to_numpy(part["unet"]).items()},
                  os.path.join(sd_out, "unet", "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
        shutil.copy(os.path.join(sd_path, "unet", "config.json"), os.path.join(sd_out, "unet", "config.json"))
        for name in os.listdir(sd_path):
            if name != "unet" and not os.path.lexists(os.path.join(sd_out, name)):
                os.symlink(os.path.abspath(os.path.join(sd_path, name)), os.path.join(sd_out, name))
        written["unet"] = sd_out
    return written


def _cmd_embedder(args: argparse.Namespace) -> None:
    from mtok_jax.models.embedder import WRAPPER_PARTS, convert_state_dict, load_state_dict, wrapper_part

    state_dict = load_state_dict(args.checkpoint, trusted=args.trusted)
    out = args.out_dir
    written = convert_wrapper_parts(state_dict, os.path.basename(args.checkpoint), args.out_dir,
                                    beats_from=args.beats_from, sd_path=args.sd_path)
    if written:  # a wrapper with parts: the embedder goes next to them
        out = os.path.join(args.out_dir, "embedder")
    convert_state_dict(state_dict, out)
    print(f"embedder → {out}")
    for part, folder in written.items():
        print(f"{part} → {folder}")
    others = [p for p in ("beats", "unet") if p not in written and wrapper_part(state_dict, p)]
    if others:
        print(f"note: the checkpoint also holds {', '.join(WRAPPER_PARTS[p] + '*' for p in others)} (trained in "
              f"exp2); --beats_from / --sd_path convert them", file=sys.stderr)


def add_trusted_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--trusted`` opt-in to full unpickling, shared by every converter subcommand."""
    parser.add_argument("--trusted", action="store_true",
                        help="allow full unpickling of a file holding non-tensor objects (this can run code "
                             "from the file: only for a checkpoint from a source you trust)")


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m mtok_jax.convert",
        description="Convert reference PyTorch checkpoints into mtok_jax parameter folders "
                    "(params.safetensors + config.json, loadable without torch). Needs torch.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{beats,embedder}")
    p = sub.add_parser("beats", help="official BEATs .pt (dict with 'cfg' and 'model')",
                       description="Convert an official BEATs checkpoint: AudioToken and the thesis use "
                                   "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt (fine-tuned on AudioSet; "
                                   "not the self-supervised BEATs_iter3_plus_AS2M.pt, same shapes, different "
                                   "features). The weight-normed conv-pos kernel is recomposed; the fine-tuned "
                                   "'predictor' head is dropped, as AudioToken does, and its presence is "
                                   "recorded in OUT_DIR/config.json with the source file name. Load the result "
                                   "with mtok_jax.models.beats.load_beats(OUT_DIR).")
    p.add_argument("checkpoint", type=cli.existing_file, help="path to the .pt file")
    p.add_argument("out_dir", help="output folder (created)")
    add_trusted_flag(p)
    p.set_defaults(func=_cmd_beats)
    p = sub.add_parser("embedder", help="AudioToken embedder state dict (learned_embeds.bin) or thesis wrapper",
                       description="Convert AudioToken's trained embedder state dict (learned_embeds.bin), or the "
                                   "thesis's best-epoch file model_<timestamp>_<epoch> (the whole wrapper state "
                                   "dict: embedder.*, aud_encoder.*, unet.*, text_encoder.*, vae.*), of which the "
                                   "embedder.* part is converted. For exp2 (BEATs and UNet trained) also pass "
                                   "--beats_from and --sd_path: OUT_DIR then gets embedder/, beats/ and sd/.")
    p.add_argument("checkpoint", type=cli.existing_file,
                   help="path to learned_embeds.bin or model_<timestamp>_<epoch>")
    p.add_argument("out_dir", help="output folder (created)")
    add_trusted_flag(p)
    p.add_argument("--beats_from", help="converted BEATs folder (its cfg): convert the wrapper's aud_encoder.* "
                                        "into OUT_DIR/beats")
    p.add_argument("--sd_path", help="SD folder: write OUT_DIR/sd with the wrapper's unet.* as its UNet (other "
                                     "parts linked)")
    p.set_defaults(func=_cmd_embedder)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    cli.run(main)
