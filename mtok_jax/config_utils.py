"""Load, override and validate experiment configs (`configs/*.py` → locked `ml_collections.ConfigDict`).

Entry points parse `--config` with `ml_collections.config_flags` (lock_config=True); library code and
tests use :func:`load_config`, which gives the same result for the same `a.b=value` overrides. Unknown
keys are errors in both paths (the config is locked), and :func:`validate` checks the values.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
from typing import Sequence

import ml_collections

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
    *parents, leaf = dotted.split(".")
    node = config
    for p in parents:
        node = getattr(node, p)  # AttributeError for unknown keys (locked config)
    if leaf not in node:
        raise KeyError(f"unknown config key {dotted!r}")
    old = node[leaf]
    if isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(old, tuple) and isinstance(value, list):
        value = tuple(value)
    setattr(node, leaf, value)


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Check the values of a config; raise ValueError naming the first bad field. Returns `config`."""

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ValueError(f"invalid config: {msg}")

    m, t, p, d = config.model, config.train, config.prompt, config.data
    need(m.dtype in _DTYPES, f"model.dtype={m.dtype!r} not in {_DTYPES}")
    need(len(m.beats_layers) > 0 and all(int(i) >= 0 for i in m.beats_layers),
         f"model.beats_layers={m.beats_layers!r} must be non-empty 0-based block indices")
    for name in ("train", "inference"):
        n = p[name].count(p.placeholder)
        need(n == 1, f"prompt.{name}={p[name]!r} must contain the placeholder {p.placeholder!r} exactly once (has {n})")
    need(t.schedule in _SCHEDULES, f"train.schedule={t.schedule!r} not in {_SCHEDULES}")
    need(t.epochs > 0 and t.batch_size > 0 and t.grad_accum > 0 and t.val_batch_size > 0,
         "train.epochs / batch_size / grad_accum / val_batch_size must be positive")
    need(t.lr > 0 and t.warmup_steps >= 0, "train.lr must be > 0 and warmup_steps >= 0")
    need(0 <= t.b1 < 1 and 0 <= t.b2 < 1 and t.eps > 0 and t.weight_decay >= 0, "bad AdamW hyperparameters")
    need(min(t.lambda_l1, t.lambda_l2, t.lambda_cl) >= 0, "loss weights λ must be >= 0")
    need(t.log_every > 0 and t.checkpoint_every > 0, "train.log_every / checkpoint_every must be positive")
    try:
        pattern = re.compile(t.trainable)
    except re.error as e:
        raise ValueError(f"invalid config: train.trainable={t.trainable!r} is not a regex: {e}") from e
    need(any(pattern.match(part) for part in _PARTS),
         f"train.trainable={t.trainable!r} matches none of the parts {_PARTS}")
    sizes = (config.mesh.data, config.mesh.fsdp)
    need(all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1,
         f"mesh sizes {sizes} must be positive, with at most one -1")
    need(d.clip_seconds > 0 and d.image_size > 0 and d.image_size % 8 == 0,
         "data.clip_seconds must be > 0 and data.image_size a positive multiple of 8")
    s = config.sample
    need(s.scheduler in _SAMPLERS, f"sample.scheduler={s.scheduler!r} not in {_SAMPLERS}")
    need(s.steps > 0 and s.num_images > 0, "sample.steps / num_images must be positive")
    return config
