"""Convert reference PyTorch checkpoints into params_io folders (params.safetensors + config.json).

  python -m mtok_jax.convert beats BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt OUT_DIR
  python -m mtok_jax.convert embedder learned_embeds.bin OUT_DIR
  python -m mtok_jax.convert embedder model_<timestamp>_<epoch> OUT_DIR [--beats_from DIR] [--sd_path DIR]

Files are read with ``torch.load(weights_only=True)``; one holding other objects than tensors (e.g. a
pickled ``argparse.Namespace``) is refused unless ``--trusted`` is given, since full unpickling can
run code from the file. torch (the optional ``torch`` extra) is imported only inside the subcommands.
"""

from __future__ import annotations

import os
import shutil
import sys
import warnings
from typing import Any, Sequence

import mtok_jax  # noqa: F401  (environment setup first)

import jax
import numpy as np
from absl import app, flags
from safetensors.numpy import save_file

from mtok_jax import cli, pt_checkpoint
from mtok_jax.models import beats
from mtok_jax.models.embedder import WRAPPER_PARTS, convert_state_dict, load_state_dict, wrapper_part
from mtok_jax.params_io import load_params


def _to_numpy(state_dict: Any) -> dict[str, Any]:
    return {k: (v.detach().cpu().float().numpy() if v.is_floating_point() else v.cpu().numpy())
            for k, v in state_dict.items()}


def convert_beats(checkpoint: str, out_dir: str, *, trusted: bool = False) -> dict[str, Any]:
    """Official BEATs ``.pt`` (dict with ``cfg`` and ``model``) → params_io folder. Returns the cfg.

    ``trusted``: allow full unpickling (:func:`mtok_jax.pt_checkpoint.load`). The folder's config.json
    also records the source file name and whether ``predictor.*`` (the AudioSet fine-tuning head,
    present in the ``…finetuned_on_AS2M_cpt2.pt`` AudioToken uses) was there."""
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
    return sum(int(x.size) for x in jax.tree.leaves(tree))


def _cmd_beats(checkpoint: str, out_dir: str, *, trusted: bool) -> None:
    cfg = convert_beats(checkpoint, out_dir, trusted=trusted)
    with warnings.catch_warnings():  # the provenance warning was printed above
        warnings.simplefilter("ignore")
        _, params = beats.load_beats(out_dir)
    print(f"BEATs: {cfg['encoder_layers']} layers × {cfg['encoder_embed_dim']} channels, "
          f"{_count(params):,} parameters → {out_dir}")


def convert_wrapper_parts(state_dict: dict[str, Any], source: str, out_dir: str, *, beats_from: str | None = None,
                          sd_path: str | None = None) -> dict[str, str]:
    """The trained BEATs and UNet of a thesis wrapper state dict (exp2) → folders the configs load.

    ``aud_encoder.*`` → ``OUT_DIR/beats`` (params_io, cfg and provenance from the converted BEATs folder
    ``beats_from``); ``unet.*`` → ``OUT_DIR/sd``: an SD folder whose ``unet/`` holds these weights as
    ``diffusion_pytorch_model.safetensors`` with ``sd_path``'s UNet config, every other entry linked to
    ``sd_path``. → {part: folder written}."""

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


def _cmd_embedder(checkpoint: str, out_dir: str, *, trusted: bool, beats_from: str | None,
                  sd_path: str | None) -> None:
    state_dict = load_state_dict(checkpoint, trusted=trusted)
    out = out_dir
    written = convert_wrapper_parts(state_dict, os.path.basename(checkpoint), out_dir, beats_from=beats_from,
                                    sd_path=sd_path)
    if written:  # a wrapper with parts: the embedder goes next to them
        out = os.path.join(out_dir, "embedder")
    convert_state_dict(state_dict, out)
    print(f"embedder → {out}")
    for part, folder in written.items():
        print(f"{part} → {folder}")
    others = [p for p in ("beats", "unet") if p not in written and wrapper_part(state_dict, p)]
    if others:
        print(f"note: the checkpoint also holds {', '.join(WRAPPER_PARTS[p] + '*' for p in others)} (trained in "
              f"exp2); --beats_from / --sd_path convert them", file=sys.stderr)


TRUSTED_HELP = ("allow full unpickling of a file holding non-tensor objects (this can run code from the file: "
                "only for a checkpoint from a source you trust)")


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    flags.DEFINE_bool("trusted", False, TRUSTED_HELP, flag_values=fv)
    flags.DEFINE_string("beats_from", None, "embedder: converted BEATs folder (its cfg): convert the wrapper's "
                                            "aud_encoder.* into OUT_DIR/beats", flag_values=fv)
    flags.DEFINE_string("sd_path", None, "embedder: SD folder: write OUT_DIR/sd with the wrapper's unet.* as its "
                                         "UNet (other parts linked)", flag_values=fv)


COMMANDS = {"beats": "official BEATs .pt (dict with 'cfg' and 'model'); the fine-tuned 'predictor' head is dropped, "
                     "as AudioToken does, and recorded in OUT_DIR/config.json",
            "embedder": "AudioToken's embedder state dict (learned_embeds.bin), or the thesis's best-epoch wrapper "
                        "model_<timestamp>_<epoch> (its embedder.* part; with --beats_from / --sd_path also its "
                        "aud_encoder.* and unet.*: OUT_DIR then gets embedder/, beats/ and sd/)"}


def main(argv: Sequence[str] | None = None) -> None:
    prog = "python -m mtok_jax.convert"
    fv, (command, checkpoint, out_dir) = cli.parse_command(prog, __doc__, _define, argv,
                                                           args=("CHECKPOINT", "OUT_DIR"), commands=COMMANDS)
    cli.existing_file("checkpoint", checkpoint)
    if command == "beats":
        if fv.beats_from or fv.sd_path:
            raise app.UsageError("--beats_from / --sd_path belong to the embedder command")
        _cmd_beats(checkpoint, out_dir, trusted=fv.trusted)
    else:
        _cmd_embedder(checkpoint, out_dir, trusted=fv.trusted, beats_from=fv.beats_from, sd_path=fv.sd_path)


if __name__ == "__main__":
    cli.run(main)
