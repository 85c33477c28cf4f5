"""Export a trained run as files others can load (needs torch, the optional `torch` extra):

  python -m mtok_jax.export --workdir W [--checkpoint best|latest|STEP] --out DIR [--copy] [--config.a.b=value ...]

The config is W/config.json (written by train.py), overrides on top; the trained leaves come from the
checkpoint (default `best`). DIR is a self-contained model folder in the Hugging Face Hub layout:

  DIR/embedder/      params_io folder (params.safetensors + config.json) that `model.embedder_path` loads,
                     learned_embeds.bin (AudioToken's FGAEmbedder state dict, torch tensors,
                     `torch.load(weights_only=True)`; `python -m mtok_jax.convert embedder` reads it back)
                     and learned_embeds.safetensors (the same tensors)
  DIR/unet/          the UNet as a diffusers `UNet2DConditionModel` folder (config.json +
                     PyTorch-layout diffusion_pytorch_model.safetensors) when trained (exp2), else the SD one
  DIR/beats/         BEATs in the converted format when trained (exp2), plus BEATs.pt in the official layout
                     ({'cfg', 'model'}, conv-pos as weight_g/weight_v; `mtok_jax.convert beats` reads it),
                     else the run's BEATs folder
  DIR/vae, text_encoder, tokenizer, scheduler, model_index.json   the SD folder's unchanged parts
                     (symlinked; copied with --copy)
  DIR/config.json    the run's config with model paths inside DIR ('.', 'beats', 'embedder')
  DIR/README.md      model card: training config, data summary, metrics report and sample grid if W has them

`python sample.py --model DIR --audio song.mp3` samples from it (no workdir; :func:`load_model_config`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Sequence

import jax
import numpy as np
from absl import app, flags
from flax import traverse_util
from safetensors.numpy import save_file

import mtok_jax  # noqa: F401  (environment setup first)
from mtok_jax import checkpoints, cli, config_utils, errors
from mtok_jax import tree as tree_lib
from mtok_jax import system as system_lib
from mtok_jax.constants import PARTS
from mtok_jax.data import pipeline
from mtok_jax.models import beats as beats_lib
from mtok_jax.models import diffusion, hub
from mtok_jax.models import embedder as embedder_lib
from mtok_jax.params_io import load_params, save_params

LEARNED_EMBEDS = "learned_embeds.bin"
LEARNED_EMBEDS_SAFETENSORS = "learned_embeds.safetensors"
BEATS_PT = "BEATs.pt"
# Model paths of DIR/config.json, relative to DIR.
MODEL_PATHS = {"sd_path": ".", "beats_path": "beats", "embedder_path": "embedder"}
SD_PARTS = (("vae", hub.CONFIG_FILE), ("text_encoder", hub.CONFIG_FILE), ("tokenizer", "vocab.json"),
            ("scheduler", "scheduler_config.json"))
EXPORTABLE = ("beats", "embedder", "unet")


def _torch():
    try:
        import torch
    except ImportError as e:
        raise errors.UserError("export writes PyTorch files and needs torch (pip install '.[torch]')") from e
    return torch


def _place(src: str, dst: str, copy: bool) -> None:
    """Symlink `dst` → `src` (absolute), or copy it (folders recursively, links followed)."""
    if copy:
        (shutil.copytree if os.path.isdir(src) else shutil.copy)(src, dst)
    else:
        os.symlink(os.path.abspath(src), dst)


# ------------------------------------------------------------------------------------------ parts
def write_embedder(directory: str, params: dict[str, Any]) -> None:
    """Embedder params → params_io folder + learned_embeds.bin (torch) + learned_embeds.safetensors."""
    torch = _torch()
    save_params(directory, params, embedder_lib.embedder_config(params))
    state = embedder_lib.params_to_torch(params)
    torch.save({k: torch.tensor(v) for k, v in state.items()}, os.path.join(directory, LEARNED_EMBEDS))
    save_file(state, os.path.join(directory, LEARNED_EMBEDS_SAFETENSORS), metadata={"format": "pt"})


def write_unet(directory: str, params: dict[str, Any], unet_config: dict[str, Any]) -> None:
    """Flax UNet params → diffusers `UNet2DConditionModel` folder (config.json + PyTorch safetensors),
    through diffusers' own Flax→PyTorch conversion (every PyTorch weight must be filled)."""
    _torch()
    from diffusers import UNet2DConditionModel
    from diffusers.models.modeling_pytorch_flax_utils import load_flax_weights_in_pytorch_model

    model = UNet2DConditionModel.from_config({k: v for k, v in unet_config.items() if not k.startswith("_")})
    model = load_flax_weights_in_pytorch_model(model, jax.tree.map(np.asarray, params))
    # Read back through the loader's PyTorch→Flax map: a weight diffusers left at its init would differ.
    back = diffusion.pytorch_to_flax({k: v.numpy() for k, v in model.state_dict().items()}, params)
    ours, theirs = traverse_util.flatten_dict(dict(params), sep="/"), traverse_util.flatten_dict(back, sep="/")
    bad = [k for k in ours if not np.array_equal(np.asarray(ours[k]), theirs[k])]
    if bad:
        raise ValueError(f"UNet export: {len(bad)} weights not carried into the PyTorch model, e.g. {bad[:3]}")
    model.save_pretrained(directory, safe_serialization=True)


