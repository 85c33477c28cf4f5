"""Finding the source files of the music–image dataset: labels, layouts and the split of each file.

Two layouts (docs/design.md §2.7) under a manual dir:
- ``folders``: ``audio/<label>/<id>.<ext>`` and ``image/<label>/<id>.<ext>`` (any depth below the
  label folder). The split is derived from the file ids: per label and per modality the files are
  ranked by sha1(id) and the first ``ceil(n/10)`` go to validation, the next ``ceil(n/10)`` to
  test, the rest to train (a label with fewer than 3 files is train only). ``id`` is the path below
  the label folder without extension, so re-encoding a file (mp3 → wav) keeps its split.
- ``csv``: ``audio.csv`` / ``images.csv`` with columns ``id,class,set`` (the thesis's csvs) and flat
  ``audio/`` / ``image/`` folders; ``id`` is a file name with or without extension.

Every file that is not used gets a skip record ``{'path', 'kind', 'reason'}``; nothing is dropped
silently except hidden files (names starting with '.'). A dangling or looping symlink, a symlink to a
directory (not followed) and a directory that cannot be listed get one record each (the directory's
files are unknown, so it counts as one skipped entry).
"""

from __future__ import annotations

import csv
import dataclasses
import errno
import hashlib
import math
import os
import re
import unicodedata
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

NAME = "music_image"  # the TFDS dataset: DATA_DIR/music_image/<config>/<VERSION>
VERSION = "1.0.0"
_CONFIG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_config_name(name) -> str:
    """``name`` if it is one safe path component (letters, digits, ``-``, ``_``, ``.``; first a letter
    or digit: no separators, no ``..``), else ValueError naming the value."""
    if not isinstance(name, str) or not _CONFIG_NAME.match(name):
        raise ValueError(f"dataset config name {name!r}: use letters, digits, '-', '_' and '.' only, starting "
                         "with a letter or digit (no path separators, no '..'), e.g. 'folders-4s-32px'")
    return name


def dataset_dir(data_dir, config_name: str) -> Path:
    """The built dataset's version dir: DATA_DIR/music_image/<config_name>/<version>."""
    return Path(data_dir) / NAME / check_config_name(config_name) / VERSION


DEFAULT_LABELS: tuple[str, ...] = (
    "20th century abstractionism",
    "20th century experimental figure",
    "20th century experimental open view",
    "20th century traditional figure",
    "20th century traditional open view",
    "African traditional folklore",
    "American traditional folklore",
    "Asian traditional folklore",
    "Baroque Classical secular subject",
    "Baroque Classical symbolism",
    "Electronic music",
    "European traditional folklore",
    "Heavy metal",
    "Modern instrumental music",
    "Renaissance secular subject",
    "Renaissance symbolism",
    "Romanticism figure",
    "Romanticism open view",
)

SPLITS: tuple[str, ...] = ("train", "validation", "test")
AUDIO_EXTS = frozenset(".wav .wave .mp3 .flac .ogg .oga .opus .aif .aiff .aifc .au .w64 .caf "
                       ".m4a .aac .wma".split())
IMAGE_EXTS = frozenset(".jpg .jpeg .jpe .png .webp .bmp .gif .tif .tiff".split())
_SET_NAMES = {"train": "train", "training": "train", "val": "validation", "valid": "validation",
              "validation": "validation", "dev": "validation", "test": "test", "testing": "test"}


@dataclasses.dataclass(frozen=True)
class SourceFile:
    """One usable-looking source file: `rel` is its posix path relative to the manual dir."""
    rel: str
    label: int
    split: str


def skip_record(path: str, kind: str, reason: str) -> dict:
    return {"path": path, "kind": kind, "reason": reason}


def normalize_label(name: str) -> str:
    """Case-, underscore- and whitespace-insensitive form used to match folder/csv names to labels."""
    return " ".join(name.replace("_", " ").split()).casefold()


