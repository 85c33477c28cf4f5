"""Parameter trees: leaf paths, the trainable / frozen split, the frozen weights' compute dtype.

A leaf's path is 'part/sub/.../name' (parts: constants.PARTS). `train.trainable` is a regex matched
from the start of a path up to a path separator, so `embedder|beats|unet` selects whole towers and
`unet/.*attn.*` selects leaves inside one.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import traverse_util


def path_matcher(pattern: str):
    """Predicate on leaf paths: `pattern` matched from the start up to a path separator or the end."""
    rx = re.compile(rf"(?:{pattern})(?:/|$)")
    return lambda path: rx.match(path) is not None


def trainable_paths(params: Mapping[str, Any], pattern: str) -> list[str]:
    """Sorted leaf paths of `params` that `pattern` selects."""
    is_trainable = path_matcher(pattern)
    return sorted(k for k in flatten(params) if is_trainable(k))


def split_params(params: Mapping[str, Any], pattern: str) -> tuple[dict, dict]:
    """→ (trainable, frozen): two nested dicts that partition the leaves of `params` by `pattern`."""
    is_trainable = path_matcher(pattern)
    flat = flatten(params)
    trainable = {k: v for k, v in flat.items() if is_trainable(k)}
    if not trainable:
        raise ValueError(f"train.trainable={pattern!r} selects no parameter")
    frozen = {k: v for k, v in flat.items() if not is_trainable(k)}
    return (traverse_util.unflatten_dict(trainable, sep="/"), traverse_util.unflatten_dict(frozen, sep="/"))


def merge_params(trainable: Mapping[str, Any], frozen: Mapping[str, Any]) -> dict:
    """Inverse of :func:`split_params`."""
    flat = flatten(frozen)
    flat.update(flatten(trainable))
    return traverse_util.unflatten_dict(flat, sep="/")


def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
    """Nested params (dicts or FrozenDicts) → {'a/b/c': leaf}, the paths `train.trainable` matches."""
    return traverse_util.flatten_dict(_plain(tree), sep="/")


def _plain(tree: Mapping[str, Any]) -> dict:
    """FrozenDict / Mapping → plain nested dict (leaves untouched)."""
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    return tree


def cast_floating(tree: Any, dtype: Any) -> Any:
    """Floating leaves of `tree` cast to `dtype` (integer leaves untouched): the frozen weights in the
    compute dtype, while what trains keeps its float32 master copy. Leaves already in `dtype` are
    returned as they are (no copy); ShapeDtypeStruct leaves give ShapeDtypeStructs."""

    def cast(x):
        if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
            return x
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, tree)
