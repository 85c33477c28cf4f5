"""Load, override and validate experiment configs (`configs/*.py` → locked `ml_collections.ConfigDict`).

One override syntax: entry points and :func:`load_config` both parse `--config.a.b=value` with
`ml_collections.config_flags` (:func:`define_config_flag`, lock_config=True), so an unknown key is an
error everywhere; :func:`validate` checks the values. A run's `WORKDIR/config.json` loads the same way.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from typing import Sequence

import ml_collections
from absl import flags

from mtok_jax.constants import ATTENTIONS, BEATS_ATTENTIONS, CONVS, DTYPES, PARTS, REFERENCE_SAMPLE_RATE, SAMPLE_RATE, SAMPLERS
from mtok_jax.errors import ConfigError

flags.disclaim_key_flags()  # the --config flag defined here belongs to the entry point (its --help lists it)

_SCHEDULES = ("cosine", "constant")


RUN_CONFIG = "config.json"  # WORKDIR/config.json: the config a run was trained with (written by train.py)
_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The config file at `path` (a `configs/*.py` with `get_config()`, or a run's `config.json`) with the
    'a.b=value' (or '--config.a.b=value') overrides applied exactly as the entry points' `--config.a.b=value`
    flags (ml_collections config_flags, locked), validated."""
    argv = ["load_config"] + [f"--config.{o.removeprefix('--config.')}" for o in overrides]
    fv = flags.FlagValues()
    try:
        holder = call_with_key_errors(define_config_flag, argv[1:], fv, argv, os.fspath(path))
        call_with_key_errors(fv, argv[1:], argv)
    except flags.Error as e:  # a value config_flags cannot parse or ml_collections' type check refuses
        raise ConfigError(" ".join(str(e).split())) from e
    return validate(holder.value)


def define_config_flag(flag_values, argv: Sequence[str], path: str | None, name: str = "config",
                       help_string: str = "Config file (configs/*.py) or a run's config.json."):
    """Define the locked `--NAME` config flag on `flag_values` (overrides `--NAME.a.b=value` read from
    `argv`): a run's `config.json` as a config dict, anything else as a config file (None: no default)."""
    from ml_collections import config_flags

    if path is not None and path.endswith(".json"):
        return config_flags.DEFINE_config_dict(name, read_run_config(path), help_string, flag_values=flag_values,
                                               lock_config=True, sys_argv=list(argv))
    return config_flags.DEFINE_config_file(name, path, help_string, flag_values=flag_values, lock_config=True,
                                           sys_argv=list(argv))


def read_run_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
    """A run's `config.json` on top of `configs/default.py` (unlocked, not validated): the field types are
    the config files' (JSON lists become tuples again) and keys added to the code since the run keep
    their defaults."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no run config")
    with open(path, encoding="utf-8") as f:
        values = json.load(f)
    config = _exec_config(_DEFAULT)

    def merge(node: ml_collections.ConfigDict, new: dict) -> None:
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
                merge(node[key], value)
            elif key in node and node[key] is not None and value is not None:
                setattr(node, key, type(node[key])(value) if isinstance(node[key], tuple) else value)
            else:  # a key of the run's config file that default.py lacks, or a None either side
                node[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value

    merge(config, values)
    return config


def _exec_config(path: str) -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location(f"_mtok_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def call_with_key_errors(fn, args: Sequence[str], *fn_args, **fn_kwargs):
    """`fn(*fn_args, **fn_kwargs)`; config_flags' KeyError / AttributeError for an unknown `--config.a.name`
    key in `args` (message: 'name', then `Did you mean "x"`) becomes a ConfigError naming the whole key."""
    try:
        return fn(*fn_args, **fn_kwargs)
    except (AttributeError, KeyError) as e:
        inner = e.args[0] if e.args else e
        text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
        match = re.match(r"'([^']*)'", text)
        guess = re.search(r'Did you mean "([^"]+)"', text)
        for arg in args:
            key = re.match(r"-{1,2}\w+\.([\w.]+)", arg)
            if match and key and match.group(1) in key.group(1).split("."):
                parts = key.group(1).split(".")
                suggestion = guess and ".".join(guess.group(1) if p == match.group(1) else p for p in parts)
                raise unknown_key_error(key.group(1), suggestion or None) from e
        raise


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
    need(m.dtype in DTYPES, f"model.dtype={m.dtype!r} not in {DTYPES}")
    need(m.attention in ATTENTIONS, f"model.attention={m.attention!r} not in {ATTENTIONS}")
    need(m.conv in CONVS, f"model.conv={m.conv!r} not in {CONVS}")
    need(m.beats_attention in BEATS_ATTENTIONS, f"model.beats_attention={m.beats_attention!r} not in {BEATS_ATTENTIONS}")
    need(config.data.feature_cache_dtype in DTYPES,
         f"data.feature_cache_dtype={config.data.feature_cache_dtype!r} not in {DTYPES}")
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
    need(any(pattern.match(part) for part in PARTS),
         f"train.trainable={t.trainable!r} matches none of the parts {PARTS}")
    sizes = (config.mesh.data, config.mesh.fsdp)
    need(all(s == -1 or s > 0 for s in sizes) and sizes.count(-1) <= 1,
         f"mesh.data={sizes[0]}, mesh.fsdp={sizes[1]}: sizes must be positive, with at most one -1")
    bad = sorted(set(t.report_to) - {"jsonl", "tensorboard"})
    need(not bad, f"train.report_to={tuple(t.report_to)!r}: unknown {bad} (choose from 'jsonl', 'tensorboard')")
    need(t.sample_every_epochs >= 0 and t.sample_steps > 0,
         f"train.sample_every_epochs={t.sample_every_epochs} must be >= 0 and train.sample_steps={t.sample_steps} > 0")
    need(len(t.profile_steps) == 2 and 0 <= t.profile_steps[0] <= t.profile_steps[1],
         f"train.profile_steps={tuple(t.profile_steps)!r} must be (start, stop) with 0 <= start <= stop")
    s = config.sample
    need(s.scheduler in SAMPLERS, f"sample.scheduler={s.scheduler!r} not in {SAMPLERS}")
    return config


def _get(config: ml_collections.ConfigDict, dotted: str):
    """The value at a dotted key ('train.lr')."""
    node = config
    for name in dotted.split("."):
        node = node[name]
    return node


# ---------------------------------------------------------------------------------------------------
# Values derived from a config (one place for each rule)
# ---------------------------------------------------------------------------------------------------
def sample_rate(config) -> int:
    """Samples per second stored per clip: 16 kHz (the 44.1 kHz quirk `data.audio_44k_as_16k` stores 44.1k)."""
    return REFERENCE_SAMPLE_RATE if config.data.get("audio_44k_as_16k", False) else SAMPLE_RATE


def clip_samples(config) -> int:
    """Samples per clip fed to BEATs: `data.clip_seconds` × :func:`sample_rate`."""
    return int(round(config.data.clip_seconds * sample_rate(config)))


def image_hw(config) -> tuple[int, int]:
    """(height, width) of the training images."""
    if config.data.get("reference_512x320", False):
        return 320, 512
    return int(config.data.image_size), int(config.data.image_size)


def sample_hw(config) -> tuple[int, int]:
    """(height, width) of sampled images: square `data.image_size` (512), also under
    `data.reference_512x320`, which trains on 512×320 but samples at the UNet's default 512×512."""
    return int(config.data.image_size), int(config.data.image_size)
