"""Build the `music_image` dataset from a manual dir and print what went in.

  python -m mtok_jax.data.build --layout folders|csv --manual_dir DIR --data_dir OUT [--labels FILE]
      [--clip_seconds 30] [--image_size 512] [--stretch | --reference_512x320] [--audio_44k_as_16k]
      [--stereo first|mean] [--silence_dbfs -60] [--config_name NAME] [--workers N] [--overwrite]

Prints per-split and per-label counts (audio examples / usable images), the skip reasons, and ends
with exactly one line `built: train=N validation=N test=N skipped=N` (N audio examples per split;
skipped = audio + image files left out, each listed in OUT/music_image/<config>/<version>/skipped.jsonl).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import mtok_jax  # noqa: F401  (sets USE_TF=0 first)
from mtok_jax import cli
from mtok_jax.audio.io import SILENCE_DBFS
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


def main(argv=None) -> int:
    from mtok_jax.data.builder import build, make_config

    p = cli.ArgumentParser(prog="python -m mtok_jax.data.build", description=__doc__.split("\n")[0])
    p.add_argument("--layout", choices=("folders", "csv"), required=True)
    p.add_argument("--manual_dir", required=True, type=cli.existing_dir,
                   help="folder with the source files (audio/ and image/, see docs/data.md)")
    p.add_argument("--data_dir", required=True, help="TFDS data_dir to write the dataset to")
    p.add_argument("--labels", type=cli.existing_file,
                   help="text file, one label per line (default: the 18 thesis labels)")
    p.add_argument("--clip_seconds", type=float, default=30.0)
    p.add_argument("--image_size", type=int, default=512, help="square side (centre crop + bicubic)")
    p.add_argument("--stretch", action="store_true",
                   help="stretch the whole image to image_size² without cropping (the reference's no-crop "
                        "geometry at the square sampling size)")
    p.add_argument("--reference_512x320", action="store_true", help="quirk: 512x320 (WxH), no crop")
    p.add_argument("--audio_44k_as_16k", action="store_true", help="quirk: store 44.1 kHz samples")
    p.add_argument("--stereo", choices=("first", "mean"), default="first",
                   help="multi-channel audio → mono: first channel (the reference's wav[0], default) or the mean")
    p.add_argument("--image_format", choices=("jpeg", "png"), default=None)
    p.add_argument("--silence_dbfs", type=float, default=SILENCE_DBFS,
                   help="skip audio whose RMS level is at or below this (dBFS, full scale 1.0; default %(default)g)")
    p.add_argument("--config_name", default=None, help="default: derived from the parameters")
    p.add_argument("--workers", type=int, default=None, help="decode processes (default: CPU count)")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if the dataset exists")
    p.add_argument("--no_progress", action="store_true")
    a = p.parse_args(argv)
    labels = read_label_file(a.labels) if a.labels else None
    if a.stretch and a.reference_512x320:
        p.error("--stretch and --reference_512x320 are exclusive (the latter already stretches to 512x320)")
    try:
        cfg = make_config(a.layout, a.clip_seconds, a.image_size, a.reference_512x320, a.audio_44k_as_16k,
                          labels, a.image_format, a.config_name, a.silence_dbfs, stretch=a.stretch, stereo=a.stereo)
    except ValueError as e:  # e.g. --config_name ../x
        p.error(str(e))
    out = build(a.manual_dir, a.data_dir, cfg, workers=a.workers, overwrite=a.overwrite,
                progress=not a.no_progress)
    lines, counts = summarize(out)
    print("\n".join(lines))
    print(f"config_name: {cfg.name}")
    print("built: " + " ".join(f"{k}={counts[k]}" for k in ("train", "validation", "test", "skipped")))
    return 0


if __name__ == "__main__":
    cli.run(main)