def write_beats(directory: str, params: dict[str, Any], cfg: dict[str, Any], source: dict[str, Any]) -> None:
    """Fine-tuned BEATs → params_io folder (provenance of `source`, the run's BEATs config.json) + BEATs.pt
    in the official layout {'cfg': complete cfg, 'model': state dict of torch tensors}."""
    torch = _torch()
    beats_lib.save_beats(directory, cfg, params,
                         source_checkpoint=f"{beats_lib.FINETUNED_FROM}{source.get('source_checkpoint')}",
                         finetuned_head=source.get("finetuned_head"))
    state = beats_lib.params_to_torch(params, cfg)
    torch.save({"cfg": beats_lib.beats_config(cfg), "model": {k: torch.tensor(v) for k, v in state.items()}},
               os.path.join(directory, BEATS_PT))


# ------------------------------------------------------------------------------------------ model card
def _data_summary(config, labels: Sequence[str]) -> list[str]:
    d = config.data
    lines = [f"- dataset `{d.name}` (builder config `{d.builder_config}`) at `{d.data_dir}`",
             f"- {d.clip_seconds:g} s audio clips, {d.image_size} px images",
             f"- {len(labels)} labels: {', '.join(labels)}"]
    try:
        counts = {s: pipeline.num_examples(d.data_dir, s, d.builder_config or None)
                  for s in ("train", "validation", "test")}
        lines.append("- examples: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    except (FileNotFoundError, KeyError, ValueError) as e:
        lines.append(f"- example counts unavailable ({type(e).__name__})")
    return lines


def write_model_card(out: str, config, workdir: str, checkpoint, trained: Sequence[str],
                     labels: Sequence[str]) -> None:
    """DIR/README.md: what the folder holds, how to load it, the config, data summary, metrics, grid."""
    lines = ["---", "library_name: mtok_jax", "tags: [audio-to-image, stable-diffusion, audiotoken, jax]", "---", "",
             f"# AudioToken (mtok_jax) — {config.workdir_name}", "",
             f"Exported from `{os.path.abspath(workdir)}`, checkpoint `{checkpoint}`; trained parts: "
             f"{', '.join(trained)}.", "",
             "## Use", "", "```", f"python sample.py --model {out} --audio song.mp3", "```", "",
             f"- `embedder/`: `model.embedder_path`; `{LEARNED_EMBEDS}` / `{LEARNED_EMBEDS_SAFETENSORS}`: "
             "AudioToken's embedder state dict",
             "- `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`: a Stable Diffusion folder "
             "(diffusers `from_pretrained`)",
             "- `beats/`: the BEATs audio encoder (`model.beats_path`)"
             + (f"; `{BEATS_PT}`: official BEATs layout" if "beats" in trained else ""), "",
             "## Data", "", *_data_summary(config, labels), "",
             "## Training config", "", "```json", config.to_json_best_effort(indent=2, sort_keys=True), "```", ""]
    report = os.path.join(workdir, "eval", "report.md")
    if os.path.isfile(report):
        with open(report) as f:
            lines += ["## Metrics", "", f.read().strip(), ""]
    grid = os.path.join(workdir, "samples", "grid.png")
    if os.path.isfile(grid):
        shutil.copy(grid, os.path.join(out, "grid.png"))
        lines += ["## Samples", "", "![samples](grid.png)", ""]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines))


# ------------------------------------------------------------------------------------------ export
def trained_parts(config) -> list[str]:
    """The parts (of constants.PARTS) with leaves that `train.trainable` selects."""
    is_trained = tree_lib.path_matcher(config.train.trainable)
    return [p for p in PARTS if is_trained(f"{p}/x")]


