"""Where model files come from: a local folder, or a Hugging Face hub id fetched only on request.

:func:`resolve_folder` is the one place that turns a configured path (``model.sd_path``) into a local
folder. Nothing is sent to the Hub unless ``allow_download`` (``model.allow_download``) is True:

1. ``path/subfolder`` or ``path`` itself, whichever holds ``marker`` (an SD root or the part's folder);
2. an existing ``path`` without ``marker`` → ``FileNotFoundError``;
3. a ``path`` that does not exist but has the form of a hub id (``org/name``): its snapshot in the local
   Hugging Face cache (``try_to_load_from_cache``: no network); with ``allow_download`` instead
   ``snapshot_download`` of ``subfolder``'s json, txt, safetensors and msgpack files (cache updated);
4. anything else (an absolute or ``./`` path, ``a/b/c``, …) → ``FileNotFoundError('not found: PATH …')``,
   never an ``HFValidationError``.
"""

from __future__ import annotations

import json
import os
import re

import huggingface_hub

CONFIG_FILE = "config.json"


def read_json(path: str | os.PathLike) -> dict:
    """A model folder's JSON file (config.json, model_index.json, scheduler_config.json, an index) → dict."""
    with open(path) as f:
        return json.load(f)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` (letters, digits, ``._-``; no ``..``, at most 96 chars): could be a hub repo id."""
    return bool(_HUB_ID.match(path)) and ".." not in path and len(path) <= 96 and not path.endswith((".", "-"))


def resolve_folder(path: str | os.PathLike, subfolder: str, marker: str = CONFIG_FILE, *,
                   allow_download: bool = False) -> str:
    """A local folder holding ``marker``: ``path/subfolder``, ``path``, or ``subfolder`` of the hub
    snapshot ``path`` (cached; downloaded only with ``allow_download``). Raises FileNotFoundError."""
    path = os.fspath(path)
    for cand in (os.path.join(path, subfolder), path):
        if os.path.isfile(os.path.join(cand, marker)):
            return cand
    if os.path.exists(path):
        raise FileNotFoundError(f"no {marker} in {path} or {os.path.join(path, subfolder)}")
    if not looks_like_hub_id(path):
        raise FileNotFoundError(f"not found: {path} (no such local folder)")
    if not allow_download:
        cached = huggingface_hub.try_to_load_from_cache(path, f"{subfolder}/{marker}")  # no network
        if isinstance(cached, str):
            return os.path.dirname(cached)
        raise FileNotFoundError(f"not found: {path} (no such local folder, and no {subfolder}/{marker} of hub id "
                                f"{path} in the local Hugging Face cache; set model.allow_download=True to fetch "
                                f"hub id {path})")
    patterns = [f"{subfolder}/*.{ext}" for ext in ("json", "txt", "safetensors", "msgpack")]
    try:
        root = huggingface_hub.snapshot_download(path, allow_patterns=patterns)
    except Exception as e:  # noqa: BLE001 - RepositoryNotFoundError, HTTP / connection errors
        why = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise FileNotFoundError(f"not found: {path} (no such local folder; fetching hub id {path} failed: "
                                f"{type(e).__name__}: {why})") from None
    folder = os.path.join(root, subfolder)
    if not os.path.isfile(os.path.join(folder, marker)):
        raise FileNotFoundError(f"not found: {os.path.join(folder, marker)} (hub id {path} has no {subfolder}/{marker})")
    return folder
