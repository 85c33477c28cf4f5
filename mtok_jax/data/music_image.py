"""TFDS builder `music_image`: music clips + artworks of 18 labels, paired by label (docs/design.md §2.7).

Built from a manual dir (layouts in `mtok_jax.data.sources`) with `build(...)` or
`python -m mtok_jax.data.build`, stored as array_record (no TensorFlow needed), read with
`as_data_source` (`mtok_jax.data.pipeline`).

Stored splits (one record layout for all of them):
- ``train`` / ``validation`` / ``test``: one record per usable audio file: ``audio`` int16 PCM
  [clip_samples] (2 bytes/sample: 960,000 bytes for 30 s at 16 kHz), ``label``, ``audio_id``;
  validation/test records also hold their fixed paired ``image`` (encoded bytes) and ``image_id``
  (train records have ``image`` = b'' and ``image_id`` = '': training re-pairs every epoch).
- ``train_images`` / ``validation_images`` / ``test_images``: one record per usable image
  (``audio`` empty, ``audio_id`` ''), ordered by (label, path): the pools the training pairing
  draws from and the reference image sets of the metrics.
``metadata.json`` holds the config, per-split label arrays (so the pipeline can pair without reading
records), the eval pairing and the skip list; ``skipped.jsonl`` (one JSON object per skipped file:
path, kind, reason) is written next to it.

Builder parameters live in `MusicImageConfig` (named configs ``folders``, ``csv``, ``demo``; any other
combination via `make_config`, whose name `config_name_for` derives from the parameters).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import json
import math
import multiprocessing
import os
import shutil
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mtok_jax.audio.io import SILENCE_DBFS
from mtok_jax.constants import REFERENCE_SAMPLE_RATE, SAMPLE_RATE
from mtok_jax.data import jobs
from mtok_jax.data.sources import DEFAULT_LABELS, NAME, SPLITS, VERSION, SourceFile, check_config_name, scan, skip_record

@dataclasses.dataclass
class MusicImageConfig(tfds.core.BuilderConfig):
    """Everything that changes the stored bytes. Defaults: the corrected (non-quirk) 30 s / 512² set."""
    layout: str = "folders"  # folders | csv
    clip_seconds: float = 30.0
    image_height: int = 512
    image_width: int = 512
    center_crop: bool = True  # False: stretch the whole image (the reference's 512×320 loader)
    audio_44k_as_16k: bool = False  # thesis quirk: store 44.1 kHz samples (fed as if 16 kHz)
    stereo: str = "first"  # multi-channel → mono: first channel (the reference's wav[0]) | mean
    image_format: str = "jpeg"  # jpeg (q95, 4:2:0) | png
    labels: tuple = DEFAULT_LABELS
    pairing_seed: int = 0  # fixed validation/test pairing
    silence_dbfs: float = SILENCE_DBFS  # audio with an RMS level ≤ this (dBFS) is skipped as silence

    @property
    def sample_rate(self) -> int:
        """Rate the stored samples were resampled to (16 kHz unless the 44.1 kHz quirk is on)."""
        return REFERENCE_SAMPLE_RATE if self.audio_44k_as_16k else SAMPLE_RATE

    @property
    def clip_samples(self) -> int:
        return int(round(self.clip_seconds * self.sample_rate))

    def params(self) -> dict:
        """JSON-able parameters (stored in metadata.json)."""
        keys = ("layout", "clip_seconds", "image_height", "image_width", "center_crop",
                "audio_44k_as_16k", "stereo", "image_format", "pairing_seed", "silence_dbfs")
        out = {k: getattr(self, k) for k in keys}
        out.update(name=self.name, labels=list(self.labels), sample_rate=self.sample_rate,
                   clip_samples=self.clip_samples)
        return out


def config_name_for(layout: str = "folders", clip_seconds: float = 30.0, image_size: int = 512,
                    reference_512x320: bool = False, audio_44k_as_16k: bool = False,
                    labels: Optional[Sequence[str]] = None, silence_dbfs: float = SILENCE_DBFS,
                    stretch: bool = False, stereo: str = "first") -> str:
    """Config name derived from the parameters: the layout, plus a suffix per non-default value.

    e.g. 'folders', 'csv-512x320nocrop-44k', 'folders-4s-32px', 'folders-nocrop', 'folders-stereomean',
    'folders-labels1a2b3c4d', 'folders-silm50dB' (silence threshold −50 dBFS).
    """
    parts = [layout]
    if float(clip_seconds) != 30.0:
        parts.append(f"{float(clip_seconds):g}s".replace(".", "p"))
    if reference_512x320:
        parts.append("512x320nocrop")
    else:
        if int(image_size) != 512:
            parts.append(f"{int(image_size)}px")
        if stretch:
            parts.append("nocrop")
    if audio_44k_as_16k:
        parts.append("44k")
    if stereo != "first":
        parts.append(f"stereo{stereo}")
    if labels is not None and tuple(labels) != DEFAULT_LABELS:
        parts.append("labels" + hashlib.sha1("\n".join(labels).encode("utf-8")).hexdigest()[:8])
    if float(silence_dbfs) != SILENCE_DBFS:
        parts.append(f"sil{float(silence_dbfs):g}dB".replace("-", "m").replace(".", "p"))
    return "-".join(parts)


def make_config(layout: str = "folders", clip_seconds: float = 30.0, image_size: int = 512,
                reference_512x320: bool = False, audio_44k_as_16k: bool = False,
                labels: Optional[Sequence[str]] = None, image_format: Optional[str] = None,
                name: Optional[str] = None, silence_dbfs: float = SILENCE_DBFS, stretch: bool = False,
                stereo: str = "first") -> MusicImageConfig:
    """A `MusicImageConfig` from the training-config knobs (name from `config_name_for` unless given).

    reference_512x320: 512 wide × 320 high, whole image stretched (no crop), as the reference loader.
    stretch: the whole image stretched to image_size² without cropping (the reference's no-crop
    geometry at the square size it samples at); default: centre crop.
    stereo: 'first' (channel 0, the reference) or 'mean' (channel average) for multi-channel audio.
    image_format: default 'png' for images ≤ 64 px (lossless, tiny), else 'jpeg'.
    silence_dbfs: audio whose RMS level is at or below this many dBFS is skipped as silence.
    """
    if name is not None:
        check_config_name(name)
    if not math.isfinite(float(silence_dbfs)):
        raise ValueError(f"silence_dbfs={silence_dbfs!r}: expected a finite RMS level in dBFS, e.g. -60")
    h, w = (320, 512) if reference_512x320 else (int(image_size), int(image_size))
    if image_format is None:
        image_format = "png" if max(h, w) <= 64 else "jpeg"
    return MusicImageConfig(
        name=name or config_name_for(layout, clip_seconds, image_size, reference_512x320,
                                     audio_44k_as_16k, labels, silence_dbfs, stretch, stereo),
        layout=layout, clip_seconds=float(clip_seconds), image_height=h, image_width=w,
        center_crop=not (reference_512x320 or stretch), audio_44k_as_16k=audio_44k_as_16k, stereo=stereo,
        image_format=image_format, labels=tuple(labels or DEFAULT_LABELS), silence_dbfs=float(silence_dbfs),
        description=f"{layout} layout, {clip_seconds:g} s clips, {w}x{h} images")


DEMO_CONFIG = make_config("folders", clip_seconds=4.0, image_size=32, name="demo")


# ---- build helpers -----------------------------------------------------------------------------

def _ordered_map(fn, items: Sequence, pool: Optional[cf.Executor], window: int = 16) -> Iterator:
    """fn over items in order: inline when pool is None, else with at most `window` jobs in flight."""
    if pool is None:
        for item in items:
            yield fn(item)
        return
    pending: deque = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            break
    try:
        while pending:
            yield pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(fn, nxt))
    finally:
        for f in pending:
            f.cancel()


def pair_draw(seed: int, audio_id: str, n: int) -> int:
    """Index in [0, n) of the fixed eval pairing of one audio file (independent of other files)."""
    digest = hashlib.sha256(f"{seed}:{audio_id}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") % n


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


class MusicImage(tfds.core.GeneratorBasedBuilder):
    """Music clips paired with same-label artworks (see the module docstring)."""

    VERSION = tfds.core.Version(VERSION)
    RELEASE_NOTES = {str(VERSION): "First release."}
    BUILDER_CONFIGS = [make_config("folders"), make_config("csv"), DEMO_CONFIG]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the source files in the manual dir: audio/<label>/<id>.(wav|mp3|flac|ogg) and "
        "image/<label>/<id>.(jpg|png|webp) (layout 'folders'), or audio.csv + images.csv (id,class,set) "
        "with flat audio/ and image/ folders (layout 'csv'). See docs/data.md.")

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS derives this from the top package's resources, which fails when mtok_jax is imported
        # as a namespace package (editable install, cwd outside the repo).
        from etils import epath

        return epath.Path(__file__)

    def __init__(self, *, workers: int = 0, progress: bool = True, **kwargs):
        self._workers = workers
        self._progress = progress
        self._pool: Optional[cf.ProcessPoolExecutor] = None
        super().__init__(**kwargs)

    def _map(self, fn, items: Sequence) -> Iterator:
        """fn over items in order, in this build's spawn process pool when workers > 1."""
        if self._workers > 1 and self._pool is None and items:
            self._pool = cf.ProcessPoolExecutor(max_workers=self._workers,
                                                mp_context=multiprocessing.get_context("spawn"))
        return _ordered_map(fn, items, self._pool, window=4 * max(1, self._workers))

    def close(self) -> None:
        """Stop the worker processes (if any)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        return tfds.core.DatasetInfo(
            builder=self,
            description="Music clips and artworks in labelled categories, paired by label.",
            features=tfds.features.FeaturesDict({
                "audio": tfds.features.Tensor(shape=(None,), dtype=np.int16,
                                              encoding=tfds.features.Encoding.BYTES),
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded jpeg/png bytes
                "label": tfds.features.ClassLabel(names=list(cfg.labels)),
                "audio_id": tfds.features.Text(),
                "image_id": tfds.features.Text(),
            }),
            metadata=tfds.core.MetadataDict(),
            disable_shuffling=True,  # record i is the i-th yielded example: metadata indexes them
        )

    def _cache_dir(self) -> Path:
        return Path(self._data_dir_root) / f".{NAME}_build" / self.builder_config.name

    def _process_images(self, manual: Path, images: list[SourceFile]) -> list[Optional[str]]:
        """Decode every image into the build cache (resumable); returns per image None or the reason."""
        from tqdm.auto import tqdm

        cfg = self.builder_config
        cache = self._cache_dir() / "images"
        cache.mkdir(parents=True, exist_ok=True)
        paths, todo, gone = [], [], {}
        for i, f in enumerate(images):
            src = manual / f.rel
            try:
                st = src.stat()
            except OSError as e:  # vanished or became unreadable since the scan
                gone[i] = f"unreadable ({type(e).__name__}: {e.strerror or e})"
                paths.append(None)
                continue
            key = hashlib.sha1(json.dumps([f.rel, st.st_size, st.st_mtime_ns, cfg.image_height, cfg.image_width,
                                           cfg.center_crop, cfg.image_format]).encode()).hexdigest()
            paths.append(cache / key)
            if not (cache / key).exists() and not Path(f"{cache / key}.err").exists():
                todo.append((str(src), str(cache / key), cfg.image_height, cfg.image_width,
                             cfg.center_crop, cfg.image_format))
        bar = tqdm(total=len(todo), desc="Decoding images", unit="img", disable=not self._progress)
        for _ in self._map(jobs.image_job, todo):
            bar.update(1)
        bar.close()
        self._image_cache_paths = paths
        return [gone[i] if p is None else None if p.exists() else Path(f"{p}.err").read_text(encoding="utf-8")
                for i, p in enumerate(paths)]

    def _split_generators(self, dl_manager):
        cfg = self.builder_config
        manual = Path(dl_manager.manual_dir)
        audio, images, skipped = scan(manual, cfg.layout, cfg.labels)
        num_files = {kind: sum(r["kind"] == kind for r in skipped) for kind in ("audio", "image")}
        num_files["audio"] += len(audio)
        num_files["image"] += len(images)
        reasons = self._process_images(manual, images)
        entries: dict[str, list[tuple[SourceFile, Path]]] = {s: [] for s in SPLITS}
        for f, path, reason in zip(images, self._image_cache_paths, reasons):
            if reason is None:
                entries[f.split].append((f, path))
            else:
                skipped.append(skip_record(f.rel, "image", reason))
        pools: dict[tuple[str, int], list[int]] = {}
        for s in SPLITS:
            entries[s].sort(key=lambda e: (e[0].label, e[0].rel))
            for i, (f, _) in enumerate(entries[s]):
                pools.setdefault((s, f.label), []).append(i)
        audio_by_split: dict[str, list[tuple[SourceFile, int]]] = {s: [] for s in SPLITS}
        for a in audio:
            pool = pools.get((a.split, a.label))
            if not pool:
                skipped.append(skip_record(a.rel, "audio", f"no usable image of label "
                                                           f"'{cfg.labels[a.label]}' in split '{a.split}'"))
                continue
            pick = -1 if a.split == "train" else pool[pair_draw(cfg.pairing_seed, a.rel, len(pool))]
            audio_by_split[a.split].append((a, pick))
        meta = self.info.metadata
        meta.clear()
        meta.update(format_version=1, config=cfg.params(), splits={}, skipped=skipped,
                    num_audio_files=num_files["audio"], num_image_files=num_files["image"])
        gens = {}
        for s in SPLITS:
            if entries[s]:
                meta["splits"][f"{s}_images"] = {"labels": [f.label for f, _ in entries[s]]}
                gens[f"{s}_images"] = self._generate_examples(kind="images", split=f"{s}_images",
                                                              items=entries[s], manual=manual)
        for s in SPLITS:
            if audio_by_split[s]:
                gens[s] = self._generate_examples(kind="audio", split=s, items=audio_by_split[s], manual=manual,
                                                  image_entries=entries[s])
        return gens

    def _generate_examples(self, kind: str, split: str, items: list, manual: Path, image_entries=None
                           ) -> Iterable[tuple[int, dict]]:
        cfg = self.builder_config
        no_audio = np.zeros((0,), np.int16)
        if kind == "images":
            for i, (f, cache_path) in enumerate(items):
                yield i, {"audio": no_audio, "image": cache_path.read_bytes(), "label": f.label,
                          "audio_id": "", "image_id": f.rel}
            return
        meta = self.info.metadata
        info = meta["splits"].setdefault(split, {"labels": [], "image_index": []})
        info["labels"].clear()
        info["image_index"].clear()
        audio_jobs = [(str(manual / a.rel), cfg.sample_rate, cfg.clip_seconds, cfg.stereo, cfg.silence_dbfs)
                      for a, _ in items]
        key = 0
        for (a, pick), (pcm, reason) in zip(items, self._map(jobs.audio_job, audio_jobs)):
            if pcm is None:
                meta["skipped"].append(skip_record(a.rel, "audio", reason))
                continue
            image, image_id = b"", ""
            if pick >= 0:
                img_file, img_path = image_entries[pick]
                image, image_id = img_path.read_bytes(), img_file.rel
            info["labels"].append(a.label)
            info["image_index"].append(pick)
            yield key, {"audio": pcm, "image": image, "label": a.label, "audio_id": a.rel,
                        "image_id": image_id}
            key += 1


def build(manual_dir, data_dir, config: "MusicImageConfig | str" = "folders", *,
          workers: Optional[int] = None, overwrite: bool = False, progress: bool = True) -> Path:
    """Build (or reuse) the dataset; returns its dir. Also writes `skipped.jsonl` there.

    The data is written by TFDS into a temporary dir that is renamed only when complete, so an
    interrupted build leaves no partial dataset; decoded images are cached under
    DATA_DIR/.music_image_build/<config>/ so that a rerun resumes (the cache is removed on success).
    """
    if not progress:
        tfds.disable_progress_bar()
    check_config_name(config.name if isinstance(config, MusicImageConfig) else config)
    registered = {c.name: c for c in MusicImage.BUILDER_CONFIGS}
    if isinstance(config, MusicImageConfig) and config.name in registered:
        if config.params() != registered[config.name].params():
            raise ValueError(f"config name '{config.name}' is reserved for {registered[config.name].params()}; "
                             "choose another name (default: config_name_for(...))")
        config = config.name  # TFDS wants the registered object, not an equal copy
    builder = MusicImage(data_dir=os.fspath(data_dir), config=config, file_format="array_record",
                         workers=default_workers() if workers is None else workers, progress=progress)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
            manual_dir=os.fspath(manual_dir), download_mode=mode))
    except AssertionError as e:
        if "No examples were yielded" in str(e):
            raise RuntimeError("a split lost every audio file while decoding (all unreadable/silent/too "
                               "short); fix the sources or move them to another split") from e
        raise
    finally:
        builder.close()
    out = Path(builder.data_dir)
    meta = json.loads((out / "metadata.json").read_text(encoding="utf-8"))
    tmp = out / f"skipped.jsonl.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in meta["skipped"]:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
    os.replace(tmp, out / "skipped.jsonl")
    shutil.rmtree(builder._cache_dir(), ignore_errors=True)
    return out