def export(config, workdir: str, out: str, *, checkpoint: str | int = "best", copy: bool = False) -> dict[str, str]:
    """Write the model folder `out` (layout in the module docstring) → {part: path written}.

    Raises UserError when `out` is a non-empty folder or the run trained a part that cannot be exported
    (text encoder, VAE)."""
    trained = trained_parts(config)
    if set(trained) - set(EXPORTABLE):
        raise errors.UserError(f"train.trainable={config.train.trainable!r} trains "
                               f"{', '.join(sorted(set(trained) - set(EXPORTABLE)))}: only {', '.join(EXPORTABLE)} "
                               f"can be exported")
    if os.path.isdir(out) and os.listdir(out):
        raise errors.UserError(f"--out {out} is not empty: choose a new folder")
    _torch()  # before the minutes of model loading
    system, params = system_lib.load_system(config, pipeline.configured_labels(config))
    params = jax.device_get(checkpoints.restore_trained(workdir, params, checkpoint))
    m = config.model
    os.makedirs(out, exist_ok=True)
    written = {"embedder": os.path.join(out, "embedder")}
    write_embedder(written["embedder"], params["embedder"])
    fetch = dict(allow_download=m.allow_download)
    unet_src = hub.resolve_folder(m.sd_path, "unet", **fetch)
    written["unet"] = os.path.join(out, "unet")
    if "unet" in trained:
        with open(os.path.join(unet_src, hub.CONFIG_FILE)) as f:
            write_unet(written["unet"], params["unet"], json.load(f))
    else:
        _place(unet_src, written["unet"], copy)
    for part, marker in SD_PARTS:
        written[part] = os.path.join(out, part)
        _place(hub.resolve_folder(m.sd_path, part, marker, **fetch), written[part], copy)
    index = os.path.join(os.path.dirname(hub.resolve_folder(m.sd_path, "vae", **fetch)), "model_index.json")
    if os.path.isfile(index):
        shutil.copy(index, os.path.join(out, "model_index.json"))
    written["beats"] = os.path.join(out, "beats")
    if "beats" in trained:
        _, source = load_params(m.beats_path)
        write_beats(written["beats"], params["beats"], dict(system.beats.cfg), source)
    else:
        _place(m.beats_path, written["beats"], copy)
    model_config = config.copy_and_resolve_references()  # the run's, with model paths inside the folder
    for key, value in {**MODEL_PATHS, "allow_download": False}.items():
        model_config.model[key] = value
    with open(os.path.join(out, "config.json"), "w") as f:
        f.write(model_config.to_json_best_effort(indent=2, sort_keys=True))
    write_model_card(out, config, workdir, checkpoint, trained, system.labels)
    return written


def load_model_config(directory: str | os.PathLike, overrides: Sequence[str] = ()):
    """An exported model folder's config.json → config whose model paths point inside `directory`
    (its weights are in place: sample it with checkpoint None). Overrides 'a.b=value' on top."""
    directory = os.path.abspath(os.fspath(directory))
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--model {directory}: no config.json (a folder written by python -m mtok_jax.export)")
    recorded = config_utils.read_run_config(path)
    resolved = [f"model.{k}={os.path.normpath(os.path.join(directory, recorded.model[k]))}" for k in MODEL_PATHS]
    return config_utils.load_config(path, [*resolved, *overrides])


# ------------------------------------------------------------------------------------------ CLI
def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    cli.define_config_file("config", None, "experiment config; default: WORKDIR/config.json (the run's)", argv,
                           flag_values=fv)
    flags.DEFINE_string("workdir", None, "run directory (train.py's)", flag_values=fv)
    flags.DEFINE_string("checkpoint", None, cli.CHECKPOINT_HELP, flag_values=fv)
    flags.DEFINE_string("out", None, "output folder (new or empty)", flag_values=fv)
    flags.DEFINE_bool("copy", False, "copy the unchanged SD / BEATs parts instead of symlinking them", flag_values=fv)
    for name in ("workdir", "out"):
        flags.mark_flag_as_required(name, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> None:
    prog = "python -m mtok_jax.export"
    fv, _ = cli.parse_command(prog, __doc__, _define, argv)
    cli.existing_dir("--workdir", fv.workdir)
    if fv.config is None:
        raise errors.UserError(f"--workdir {fv.workdir} has no config.json (written by train.py)")
    config = config_utils.validate(fv.config)
    checkpoint = checkpoints.select(fv.workdir, fv.checkpoint)
    if checkpoint is None:
        raise app.UsageError("--checkpoint none: an untrained run has nothing to export")
    written = export(config, fv.workdir, fv.out, checkpoint=checkpoint, copy=fv.copy)
    for part, folder in written.items():
        print(f"{part} → {folder}")
    print(f"model folder {fv.out}: python sample.py --model {fv.out} --audio FILE", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
