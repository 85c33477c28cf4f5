"""Convert reference PyTorch checkpoints into params_io folders (params.safetensors + config.json).

  python -m mtok_jax.convert beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt OUT_DIR
  python -m mtok_jax.convert embedder learned_embeds.bin OUT_DIR

torch (the optional ``torch`` extra) is imported only here, inside the subcommands.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Sequence

import mtok_jax  # noqa: F401  (environment setup first)


def _torch_load(path: str) -> Any:
    """``torch.load`` on CPU, ``weights_only=True`` first; full unpickling only as a announced fallback."""
    try:
        import torch
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit("converting a PyTorch checkpoint needs torch: pip install 'mtok_jax[torch]'") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends: non-tensor objects in the file
        print(f"warning: torch.load(weights_only=True) failed for {path} ({type(e).__name__}: "
              f"{str(e).splitlines()[0] if str(e) else ''}); retrying with full unpickling. "
              f"Only do this with checkpoints from a source you trust.", file=sys.stderr)
        return torch.load(path, map_location="cpu", weights_only=False)


def _to_numpy(state_dict: Any) -> dict[str, Any]:
    return {k: (v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy())
            for k, v in state_dict.items()}


def convert_beats(checkpoint: str, out_dir: str) -> dict[str, Any]:
    """Official BEATs ``.pt`` (dict with ``cfg`` and ``model``) → params_io folder. Returns the cfg.

    The folder's config.json also records the source file name and whether ``predictor.*`` (the
    AudioSet fine-tuning head, present in the ``…finetuned_on_AS2M_cpt2.pt`` AudioToken uses) was there."""
    from mtok_jax.models import beats

    ckpt = _torch_load(checkpoint)
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
    cfg = convert_beats(args.checkpoint, args.out_dir)
    from mtok_jax.models.beats import load_beats
    with warnings.catch_warnings():  # the provenance warning was printed above
        warnings.simplefilter("ignore")
        _, params = load_beats(args.out_dir)
    print(f"BEATs: {cfg['encoder_layers']} layers × {cfg['encoder_embed_dim']} channels, "
          f"{_count(params):,} parameters → {args.out_dir}")


def _cmd_embedder(args: argparse.Namespace) -> None:
    from mtok_jax.models.embedder import convert_checkpoint
    convert_checkpoint(args.checkpoint, args.out_dir)
    print(f"embedder → {args.out_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
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
    p.add_argument("checkpoint", help="path to the .pt file")
    p.add_argument("out_dir", help="output folder (created)")
    p.set_defaults(func=_cmd_beats)
    p = sub.add_parser("embedder", help="AudioToken embedder state dict (learned_embeds.bin)",
                       description="Convert AudioToken's trained embedder state dict (learned_embeds.bin).")
    p.add_argument("checkpoint", help="path to learned_embeds.bin")
    p.add_argument("out_dir", help="output folder (created)")
    p.set_defaults(func=_cmd_embedder)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
