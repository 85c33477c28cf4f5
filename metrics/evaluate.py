"""Evaluation command: AIS / IIS / FID and per-label GIILS on generated test images (thesis Tables 5.1–5.4).

  python -m metrics.evaluate --workdir runs/exp1 [--checkpoint best|latest|STEP] [--config configs/exp1.py]
      [--num_images 335] [--per_label 10] [--out DIR] [--items FILE] [--config.metrics.clip_path=...]
  python -m metrics.evaluate --images DIR [--config CONFIG] [--out DIR] [--per_label 10]
      [--clip_path P --inception_path P --wav2clip_path P] [--clip_seconds 30]

Generation mode samples one image per selected test-split audio (a random draw seeded by ``metrics.seed``
within each label, labels interleaved, so every label gets ≥ per_label images when num_images ≥
18·per_label; ``--items FILE`` fixes the records), writes them with their audio clip, ground-truth
image and seed into ``OUT/images/`` (the ``--images`` layout below) and scores that folder.

``--images DIR`` layout: ``DIR/manifest.jsonl``, one JSON object per generated image:
  {"image": "generated/0000.png", "audio": "audio/0000.flac", "ground_truth": "ground_truth/0000.png",
   "label": 3, "label_name": "Heavy metal", "seed": 17, ...}
Paths are relative to DIR (or absolute); ``audio`` is decoded mono, resampled to 16 kHz and cut/padded to
``clip_seconds``; ``ground_truth`` is optional (without it IIS and FID are skipped). Extra keys are kept.

Outputs in OUT (default ``<workdir>/eval`` or ``DIR/eval``): ``report.json`` (all numbers, default and
thesis-script "faithful" variants, the thesis's figures, timings), ``report.md`` (Tables 5.1/5.3 and
5.2/5.4 in the thesis's form, ours beside the thesis's), ``grids/<label>.png`` (4 generated images per
label, as Figures 5.2–5.33) and ``embeddings.npz`` (every embedding, to recompute without the models).

Metrics (docs/design.md §2.8): AIS = Wav2CLIP(audio) vs CLIP(generated); IIS = CLIP(ground truth) vs
CLIP(generated), baselines over the M generated pairs and (generation mode, or ``--reference_sets``) over
the whole test split as the thesis defines them (default exact means, and the scripts' divisors); GIILS per label over the first ``per_label`` images of each label within the pool of all
generated images; FID = Inception pool3 of generated vs ground-truth images. Wav2CLIP normalises each clip
on its own (``normalization="item"``), as the thesis embedded one file at a time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import sys
import time
from typing import Any, Mapping, Sequence

import mtok_jax  # noqa: F401  (USE_TF=0 before transformers loads)
from metrics import ais, fid, giils, iis
from metrics.clip_image import embed_images, load_clip_image
from metrics.inception import load_inception, pool3_features
from metrics.scores import equal_rows
from metrics.wav2clip import embed_audio, load_wav2clip
from mtok_jax import checkpoints, cli, config_utils, errors, sample, sharding
from mtok_jax.audio.io import fit_length, from_pcm16, load_audio, resample, to_pcm16
from mtok_jax.constants import SAMPLE_RATE
from mtok_jax.data import pipeline
from mtok_jax.data.images import decode_image

import jax
import numpy as np
import tqdm
from absl import app, flags

log = logging.getLogger("mtok_jax.evaluate")

MANIFEST = "manifest.jsonl"
# metrics.generated_format → (file suffix, PIL save options, description). The thesis saved its generated
# images as .jpg with PIL's default quality 75 and computed the CLIP features on those files.
GENERATED_FORMATS = {"png": (".png", {"format": "PNG"}, "PNG (lossless)"),
                     "jpeg75": (".jpg", {"format": "JPEG", "quality": 75}, "JPEG quality 75 (as the thesis)")}
AUDIO_BATCH, CLIP_BATCH, INCEPTION_BATCH = 8, 64, 50  # embedding batch sizes (one compile each)

# Published figures (thesis Tables 5.1–5.4; 335 generated test images, 10 per label for GIILS).
THESIS = {
    "exp1": {"name": "Music-image conditional model 1", "ais": 50.15, "iis": 49.62, "fid": 179.16, "giils": {
        "Renaissance symbolism": 58.70, "Baroque Classical symbolism": 57.91, "Electronic music": 56.12,
        "Renaissance secular subject": 54.77, "20th century abstractionism": 54.38, "Romanticism open view": 54.29,
        "Heavy metal": 53.90, "African traditional folklore": 53.75, "20th century experimental open view": 53.49,
        "20th century traditional open view": 53.41, "20th century experimental figure": 53.31,
        "Asian traditional folklore": 52.92, "Romanticism figure": 52.44, "American traditional folklore": 52.35,
        "European traditional folklore": 52.21, "Modern instrumental music": 51.87,
        "Baroque Classical secular subject": 51.56, "20th century traditional figure": 51.31}},
    "exp2": {"name": "Music-image conditional model 2", "ais": 49.91, "iis": 50.03, "fid": 191.73, "giils": {
        "Renaissance symbolism": 58.28, "Baroque Classical symbolism": 57.16, "Renaissance secular subject": 54.85,
        "Electronic music": 53.83, "Heavy metal": 53.80, "Romanticism figure": 53.72,
        "20th century abstractionism": 53.48, "20th century experimental open view": 53.32,
        "20th century experimental figure": 53.12, "American traditional folklore": 52.86,
        "African traditional folklore": 52.75, "European traditional folklore": 52.00,
        "Romanticism open view": 51.97, "20th century traditional figure": 51.76,
        "Asian traditional folklore": 51.44, "Modern instrumental music": 51.35,
        "Baroque Classical secular subject": 51.29, "20th century traditional open view": 50.96}},
}


# ------------------------------------------------------------------------------------------ models
@dataclasses.dataclass
class MetricModels:
    """The three embedding models, loaded from their on-disk folders."""

    clip: Any  # metrics.clip_image.ClipImageModel
    inception: tuple[Any, Any]  # (module, params)
    wav2clip: tuple[Any, Any, dict]  # (module, variables, config)
    paths: dict[str, str]

    @classmethod
    def load(cls, clip_path, inception_path, wav2clip_path) -> "MetricModels":
        clip = load_clip_image(clip_path)
        w2c = load_wav2clip(wav2clip_path)
        audio_dim = int(w2c[2]["mlp_units"][-1])
        if audio_dim != clip.dim:
            raise ValueError(f"Wav2CLIP embeds into {audio_dim} dimensions but the CLIP image features at {clip_path} "
                             f"have {clip.dim}: AIS compares the two, they must match")
        return cls(clip, load_inception(inception_path), w2c,
                   {"clip": os.fspath(clip_path), "inception": os.fspath(inception_path),
                    "wav2clip": os.fspath(wav2clip_path)})


def embed_audio_batched(models: MetricModels, waveforms: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """float32 [M, N] 16 kHz clips → Wav2CLIP [M, d], per-clip normalisation, fixed-size jitted batches."""
    model, variables, config = models.wav2clip
    m = waveforms.shape[0]
    bs = max(1, min(batch_size, m))
    out = []
    for start in range(0, m, bs):
        chunk = waveforms[start:start + bs]
        if chunk.shape[0] < bs:  # zero clips normalise to zeros (no NaN) and are dropped
            chunk = np.concatenate([chunk, np.zeros((bs - chunk.shape[0], chunk.shape[1]), chunk.dtype)])
        e = embed_audio(model, variables, chunk, normalization="item", config=config)
        out.append(np.asarray(e)[: m - start])
    return np.concatenate(out)


def embed_all(models: MetricModels, generated: np.ndarray, ground_truth: np.ndarray | None,
              waveforms: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """All embeddings + throughput. generated / ground_truth uint8 [M, H, W, 3]; waveforms float32 [M, N]."""
    emb, timing = {}, {}

    def timed(name, batch, fn, x):
        """Embed x with fn; when x spans several batches, one batch runs first so the timing excludes
        compilation (a single batch is timed with its compile, flagged in ``compile_included``)."""
        if len(x) > batch:
            fn(x[:batch])
        else:
            timing.setdefault("compile_included", []).append(name)
        t = time.perf_counter()
        emb[name] = np.asarray(fn(x), np.float32)
        dt = time.perf_counter() - t
        timing[f"{name}_seconds"] = dt
        timing[f"{name}_per_second"] = len(x) / dt if dt > 0 else math.inf

    inc_model, inc_params = models.inception
    timed("audio_wav2clip", AUDIO_BATCH, lambda w: embed_audio_batched(models, w, AUDIO_BATCH), waveforms)
    sets = [("generated", generated)] + ([("ground_truth", ground_truth)] if ground_truth is not None else [])
    for name, images in sets:
        timed(f"{name}_clip", CLIP_BATCH, lambda x: embed_images(models.clip, x, CLIP_BATCH), images)
        timed(f"{name}_inception", INCEPTION_BATCH,
              lambda x: pool3_features(inc_model, inc_params, x, INCEPTION_BATCH), images)
    return emb, timing


# ------------------------------------------------------------------------------------------ metrics
def giils_groups(labels: Sequence[int], per_label: int) -> np.ndarray:
    """The first ``per_label`` images of each label (manifest order) form its GIILS group; others → −1."""
    labels = np.asarray(labels, np.int64)
    groups = np.full_like(labels, -1)
    for lab in np.unique(labels):
        idx = np.flatnonzero(labels == lab)[:per_label]
        groups[idx] = lab
    return groups


REFERENCE_ROWS = (("audio_wav2clip", "reference_audio_wav2clip", "reference_audio_ids", "audio_id"),
                  ("ground_truth_clip", "reference_image_clip", "reference_image_ids", "image_id"))


def use_reference_rows(emb: dict[str, np.ndarray], rows: Sequence[Mapping[str, Any]]) -> None:
    """Where a pair's audio / ground-truth image is a record of the reference set (generation mode: the
    manifest's `audio_id` / `image_id`), take its embedding from that set's row, so that each clip and
    image has one embedding (XLA's results depend on the batch an item is embedded in, and the reference
    baselines drop a pair's own term by exact equality, as the scripts do). In place."""
    for paired, ref, ids, key in REFERENCE_ROWS:
        if ids not in emb or paired not in emb:
            continue
        index = {str(v): i for i, v in enumerate(emb[ids])}
        found = [index.get(str(r.get(key))) for r in rows]
        if all(i is not None for i in found):
            emb[paired] = emb[ref][np.asarray(found)]


def paired_found(reference: np.ndarray, paired: np.ndarray, metric: str, what: str) -> int:
    """How many of the M paired embeddings [M, d] occur exactly among the reference rows [T, d] (the
    reference baselines drop a pair's own term by exact equality, as the scripts do); a warning for
    those that do not (their own term then stays in their baseline)."""
    found = int(np.sum(np.any(np.asarray(equal_rows(reference, paired)), axis=0)))  # [T, M] → per pair
    if found < len(paired):
        log.warning("%s over the test split: %d of %d paired %s are not exactly in the reference set, so their "
                    "own term stays in their baseline", metric, len(paired) - found, len(paired), what)
    return found


def compute_metrics(emb: Mapping[str, np.ndarray], labels: Sequence[int], label_names: Mapping[int, str],
                    per_label: int) -> dict[str, Any]:
    """AIS / IIS / FID / GIILS (default and faithful) from the embeddings of :func:`embed_all`."""
    out: dict[str, Any] = {}

    def sim(s):
        return {"score": float(s.score), "mean": float(s.mean)}

    gen = emb["generated_clip"]
    out["ais"] = sim(ais(emb["audio_wav2clip"], gen))
    out["ais_faithful"] = sim(ais(emb["audio_wav2clip"], gen, faithful=True))
    if "reference_audio_wav2clip" in emb:  # baselines over the whole test split (the thesis's T)
        ref = emb["reference_audio_wav2clip"]
        out["ais_reference"] = {**sim(ais(emb["audio_wav2clip"], gen, reference=ref)), "T": len(ref)}
        out["ais_reference_faithful"] = {**sim(ais(emb["audio_wav2clip"], gen, reference=ref, faithful=True)),
                                         "T": len(ref)}
        out["ais_reference"]["paired_found"] = paired_found(ref, emb["audio_wav2clip"], "AIS", "audios")
    if "ground_truth_clip" in emb:
        out["iis"] = sim(iis(gen, emb["ground_truth_clip"]))
        out["iis_faithful"] = sim(iis(gen, emb["ground_truth_clip"], faithful=True))
        if "reference_image_clip" in emb:
            ref = emb["reference_image_clip"]
            out["iis_reference"] = {**sim(iis(gen, emb["ground_truth_clip"], reference=ref)), "T": len(ref)}
            out["iis_reference_faithful"] = {**sim(iis(gen, emb["ground_truth_clip"], reference=ref,
                                                       faithful=True)), "T": len(ref)}
            out["iis_reference"]["paired_found"] = paired_found(ref, emb["ground_truth_clip"], "IIS", "images")
        out["fid"] = fid(emb["generated_inception"], emb["ground_truth_inception"])
    groups = giils_groups(labels, per_label)
    counts = {int(k): int(np.sum(groups == k)) for k in np.unique(groups) if k >= 0}
    for key, faithful in (("giils", False), ("giils_faithful", True)):
        out[key] = [{"label": label_names.get(k, str(k)), "label_id": k, "n": counts[k], **sim(v)}
                    for k, v in giils(gen, groups, faithful=faithful).items()]
    dropped = sorted(label_names.get(k, str(k)) for k, n in counts.items() if n < 2)
    if dropped:
        out["giils_note"] = giils_note(dropped, len(counts), per_label)
    return out


def giils_note(dropped: Sequence[str], num_labels: int, per_label: int) -> str:
    """Why labels are missing from the GIILS table (a label needs ≥ 2 images among its first per_label)."""
    what = "every label" if len(dropped) == num_labels else f"{len(dropped)} of {num_labels} labels ({', '.join(dropped)})"
    fix = ("--per_label ≥ 2" if per_label < 2 else
           "more images per label (--num_images; --per_label sets how many GIILS uses)")
    return (f"GIILS needs at least 2 images of a label: {what} had fewer among the first --per_label={per_label} "
            f"and {'is' if len(dropped) == 1 else 'are'} left out; use {fix}")


# ------------------------------------------------------------------------------------------ report
def _norm(name: str) -> str:
    return re.sub(r"\s+", " ", name).strip().lower()


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "label"


def _fmt(x) -> str:
    return "–" if x is None else (f"{x:.2f}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x))


def write_grids(out_dir: str, generated: np.ndarray, labels: Sequence[int], label_names: Mapping[int, str],
                n: int = 4) -> dict[str, str]:
    """One grid of the first ``n`` generated images per label (2 columns, cells upscaled to ≥128 px and
    captioned, ``mtok_jax.sample.write_grid``) → {label name: path relative to out_dir}."""

    os.makedirs(os.path.join(out_dir, "grids"), exist_ok=True)
    labels = np.asarray(labels)
    paths = {}
    for lab in sorted(set(labels.tolist())):
        idx = np.flatnonzero(labels == lab)[:n]
        name = label_names.get(int(lab), str(lab))
        rel = os.path.join("grids", f"{_slug(name)}.png")
        sample.write_grid(os.path.join(out_dir, rel), generated[idx], [name] * len(idx), columns=min(2, len(idx)))
        paths[name] = rel
    return paths


def render_markdown(report: Mapping[str, Any]) -> str:
    m = report["metrics"]
    method = report.get("method", "This run")
    lines = [f"# Evaluation: {method}", "",
             f"{report['num_images']} generated images; AIS/IIS against the paired test audios / ground-truth "
             f"images, FID against the ground-truth images, GIILS over {report['per_label']} images per label "
             f"within the pool of all {report['num_images']}. Checkpoint: `{report.get('checkpoint', '–')}`. "
             f"Generated images scored as: {report.get('generated_format', '–')}. "
             f"Wav2CLIP input: {report.get('wav2clip_input', '–')}.", "",
             "## AIS, IIS and FID (Tables 5.1 / 5.3)", "",
             "| METHOD | AIS ↑ | IIS ↑ | FID ↓ |", "|---|---|---|---|",
             f"| {method} | {_fmt(m['ais']['score'])} | {_fmt(m.get('iis', {}).get('score'))} | {_fmt(m.get('fid'))} |",
             f"| {method}, thesis-script variants | {_fmt(m['ais_faithful']['score'])} | "
             f"{_fmt(m.get('iis_faithful', {}).get('score'))} | {_fmt(m.get('fid'))} |"]
    if "ais_reference" in m:
        for key, what in (("reference", "baselines over the test split"),
                          ("reference_faithful", "baselines over the test split, thesis-script divisors")):
            ais_r, iis_r = m[f"ais_{key}"], m.get(f"iis_{key}", {})
            lines.append(f"| {method}, {what} (T = {ais_r['T']} audios / {iis_r.get('T', '–')} images) | "
                         f"{_fmt(ais_r['score'])} | {_fmt(iis_r.get('score'))} | {_fmt(m.get('fid'))} |")
    for t in THESIS.values():
        lines.append(f"| {t['name']} (thesis) | {_fmt(t['ais'])} | {_fmt(t['iis'])} | {_fmt(t['fid'])} |")
    lines += ["", "## GIILS per label (Tables 5.2 / 5.4), ordered", "",
              "| MUSIC INPUTS LABEL | GIILS ↑ | thesis-script variant | n | thesis model 1 | thesis model 2 | grid |",
              "|---|---|---|---|---|---|---|"]
    if m.get("giils_note"):
        lines += [f"**{m['giils_note']}.**", ""]
    faithful = {g["label_id"]: g for g in m["giils_faithful"]}
    t1 = {_norm(k): v for k, v in THESIS["exp1"]["giils"].items()}
    t2 = {_norm(k): v for k, v in THESIS["exp2"]["giils"].items()}
    grids = report.get("grids", {})
    for g in m["giils"]:
        grid = f"![]({grids[g['label']]})" if g["label"] in grids else ""
        lines.append(f"| {g['label']} | {_fmt(g['score'])} | {_fmt(faithful[g['label_id']]['score'])} | {g['n']} | "
                     f"{_fmt(t1.get(_norm(g['label'])))} | {_fmt(t2.get(_norm(g['label'])))} | {grid} |")
    lines += ["", "Scores are 100·(1 − arccos(m)/π) of the baseline-subtracted mean cosine m (50 = chance). "
              "Default: docs/design.md §2.8 exact means; thesis-script variants: IIS baseline over all M "
              "ground truths divided by M − 1, exclusions by embedding equality (docs/design.md §2.8).", ""]
    if report.get("timings"):
        lines += ["## Embedding throughput", "", "| embedding | items/s |", "|---|---|"]
        lines += [f"| {k[:-len('_per_second')]} | {v:.2f} |" for k, v in report["timings"].items()
                  if k.endswith("_per_second")]
        if report["timings"].get("compile_included"):
            lines.append(f"\n(single batch, compile time included: {', '.join(report['timings']['compile_included'])})")
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ --images mode
def read_manifest(images_dir: str) -> list[dict[str, Any]]:
    """``DIR/manifest.jsonl`` → list of rows with absolute ``image`` / ``audio`` / ``ground_truth`` paths."""
    path = os.path.join(images_dir, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found (see `python -m metrics.evaluate --help` for the layout)")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            for key in ("image", "audio", "label"):
                if key not in row:
                    raise ValueError(f"{path}:{n}: missing {key!r}")
            for key in ("image", "audio", "ground_truth"):
                if row.get(key):
                    row[key] = os.path.join(images_dir, row[key])
            rows.append(row)
    if len(rows) < 3:
        raise ValueError(f"{path}: needs at least 3 images, found {len(rows)}")
    return rows


def _load_rgb(path: str) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), np.uint8)


def save_generated(rgb: np.ndarray, path_stem: str, generated_format: str) -> str:
    """Write uint8 [H, W, 3] as ``path_stem`` + the format's suffix (GENERATED_FORMATS) → the file path."""
    from PIL import Image

    if generated_format not in GENERATED_FORMATS:
        raise ValueError(f"metrics.generated_format must be one of {sorted(GENERATED_FORMATS)}, got {generated_format!r}")
    suffix, options, _ = GENERATED_FORMATS[generated_format]
    Image.fromarray(rgb).save(path_stem + suffix, **options)
    return path_stem + suffix


def _wav2clip_input(rows: Sequence[Mapping[str, Any]]) -> str:
    """What Wav2CLIP embedded: the manifest's audio files; in generation mode these are the dataset's stored
    clips, mixed to mono as the dataset was built (``data.stereo``; the thesis's AIS script averaged the
    channels with librosa, which only ``data.stereo=mean`` reproduces for stereo sources)."""
    mixes = {r.get("stereo") for r in rows}
    if mixes == {None}:
        return "the manifest's audio files (librosa-style mean of their channels)"
    mix = " / ".join(sorted(str(m) for m in mixes))
    note = "" if mixes == {"mean"} else " — the thesis's script averaged the channels (data.stereo=mean)"
    return f"the dataset's stored clips, stereo mixed with data.stereo={mix}{note}"


def _generated_format(rows: Sequence[Mapping[str, Any]]) -> str:
    """How the generated images were stored: the manifest's ``generated_format`` (generation mode), else
    the file format(s) read from the images."""
    from PIL import Image

    recorded = {r.get("generated_format") for r in rows}
    if len(recorded) == 1 and None not in recorded and next(iter(recorded)) in GENERATED_FORMATS:
        return GENERATED_FORMATS[next(iter(recorded))][2]
    found = set()
    for r in rows:
        with Image.open(r["image"]) as im:
            found.add(im.format or "unknown")
    return " + ".join(sorted(found)) + " files (format not recorded)"


def _stack(images: list[np.ndarray], what: str) -> np.ndarray:
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise ValueError(f"{what} images must all have the same size, found {sorted(shapes)}")
    return np.stack(images)


def _label_table(rows: Sequence[Mapping[str, Any]]) -> tuple[list[int], dict[int, str]]:
    """Manifest labels (ints or names) → int ids + {id: name}."""
    names: dict[int, str] = {}
    ids: list[int] = []
    by_name: dict[str, int] = {}
    for r in rows:
        lab = r["label"]
        if isinstance(lab, str) and not lab.lstrip("-").isdigit():
            lab_id = by_name.setdefault(lab, len(by_name))
            names[lab_id] = lab
        else:
            lab_id = int(lab)
            names.setdefault(lab_id, str(r.get("label_name", lab_id)))
        ids.append(lab_id)
    return ids, names


def score_images(images_dir: str, models: MetricModels, out_dir: str, *, per_label: int = 10,
                 clip_seconds: float = 30.0, extra: Mapping[str, Any] | None = None,
                 reference: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Score a manifest folder; writes report.json / report.md / grids / embeddings.npz into out_dir.

    reference: {'reference_audio_wav2clip' [T, d], 'reference_image_clip' [T', d], ids} (:func:`reference_embeddings`)
    adds AIS/IIS with baselines over those sets (pairs that are records of them use their rows:
    :func:`use_reference_rows`)."""

    rows = read_manifest(images_dir)
    generated = _stack([_load_rgb(r["image"]) for r in rows], "generated")
    has_gt = all(r.get("ground_truth") for r in rows)
    ground_truth = _stack([_load_rgb(r["ground_truth"]) for r in rows], "ground-truth") if has_gt else None
    waveforms = np.stack([load_audio(r["audio"], SAMPLE_RATE, clip_seconds, min_seconds=0.0, silence_dbfs=None)
                          for r in rows])
    labels, names = _label_table(rows)
    t = time.perf_counter()
    emb, timings = embed_all(models, generated, ground_truth, waveforms)
    emb.update(reference or {})
    use_reference_rows(emb, rows)
    timings["embed_total_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    metrics = compute_metrics(emb, labels, names, per_label)
    timings["metrics_seconds"] = time.perf_counter() - t
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, "embeddings.npz"), labels=np.asarray(labels), **emb)
    report = {"method": "This run", **(extra or {}), "images_dir": os.fspath(images_dir),
              "generated_format": _generated_format(rows), "wav2clip_input": _wav2clip_input(rows),
              "num_images": len(rows), "per_label": per_label, "clip_seconds": clip_seconds,
              "metrics": metrics, "models": models.paths, "timings": timings, "thesis": THESIS,
              "seeds": [r.get("seed") for r in rows], "audio_ids": [r.get("audio_id") for r in rows],
              "grids": write_grids(out_dir, generated, labels, names)}
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(render_markdown(report))
    return report


# ------------------------------------------------------------------------------------------ generation mode
def select_test_items(labels: Sequence[int], num_images: int, seed: int | None = 0) -> np.ndarray:
    """Indices of ``num_images`` test records, labels interleaved round-robin so every label is represented
    as evenly as the split allows; within a label a random draw seeded by ``seed`` (``metrics.seed``).

    Records are stored sorted by (label, path) and audio ids are ``<recording>segmentN``, so record order
    would pick consecutive segments of few recordings (the reference's test loader shuffles).
    ``seed=None``: record order."""
    labels = np.asarray(labels)
    rng = None if seed is None else np.random.default_rng(seed)
    by_label = [list(idx if rng is None else rng.permutation(idx))
                for idx in (np.flatnonzero(labels == lab) for lab in np.unique(labels))]
    order = [idx[r] for r in range(max(map(len, by_label), default=0)) for idx in by_label if r < len(idx)]
    return np.asarray(order[:num_images], np.int64)


def read_items(path: str) -> list[int | str]:
    """``--items FILE``: a manifest.jsonl of an earlier evaluation (its ``test_index`` per row), or one test
    record per line (an integer index into the test split, or an ``audio_id``)."""
    with open(path, encoding="utf-8") as f:
        lines = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    if lines and lines[0].startswith("{"):
        return [int(json.loads(line)["test_index"]) for line in lines]
    return [int(x) if x.lstrip("-").isdigit() else x for x in lines]


def item_indices(items: Sequence[int | str], source) -> np.ndarray:
    """Test-split indices of ``items`` (indices, or audio ids looked up in ``source``'s records)."""
    n = len(source)
    ids = [x for x in items if isinstance(x, str)]
    by_id = {}
    if ids:
        by_id = {source[i]["audio_id"].decode("utf-8"): i for i in range(n)}
    out = []
    for x in items:
        i = by_id.get(x, -1) if isinstance(x, str) else int(x)
        if not 0 <= i < n:
            raise ValueError(f"--items: {x!r} is not a test record (the split has {n})")
        out.append(i)
    return np.asarray(out, np.int64)


def generate_test_images(config, workdir, images_dir: str, *, checkpoint="best", num_images: int = 335,
                         batch: int = 8, items: Sequence[int | str] | None = None, pipe=None) -> dict[str, Any]:
    """Generate one image per selected test-split audio with ``mtok_jax.sample`` and write the --images
    layout (generated image as ``metrics.generated_format``: PNG or the thesis's JPEG quality 75,
    ground-truth PNG, the stored audio clip as FLAC, manifest.jsonl with seeds and every sampling
    setting) into ``images_dir``. Image i uses seed ``config.sample.seed + i``. The test records are
    ``items`` (indices or audio ids) when given, else :func:`select_test_items` with ``metrics.seed``; the
    manifest records each one's ``test_index`` and ``audio_id``. ``pipe``: an already loaded
    ``sample.Pipeline`` (its own checkpoint) instead of loading ``workdir``'s ``checkpoint``.
    Returns the generation settings and timing."""
    import soundfile as sf
    from PIL import Image


    s = config.sample
    ds = pipeline.open_configured(config)
    test_labels = ds.labels("test")
    if test_labels.shape[0] == 0:
        raise ValueError(f"{ds.path}: the test split is empty")
    src = ds.source("test")
    if items is not None:
        items, selection = item_indices(items, src), {"selection": "given items"}
    else:
        seed = int(config.metrics.get("seed", 0))
        items, selection = select_test_items(test_labels, num_images, seed), {"selection": "random", "selection_seed": seed}
        if len(items) < num_images:
            print(f"note: the test split has {len(items)} clips, fewer than --num_images {num_images}",
                  file=sys.stderr)
    names = ds.label_names
    writes = jax.process_index() == 0  # every process generates its devices' images; process 0 writes
    if pipe is None:
        pipe = sample.load_pipeline(config, workdir, checkpoint)
    checkpoint = pipe.checkpoint
    rate = config_utils.sample_rate(config)
    settings = dict(scheduler=s.scheduler, steps=int(s.steps), guidance=float(s.guidance),
                    prompt=config.prompt.inference, checkpoint=None if checkpoint is None else str(checkpoint),
                    config=config.workdir_name, workdir=os.fspath(workdir) if workdir else None,
                    generated_format=config.metrics.get("generated_format", "png"), stereo=config.data.stereo,
                    **selection)
    if settings["generated_format"] not in GENERATED_FORMATS:
        raise ValueError(f"metrics.generated_format must be one of {sorted(GENERATED_FORMATS)}, "
                         f"got {settings['generated_format']!r}")
    for sub in ("generated", "ground_truth", "audio") if writes else ():
        os.makedirs(os.path.join(images_dir, sub), exist_ok=True)
    rows, seconds = [], 0.0
    bar = tqdm.tqdm(total=len(items), unit="image", desc=f"generating test images ({int(s.steps)} steps each)",
                    disable=not writes)
    for start in range(0, len(items), batch):
        chunk = items[start:start + batch]
        recs = [src[int(i)] for i in chunk]
        waves = np.stack([np.asarray(r["audio"], np.int16) for r in recs]).astype(np.float32) / 32768.0
        seeds = [int(s.seed) + start + k for k in range(len(chunk))]
        t = time.perf_counter()
        images = pipe.generate(waves, seeds, num_images=1, steps=int(s.steps), guidance=float(s.guidance),
                               scheduler=s.scheduler)
        seconds += time.perf_counter() - t
        bar.update(len(chunk))
        for k, (i, rec) in enumerate(zip(chunk, recs)):
            n = start + k
            stem = os.path.join(images_dir, "generated", f"{n:04d}")
            image = save_generated(images[k, 0], stem, settings["generated_format"]) if writes else \
                stem + GENERATED_FORMATS[settings["generated_format"]][0]
            row = {"image": os.path.relpath(image, images_dir), "ground_truth": f"ground_truth/{n:04d}.png",
                   "audio": f"audio/{n:04d}.flac", "label": int(rec["label"]), "label_name": names[int(rec["label"])],
                   "seed": seeds[k], "test_index": int(i), "audio_id": rec["audio_id"].decode("utf-8"),
                   "image_id": rec["image_id"].decode("utf-8"), **settings}
            if writes:
                Image.fromarray(decode_image(rec["image"])).save(os.path.join(images_dir, row["ground_truth"]))
                sf.write(os.path.join(images_dir, row["audio"]), to_pcm16(waves[k]), rate, subtype="PCM_16")
            rows.append(row)
    bar.close()
    if writes:
        with open(os.path.join(images_dir, MANIFEST), "w") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows))
    return {"generation": {**settings, "num_images": len(rows), "seconds": seconds,
                           "images_per_second": len(rows) / seconds if seconds > 0 else None}}


def reference_embeddings(models: MetricModels, config, batch: int = 64) -> dict[str, np.ndarray]:
    """The AIS/IIS reference sets as the thesis defines them: Wav2CLIP of every test-split clip (stored
    audio, resampled to 16 kHz, ``data.clip_seconds``) → 'reference_audio_wav2clip' [T, d], and CLIP of every
    test-split image (``test_images``) → 'reference_image_clip' [T', d], with their records' ids
    ('reference_audio_ids' [T], 'reference_image_ids' [T'], str). Read and embedded in chunks."""
    ds = pipeline.open_configured(config)
    rate, n_out = config_utils.sample_rate(config), int(round(float(config.data.clip_seconds) * SAMPLE_RATE))
    out = {}
    for split, (key, ids, id_field), read, embed in (
            ("test", REFERENCE_ROWS[0][1:],
             lambda r: fit_length(resample(from_pcm16(r["audio"]), rate, SAMPLE_RATE), n_out),
             lambda x: embed_audio_batched(models, np.stack(x), AUDIO_BATCH)),
            ("test_images", REFERENCE_ROWS[1][1:], lambda r: decode_image(r["image"]),
             lambda x: embed_images(models.clip, np.stack(x), CLIP_BATCH))):
        if not ds.has_split(split):
            continue
        src = ds.source(split)
        n = len(ds.labels(split))
        chunks, names = [], []
        for s in range(0, n, batch):
            records = [src[i] for i in range(s, min(n, s + batch))]
            chunks.append(np.asarray(embed([read(r) for r in records]), np.float32))
            names += [r[id_field].decode("utf-8") for r in records]
        out[key], out[ids] = np.concatenate(chunks), np.asarray(names)
    return out


def evaluate_checkpoint(config, workdir, *, checkpoint="best", num_images: int = 335, per_label: int = 10,
                        out_dir: str, metric_paths: Sequence[str] | None = None,
                        items: Sequence[int | str] | None = None, pipe=None, models: MetricModels | None = None,
                        reference: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Generate from the test split (:func:`generate_test_images` into ``out_dir/images``) and score it
    (:func:`score_images`); metric models from ``metric_paths`` or ``config.metrics``. To compare several
    checkpoints without reloading, pass what the first call used: ``pipe`` (``sample.Pipeline.restored``
    for each), ``models`` and ``reference`` (:func:`reference_embeddings` of those models and config).
    Several processes (sharding.initialize_distributed): all generate, process 0 writes, scores on its own
    devices and returns the report; the others wait for it and return {}."""
    scores = jax.process_index() == 0
    if models is None and scores:
        m = config.metrics
        models = MetricModels.load(*(metric_paths or (m.clip_path, m.inception_path, m.wav2clip_path)))
    # (loaded first: fail on a bad metric model before spending time generating)
    images_dir = os.path.join(out_dir, "images")
    gen = generate_test_images(config, workdir, images_dir, checkpoint=checkpoint, num_images=num_images, items=items,
                               pipe=pipe)
    report = {}
    try:
        if scores:
            extra = {"method": f"{config.workdir_name} (this port)", "checkpoint": gen["generation"]["checkpoint"],
                     **gen}
            report = score_images(images_dir, models, out_dir, per_label=per_label,
                                  clip_seconds=float(config.data.clip_seconds), extra=extra,
                                  reference=reference if reference is not None else reference_embeddings(models, config))
    finally:
        sharding.wait_for_all_processes("metrics.evaluate: scored")
    return report


# ------------------------------------------------------------------------------------------ CLI
def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    """The command's flags; `--config` / `--config.a.b=value` exactly as train.py and sample.py (mtok_jax.cli)."""
    cli.define_config_file("config", None, "experiment config file (configs/*.py); default with --workdir: the "
                           "run's config.json", argv, flag_values=fv)
    define = cli.definer(fv)
    define("string", "workdir", None, "training workdir holding the checkpoints (generation mode)")
    define("string", "checkpoint", None, f"generation mode: {cli.CHECKPOINT_HELP}")
    define("string", "images", None, "score an existing manifest folder instead of generating")
    define("string", "items", None, "generation mode: the test records to generate from (a manifest.jsonl of an "
                                    "earlier run, or one test index / audio id per line) instead of the "
                                    "metrics.seed random draw")
    define("integer", "num_images", None, "generated test images (default config.metrics.num_images)")
    define("integer", "per_label", None, "GIILS images per label (default config.metrics.per_label)")
    define("string", "out", None, "output folder (default <workdir>/eval or <images>/eval)")
    define("string", "clip_path", None, "CLIP folder (default config.metrics.clip_path)")
    define("string", "inception_path", None, "Inception folder (default config.metrics.inception_path)")
    define("string", "wav2clip_path", None, "Wav2CLIP folder (default config.metrics.wav2clip_path)")
    define("float", "clip_seconds", None, "audio clip length (default config.data.clip_seconds or 30)")
    cli.define_distributed_flags(fv)
    define("bool", "reference_sets", False, "--images mode: also score AIS/IIS with baselines over the --config "
                                            "dataset's whole test split (generation mode always does)")


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    prog = "python -m metrics.evaluate"
    fv, _ = cli.parse_command(prog, __doc__, _define, argv)
    cli.setup_logging()
    config = None if fv.config is None else config_utils.validate(fv.config)
    if config is not None:
        print(f"config: {cli.config_source('config', fv)}", file=sys.stderr)
    if not fv.images and (config is None or not fv.workdir):
        raise app.UsageError("generation mode needs --workdir (with its config.json, or --config) "
                             "(or use --images DIR)")
    cm = config.metrics if config is not None else None

    def pick(flag, key, default=None):
        if flag is not None:
            return flag
        if cm is not None and key in cm:
            return cm[key]
        if default is None:
            raise app.UsageError(f"--{key} is needed (or --config with metrics.{key})")
        return default

    per_label = int(pick(fv.per_label, "per_label", 10))
    clip_seconds = fv.clip_seconds or (float(config.data.clip_seconds) if config is not None else 30.0)
    paths = [pick(fv.clip_path, "clip_path"), pick(fv.inception_path, "inception_path"),
             pick(fv.wav2clip_path, "wav2clip_path")]
    for key, path in zip(("clip_path", "inception_path", "wav2clip_path"), paths):  # fail before loading
        if not os.path.isdir(path):
            raise errors.UserError(f"metric model folder not found: --{key} / metrics.{key}={path} "
                                   f"(README, step 4: metric models)")
    if fv.images:
        read_manifest(fv.images)
        out = fv.out or os.path.join(fv.images, "eval")
        if fv.reference_sets and config is None:
            raise app.UsageError("--reference_sets needs --config (its dataset's test split)")
        models = MetricModels.load(*paths)
        reference = reference_embeddings(models, config) if fv.reference_sets else None
        report = score_images(fv.images, models, out, per_label=per_label, clip_seconds=clip_seconds,
                              reference=reference)
    else:
        checkpoint = checkpoints.select(fv.workdir, fv.checkpoint)  # before any model loads
        sharding.initialize_distributed(config, fv.coordinator_address, fv.num_processes, fv.process_id)
        num_images = int(pick(fv.num_images, "num_images", 335))
        out = fv.out or os.path.join(fv.workdir, "eval")
        report = evaluate_checkpoint(config, fv.workdir, checkpoint=checkpoint, num_images=num_images,
                                     per_label=per_label, out_dir=out, metric_paths=paths,
                                     items=read_items(fv.items) if fv.items else None)
    if report:  # (empty on the processes other than 0 of a multi-process evaluation)
        print(render_markdown(report))
        print(f"\nwrote {os.path.join(out, 'report.md')}", file=sys.stderr)
    return report


if __name__ == "__main__":
    cli.run(main)
