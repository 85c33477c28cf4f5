"""Build the `music_image` dataset from a manual dir and print what went in.

  python -m mtok_jax.data.build --layout folders|csv --manual_dir DIR --data_dir OUT [--labels FILE]
      [--clip_seconds 30] [--image_size 512] [--stretch | --reference_512x320] [--audio_44k_as_16k]
      [--stereo first|mean] [--silence_dbfs -60] [--config_name NAME] [--workers N] [--overwrite]
      [--no_progress]

Prints per-split and per-label counts (audio examples / usable images), the skip reasons, and ends
with exactly one line `built: train=N validation=N test=N skipped=N` (N audio examples per split;
skipped = audio + image files left out, each listed in OUT/music_image/<config>/<version>/skipped.jsonl).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from absl import app, flags

import mtok_jax  # noqa: F401  (sets USE_TF=0 first)
from mtok_jax import cli
from mtok_jax.audio.io import SILENCE_DBFS
from mtok_jax.data.music_image import build, make_config
from mtok_jax.data.sources import SPLITS, read_label_file


def summarize(dataset_dir) -> tuple[list[str], dict]:
    """Report lines and the counts {'train': N, 'validation': N, 'test': N, 'skipped': N} of a built dir."""
    meta = json.loads((Path(dataset_dir) / "metadata.json").read_text(encoding="utf-8"))
    labels = meta["config"]["labels"]
    splits = meta["splits"]
    counts = {s: len(splits.get(s, {}).get("labels", [])) for s in SPLITS}
    counts["skipped"] = len(meta["skipped"])
    lines = [f"dataset: {dataset_dir}",
             f"config: {json.dumps({k: v for k, v in meta['config'].items() if k != 'labels'})}",
             f"source files: audio={meta['num_audio_files']} image={meta['num_image_files']}", ""]
    width = max(len(s) for s in labels)
    per = {s: Counter(splits.get(s, {}).get("labels", [])) for s in SPLITS}
    per_img = {s: Counter(splits.get(f"{s}_images", {}).get("labels", [])) for s in SPLITS}
    lines.append(f"{'label':<{width}}  " + "  ".join(f"{s + ' a/i':>16}" for s in SPLITS))
    for i, name in enumerate(labels):
        cells = "  ".join(f"{per[s][i]:>7} / {per_img[s][i]:<6}" for s in SPLITS)
        lines.append(f"{name:<{width}}  {cells}")
    lines.append(f"{'total':<{width}}  " + "  ".join(
        f"{counts[s]:>7} / {sum(per_img[s].values()):<6}" for s in SPLITS))
    reasons = Counter((r["kind"], r["reason"].split(" (")[0]) for r in meta["skipped"])
    if reasons:
        lines += ["", "skipped (kind, reason, files):"]
        lines += [f"  {k:<5} {why}: {n}" for (k, why), n in sorted(reasons.items(), key=lambda kv: -kv[1])]
        lines.append(f"  list: {Path(dataset_dir) / 'skipped.jsonl'}")
    return lines, counts


def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    define = cli.definer(fv)
    flags.DEFINE_enum("layout", None, ["folders", "csv"], "source layout (docs/data.md)", flag_values=fv)
    define("string", "manual_dir", None, "folder with the source files (audio/ and image/, see docs/data.md)")
    define("string", "data_dir", None, "TFDS data_dir to write the dataset to")
    define("string", "labels", None, "text file, one label per line (default: the 18 thesis labels)")
    define("float", "clip_seconds", 30.0, "audio clip length (s)")
    define("integer", "image_size", 512, "square side (centre crop + bicubic)")
    define("bool", "stretch", False, "stretch the whole image to image_size² without cropping (the reference's "
                                     "no-crop geometry at the square sampling size)")
    define("bool", "reference_512x320", False, "quirk: 512x320 (WxH), no crop")
    define("bool", "audio_44k_as_16k", False, "quirk: store 44.1 kHz samples")
    flags.DEFINE_enum("stereo", "first", ["first", "mean"], "multi-channel audio → mono: first channel (the "
                      "reference's wav[0]) or the mean", flag_values=fv)
    flags.DEFINE_enum("image_format", None, ["jpeg", "png"], "stored image format (default: as the layout)",
                      flag_values=fv)
    define("float", "silence_dbfs", SILENCE_DBFS, "skip audio whose RMS level is at or below this (dBFS, full "
                                                  "scale 1.0)")
    define("string", "config_name", None, "dataset config name (default: derived from the parameters)")
    define("integer", "workers", None, "decode processes (default: CPU count)")
    define("bool", "overwrite", False, "rebuild even if the dataset exists")
    define("bool", "no_progress", False, "no progress bars")
    for name in ("layout", "manual_dir", "data_dir"):
        flags.mark_flag_as_required(name, flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    prog = "python -m mtok_jax.data.build"
    a, _ = cli.parse_command(prog, __doc__, _define, argv)
    cli.existing_dir("--manual_dir", a.manual_dir)
    labels = read_label_file(cli.existing_file("--labels", a.labels)) if a.labels else None
    if a.stretch and a.reference_512x320:
        raise app.UsageError("--stretch and --reference_512x320 are exclusive (the latter already stretches to "
                             "512x320)")
    cfg = make_config(a.layout, a.clip_seconds, a.image_size, a.reference_512x320, a.audio_44k_as_16k,
                      labels, a.image_format, a.config_name, a.silence_dbfs, stretch=a.stretch, stereo=a.stereo)
    out = build(a.manual_dir, a.data_dir, cfg, workers=a.workers, overwrite=a.overwrite,
                progress=not a.no_progress)
    lines, counts = summarize(out)
    print("\n".join(lines))
    print(f"config_name: {cfg.name}")
    print("built: " + " ".join(f"{k}={counts[k]}" for k in ("train", "validation", "test", "skipped")))
    return 0


if __name__ == "__main__":
    cli.run(main)