def read_label_file(path) -> tuple[str, ...]:
    """One label per line; blank lines and lines starting with '#' are ignored."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    labels = tuple(s.strip() for s in lines if s.strip() and not s.strip().startswith("#"))
    if not labels:
        raise ValueError(f"{path}: no labels")
    if len({normalize_label(s) for s in labels}) != len(labels):
        raise ValueError(f"{path}: duplicate labels")
    return labels


def split_counts(n: int) -> dict[str, int]:
    """Per-label split sizes ≈ 80/10/10: ceil(n/10) validation and test, the rest train."""
    if n < 3:
        return {"train": n, "validation": 0, "test": 0}
    k = math.ceil(n / 10)
    return {"train": n - 2 * k, "validation": k, "test": k}


def file_id(rel_in_label: str) -> str:
    """The id a split is derived from: path below the label folder, without extension, Unicode NFC
    (so a tree copied from macOS (NFD names) splits the same way)."""
    return unicodedata.normalize("NFC", os.path.splitext(rel_in_label)[0])


def assign_splits(ids: Sequence[str]) -> list[str]:
    """Split name for each id (one label): rank by sha1(id); validation, then test, then train."""
    order = sorted(range(len(ids)), key=lambda i: (hashlib.sha1(ids[i].encode("utf-8")).hexdigest(), ids[i]))
    counts = split_counts(len(ids))
    out = [""] * len(ids)
    for rank, i in enumerate(order):
        if rank < counts["validation"]:
            out[i] = "validation"
        elif rank < counts["validation"] + counts["test"]:
            out[i] = "test"
        else:
            out[i] = "train"
    return out


def _os_reason(path: str, e: OSError) -> str:
    """'dangling symlink (…)', 'symlink loop (…)' or 'unreadable (…)' for an OSError on ``path``."""
    detail = f"{type(e).__name__}: {e.strerror or e}"
    if e.errno == errno.ELOOP:
        return f"symlink loop ({detail})"
    if os.path.islink(path) and e.errno == errno.ENOENT:
        return f"dangling symlink to '{os.readlink(path)}' ({detail})"
    return f"unreadable ({detail})"


def _walk_files(root: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Non-hidden files below root (sorted; os.walk, hidden dirs skipped) whose stat succeeds, and
    [(path, reason)] for the rest: a directory that cannot be listed (os.walk's onerror), a symlink to
    a directory (not followed), a file whose stat fails (dangling symlink, symlink loop, …)."""
    found: list[Path] = []
    bad: list[tuple[Path, str]] = []

    def unlistable(e: OSError) -> None:
        bad.append((Path(e.filename), f"unreadable directory ({type(e).__name__}: {e.strerror or e}): "
                                      "its files could not be listed"))

    for dirpath, dirnames, filenames in os.walk(root, onerror=unlistable):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        bad.extend((Path(dirpath) / d, "symlink to a directory (not followed)")
                   for d in links if not d.startswith("."))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in links)
        for f in filenames:
            if f.startswith("."):
                continue
            p = os.path.join(dirpath, f)
            try:
                os.stat(p)
            except OSError as e:
                bad.append((Path(p), _os_reason(p, e)))
                continue
            found.append(Path(p))
    return sorted(found), sorted(bad)


def _rel(p: Path, manual_dir: Path) -> str:
    return p.relative_to(manual_dir).as_posix()


def _scan_folders_kind(manual_dir: Path, sub: str, kind: str, exts, labels) -> tuple[list[SourceFile], list[dict]]:
    root = manual_dir / sub
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: missing; the folders layout needs {sub}/<label>/<files>")
    by_norm = {normalize_label(s): i for i, s in enumerate(labels)}
    on_disk, unreadable = _walk_files(root)
    skipped = [skip_record(_rel(p, manual_dir), kind, why) for p, why in unreadable]
    per_label: dict[int, list[tuple[str, str]]] = defaultdict(list)  # label -> [(id, rel)]
    for p in on_disk:
        rel = _rel(p, manual_dir)
        parts = p.relative_to(root).parts
        if len(parts) < 2:
            skipped.append(skip_record(rel, kind, f"not inside a label folder ({sub}/<label>/...)"))
            continue
        if parts[0] and normalize_label(parts[0]) not in by_norm:
            skipped.append(skip_record(rel, kind, f"unknown label folder '{parts[0]}' (not in the label list)"))
            continue
        if p.suffix.lower() not in exts:
            skipped.append(skip_record(rel, kind, f"unsupported file extension '{p.suffix}'"))
            continue
        per_label[by_norm[normalize_label(parts[0])]].append((file_id("/".join(parts[1:])), rel))
    files = []
    for label, items in sorted(per_label.items()):
        for (_, rel), split in zip(items, assign_splits([i for i, _ in items])):
            files.append(SourceFile(rel, label, split))
    return files, skipped


