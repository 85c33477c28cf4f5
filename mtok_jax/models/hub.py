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
import types
from typing import Any, Mapping

import huggingface_hub
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

from mtok_jax import pt_checkpoint

CONFIG_FILE = "config.json"
PT_SAFETENSORS, PT_BIN = "model.safetensors", "pytorch_model.bin"  # transformers' PyTorch weight files


def pt_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray] | None:
    """The PyTorch-layout state dict of a transformers folder as numpy (floating leaves float32, bf16 too):
    ``model.safetensors`` (read without torch), else ``pytorch_model.bin`` (torch, ``weights_only``);
    None when it has neither."""
    safe, pt_bin = os.path.join(folder, PT_SAFETENSORS), os.path.join(folder, PT_BIN)
    if os.path.isfile(safe):
        with safe_open(safe, framework="flax") as f:  # jax arrays: bf16 survives (numpy has none)
            state = {k: np.asarray(f.get_tensor(k)) for k in f.keys()}
    elif os.path.isfile(pt_bin):
        state = {k: v.float().numpy() if v.is_floating_point() else v.numpy()
                 for k, v in pt_checkpoint.load(pt_bin).items()}
    else:
        return None
    return {k: v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v
            for k, v in state.items()}


def flax_params_from_pt(state: Mapping[str, np.ndarray], shapes: Mapping[str, Any], source: str,
                        base_model_prefix: str = "") -> dict[str, Any]:
    """transformers' own PyTorch→Flax key and layout conversion (``convert_pytorch_state_dict_to_flax``),
    fed the Flax parameter shapes (a tree of ShapeDtypeStructs) instead of an eagerly initialised model.
    → params with exactly the leaves of `shapes`; a leaf the state lacks is a KeyError naming it."""
    shim = types.SimpleNamespace(params=shapes, base_model_prefix=base_model_prefix)
    flat = traverse_util.flatten_dict(convert_pytorch_state_dict_to_flax(dict(state), shim))
    wanted = traverse_util.flatten_dict(shapes)
    missing = [k for k in wanted if k not in flat]
    if missing:
        raise KeyError(f"{source}: no weights for {len(missing)} Flax leaves, e.g. {'/'.join(missing[0])}")
    return traverse_util.unflatten_dict({k: flat[k] for k in wanted})


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
