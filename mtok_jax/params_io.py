"""Save/load a parameter pytree + its JSON config in a safe, torch-free format.

Layout of a parameter folder ``DIR``:
  DIR/params.safetensors   every leaf, key = '/'.join(path), float32 (or the dtype stored)
  DIR/config.json          the model's config dict (e.g. the BEATs checkpoint ``cfg``)
Used by the converters (BEATs, embedder, metric models) and the demo models alike.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np
from flax import traverse_util
from safetensors.numpy import load_file, save_file

PARAMS_FILE = "params.safetensors"
CONFIG_FILE = "config.json"


def flatten(tree: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested dict of arrays → {'a/b/c': np.ndarray}."""
    flat = traverse_util.flatten_dict(dict(tree), sep="/")
    return {k: np.asarray(v) for k, v in flat.items()}


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """{'a/b/c': array} → nested dict."""
    return traverse_util.unflatten_dict(dict(flat), sep="/")


def save_params(directory: str | os.PathLike, params: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Write ``params`` (nested dict of arrays) and ``config`` (JSON-able dict) into ``directory``."""
    os.makedirs(directory, exist_ok=True)
    flat = {k: np.ascontiguousarray(v) for k, v in flatten(params).items()}
    tmp = os.path.join(directory, PARAMS_FILE + ".tmp")
    save_file(flat, tmp)
    os.replace(tmp, os.path.join(directory, PARAMS_FILE))
    with open(os.path.join(directory, CONFIG_FILE), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)


def load_params(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a folder written by :func:`save_params` → (nested params of np.ndarray, config dict)."""
    ppath = os.path.join(directory, PARAMS_FILE)
    cpath = os.path.join(directory, CONFIG_FILE)
    for p in (ppath, cpath):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{p} not found: expected a folder written by mtok_jax.convert / params_io.save_params")
    with open(cpath) as f:
        config = json.load(f)
    return unflatten(load_file(ppath)), config
