"""Load, override and validate experiment configs (`configs/*.py` → locked `ml_collections.ConfigDict`).

Entry points parse `--config` with `ml_collections.config_flags` (lock_config=True); library code and
tests use :func:`load_config`, which gives the same result for the same `a.b=value` overrides. Unknown
keys are errors in both paths (the config is locked), and :func:`validate` checks the values.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import os
import re
from typing import Sequence

import ml_collections

from mtok_jax.errors import ConfigError

_DTYPES = ("float32", "bfloat16")
_SCHEDULES = ("cosine", "constant")
_SAMPLERS = ("pndm", "ddim", "dpm", "euler")
_PARTS = ("beats", "embedder", "text", "unet", "vae")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Run `get_config()` of the config file at `path`, apply 'a.b=value' overrides, validate.

    Values are parsed as Python literals when possible (`3`, `1e-5`, `(3, 7, 11)`, `True`), otherwise
    kept as strings; `ml_collections` then type-checks them against the existing field.
    """
    path = os.fspath(path)
    spec = importlib.util.spec_from_file_location(f"_mtok_config_{abs(hash(path))}", path)
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"config file {path} not found")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.lock()
    for item in overrides:
        key, sep, raw = item.removeprefix("--config.").partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form a.b=value")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        _set(config, key, value)
    validate(config)
    return config


def _set(config: ml_collections.ConfigDict, dotted: str, value) -> None:
    parts = dotted.split(".")
    node = config
    for depth, name in enumerate(parts):
        keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if name not in keys:
            close = difflib.get_close_matches(name, keys, n=1)
            raise unknown_key_error(dotted, ".".join(parts[:depth] + close + parts[depth + 1:]) if close else None)
        if depth < len(parts) - 1:
            node = node[name]
    leaf = parts[-1]
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    try:
        setattr(node, leaf, value)
    except TypeError as e:  # ml_collections type check: the message names the field and both types
        raise ConfigError(f"{dotted}={value!r}: {' '.join(str(e).split())}") from e


def unknown_key_error(dotted: str, suggestion: str | None = None) -> ConfigError:
    """The error for an override of a key the config does not have (`suggestion`: a close existing key)."""
    hint = f"did you mean {suggestion}?" if suggestion else "see configs/default.py for the keys"
    return ConfigError(f"unknown config key {dotted} ({hint})")


# Numeric bounds, one key each: key → requirement (a key of _BOUNDS).
_BOUNDS = {
    "> 0": lambda v: v > 0,
    ">= 0": lambda v: v >= 0,
    "in [0, 1)": lambda v: 0 <= v < 1,
    ">= -1": lambda v: v >= -1,
    "a positive multiple of 8": lambda v: v > 0 and v % 8 == 0,
}
_RANGES = {
    "train.epochs": "> 0", "train.batch_size": "> 0", "train.grad_accum": "> 0", "train.val_batch_size": "> 0",
    "train.max_steps": ">= -1",  # -1: all epochs; 0: stop before the first step
    "train.lr": "> 0", "train.warmup_steps": ">= 0",
    "train.b1": "in [0, 1)", "train.b2": "in [0, 1)", "train.eps": "> 0", "train.weight_decay": ">= 0",
    "train.lambda_l1": ">= 0", "train.lambda_l2": ">= 0", "train.lambda_cl": ">= 0",
    "train.log_every": "> 0", "train.checkpoint_every": "> 0",
    "data.clip_seconds": "> 0", "data.image_size": "a positive multiple of 8",
    "sample.steps": "> 0", "sample.num_images": "> 0", "sample.images_per_device": "> 0",
}


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check the values of a config; raise ConfigError (a ValueError) naming the first bad key and its
    value, e.g. `invalid config: train.grad_accum=0 must be > 0`. Returns `config`."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(f"invalid config: {msg}")

    for key, requirement in _RANGES.items():
        value = _get(config, key)
        need(_BOUNDS[requirement](value), f"{key}={value!r} must be {requirement}")
    m, t, p = config.model, config.train, config.prompt
    need(m.dtype in _DTYPES, f"model.dtype={m.dtype!r} not in {_DTYPES}")
    need(len(m.beats_layers) > 0 and all(isinstance(i, int) and i >= 0 for i in m.beats_layers),
         f"model.beats_layers={m.beats_layers!r} must be non-empty 0-based block indices")
    for name in ("train", "inference"):
        n = p[name].count(p.placeholder)
        need(n == 1, f"prompt.{name}={p[name]!r} must contain the placeholder {p.placeholder!r} exactly once (has {n})")
    need(t.schedule in _SCHEDULES, f"train.schedule={t.schedule!r} not in {_SCHEDULES}")
    try:
        pattern = re.compile(t.trainable)
    except re.error as e:
        raise ConfigError(f"invalid config: train.trainable={t.trainable!r} is not a regex: {e}") from e
    need(any(pattern.match(part) for part in _PARTS),
         f"train.trainable={t.trainable!r} matches none of the parts {_PARTS}")
    sizes = (config.mesh.data, config.mesh.fsdp)
    need(all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1,
         f"mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}: sizes must be positive, with at most one -1")
    s = config.sample
    need(s.scheduler in _SAMPLERS, f"sample.scheduler={s.scheduler!r} not in {_SAMPLERS}")
    return config


def _get(config: ml_collections.ConfigDict, dotted: str):
    """The value at a dotted key ('train.lr')."""
    node = config
    for name in dotted.split("."):
        node = node[name]
    return node