def _read_csv_rows(path: Path) -> list[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = {(h or "").strip().lower(): h for h in reader.fieldnames or []}
        id_key = fields.get("id")
        class_key = fields.get("class") or fields.get("classe")
        set_key = fields.get("set") or fields.get("tipo")
        if not (id_key and class_key and set_key):
            raise ValueError(f"{path}: needs columns id,class,set (found {reader.fieldnames})")
        return [(n + 2, {"id": (r.get(id_key) or "").strip(), "class": (r.get(class_key) or "").strip(),
                         "set": (r.get(set_key) or "").strip()}) for n, r in enumerate(reader)]


def _scan_csv_kind(manual_dir: Path, csv_name: str, sub: str, kind: str, exts, labels
                   ) -> tuple[list[SourceFile], list[dict]]:
    csv_path, root = manual_dir / csv_name, manual_dir / sub
    for need in (csv_path, root):
        if not need.exists():
            raise FileNotFoundError(f"{need}: missing; the csv layout needs {csv_name} and {sub}/")
    by_norm = {normalize_label(s): i for i, s in enumerate(labels)}
    on_disk, unreadable = _walk_files(root)
    by_name = {_rel(p, root): p for p in on_disk}
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for p in on_disk:
        by_stem[os.path.splitext(_rel(p, root))[0]].append(p)
    skipped = [skip_record(_rel(p, manual_dir), kind, why) for p, why in unreadable]
    rows_by_id: dict[str, list[tuple[int, dict]]] = defaultdict(list)
    for line, row in _read_csv_rows(csv_path):
        if not row["id"]:
            skipped.append(skip_record(f"{csv_name}:{line}", kind, "empty id"))
            continue
        rows_by_id[row["id"]].append((line, row))
    used: set[Path] = set()
    files = []
    for rid, rows in rows_by_id.items():
        line, row = rows[0]
        where = f"{csv_name}:{line}"
        path = by_name.get(rid)
        if path is None:
            cands = [p for p in by_stem.get(rid, []) if p.suffix.lower() in exts]
            if len(cands) > 1:
                for p in cands:
                    used.add(p)
                    skipped.append(skip_record(_rel(p, manual_dir), kind, f"ambiguous: several files for id '{rid}'"))
                continue
            path = cands[0] if cands else None
        if path is None:
            skipped.append(skip_record(where, kind, f"id '{rid}' listed in {csv_name} but no file in {sub}/"))
            continue
        used.add(path)
        rel = _rel(path, manual_dir)
        if len({(r["class"], r["set"]) for _, r in rows}) > 1:
            skipped.append(skip_record(rel, kind, f"id '{rid}' listed {len(rows)} times in {csv_name} "
                                                  "with different class/set"))
            continue
        for dup_line, _ in rows[1:]:
            skipped.append(skip_record(f"{csv_name}:{dup_line}", kind, f"duplicate row for id '{rid}'"))
        label = by_norm.get(normalize_label(row["class"]))
        split = _SET_NAMES.get(row["set"].lower())
        if label is None:
            skipped.append(skip_record(rel, kind, f"unknown label '{row['class']}' (not in the label list)"))
        elif split is None:
            skipped.append(skip_record(rel, kind, f"unknown set '{row['set']}' (train/validation/test)"))
        elif path.suffix.lower() not in exts:
            skipped.append(skip_record(rel, kind, f"unsupported file extension '{path.suffix}'"))
        else:
            files.append(SourceFile(rel, label, split))
    for p in on_disk:
        if p not in used:
            skipped.append(skip_record(_rel(p, manual_dir), kind, f"not listed in {csv_name}"))
    files.sort(key=lambda f: (f.label, f.rel))
    return files, skipped


def scan(manual_dir, layout: str, labels: Optional[Sequence[str]] = None
         ) -> tuple[list[SourceFile], list[SourceFile], list[dict]]:
    """(audio files, image files, skip records) of a manual dir in the given layout."""
    manual_dir = Path(manual_dir)
    labels = tuple(labels or DEFAULT_LABELS)
    if not manual_dir.is_dir():
        raise FileNotFoundError(f"{manual_dir}: manual dir not found")
    if layout == "folders":
        audio, sa = _scan_folders_kind(manual_dir, "audio", "audio", AUDIO_EXTS, labels)
        images, si = _scan_folders_kind(manual_dir, "image", "image", IMAGE_EXTS, labels)
    elif layout == "csv":
        audio, sa = _scan_csv_kind(manual_dir, "audio.csv", "audio", "audio", AUDIO_EXTS, labels)
        images, si = _scan_csv_kind(manual_dir, "images.csv", "image", "image", IMAGE_EXTS, labels)
    else:
        raise ValueError(f"layout must be 'folders' or 'csv', got {layout!r}")
    return audio, images, sa + si
