"""Build the exp1 feature cache (mtok_jax.data.features): frozen BEATs features and VAE posterior moments,
computed once per example instead of every step.

  python -m mtok_jax.data.cache --config configs/exp1.py [--overwrite] [--config.a.b=value ...]

Writes DATA_DIR/feature_cache/BUILDER_CONFIG (or `data.feature_cache_dir`); resumable (rerun after an
interruption: written rows are kept), sharded over this process's devices, each process of a
multi-process run taking its share. train.py builds (or finishes) it by itself when `data.feature_cache`
is on and neither BEATs nor the VAE trains; a cache built for other weights, layers, clip length, image
size, dataset or compute dtype is refused (rebuild with --overwrite).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import logging
import os
import sys
from typing import Any, Mapping, Sequence

import filelock
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtok_jax import cli, config_utils, errors
from mtok_jax import system as system_lib
from mtok_jax import tree as tree_lib
from mtok_jax.data import features as store_lib
from mtok_jax.data import pipeline
from mtok_jax.models import diffusion

log = logging.getLogger("mtok_jax.data")


def disabled_reason(config, params: Mapping[str, Any]) -> str | None:
    """Why the cache cannot serve `config` (None: it can): it is off, a BEATs or VAE weight trains, or BEATs
    runs in train mode (its dropout differs every step)."""
    if not config.data.feature_cache:
        return "data.feature_cache is off"
    paths = tree_lib.trainable_paths({k: params[k] for k in ("beats", "vae")}, config.train.trainable)
    trained = sorted({path.split("/")[0] for path in paths})
    if trained:
        return f"train.trainable={config.train.trainable!r} trains {' and '.join(trained)}"
    if config.model.beats_train_mode:
        return "model.beats_train_mode: BEATs' dropout differs every step"
    return None


def digest(tree: Any) -> str:
    """blake2b of a param tree's paths, dtypes, shapes and values (16 hex digits)."""
    h = hashlib.blake2b(digest_size=8)
    for path, leaf in sorted(tree_lib.flatten(tree).items()):
        leaf = np.asarray(leaf)
        h.update(f"{path}:{leaf.dtype}:{leaf.shape};".encode())
        h.update(np.ascontiguousarray(leaf).tobytes())
    return h.hexdigest()


def _dataset_digest(dataset: pipeline.Dataset) -> str:
    h = hashlib.blake2b(digest_size=8)
    for name in sorted(os.listdir(dataset.path)):
        if name.endswith(".json"):
            h.update(name.encode() + open(os.path.join(dataset.path, name), "rb").read())
    return h.hexdigest()


def _frozen(config, params: Mapping[str, Any]) -> dict[str, Any]:
    """BEATs and VAE params as the training step holds them (bfloat16 when model.dtype is)."""
    parts = {"beats": params["beats"], "vae": params["vae"]}
    return tree_lib.cast_floating(parts, jnp.bfloat16) if config.model.dtype == "bfloat16" else parts


def _feature_fn(system: system_lib.System, dtype):
    key = jax.random.key(0)  # (eval mode: no dropout)
    return lambda p, w: system_lib.beats_features(system, {"beats": p}, w, rng=key, train=False).astype(dtype)


def _moments_fn(system: system_lib.System):
    return lambda p, x: diffusion.posterior_moments(system.vae, p, x)


def fingerprint(config, system: system_lib.System, params: Mapping[str, Any], dataset: pipeline.Dataset) -> dict:
    """What the cached values depend on (meta.json); train.py refuses a cache whose fingerprint differs."""
    dtype = store_lib.DTYPES[config.data.feature_cache_dtype]
    clip = jax.ShapeDtypeStruct((1, config_utils.clip_samples(config)), jnp.float32)
    image = jax.ShapeDtypeStruct((1, *config_utils.image_hw(config), 3), jnp.float32)
    frozen = _frozen(config, params)
    splits = (*store_lib.AUDIO_SPLITS, "train_images")
    return {
        "version": store_lib.VERSION,
        "beats_weights": digest(params["beats"]), "vae_weights": digest(params["vae"]),
        "beats_layers": list(config.model.beats_layers), "compute_dtype": config.model.dtype,
        "clip_samples": config_utils.clip_samples(config), "image_hw": list(config_utils.image_hw(config)),
        "bgr": bool(config.data.bgr), "dataset": os.path.abspath(dataset.path),
        "dataset_info": _dataset_digest(dataset),
        "num_examples": {s: int(dataset.labels(s).shape[0]) if dataset.has_split(s) else 0 for s in splits},
        "feature_dtype": config.data.feature_cache_dtype,
        "feature_shape": list(jax.eval_shape(_feature_fn(system, dtype), frozen["beats"], clip).shape[1:]),
        "moments_shape": list(jax.eval_shape(_moments_fn(system), frozen["vae"], image).shape[1:]),
    }


def store_path(config, dataset: pipeline.Dataset) -> str:
    return store_lib.cache_dir(config.data.data_dir, dataset.path.parent.name, config.data.feature_cache_dir)


def ensure(config, system: system_lib.System, params: Mapping[str, Any], *, overwrite: bool = False,
           config_path: str = "CONFIG", progress: bool = True) -> store_lib.FeatureStore:
    """The cache of `config`'s dataset, built or finished here when rows are missing → the open store.
    Raises StaleCacheError for a cache of other inputs unless `overwrite`."""
    dataset = pipeline.open_configured(config)
    path, expected = store_path(config, dataset), fingerprint(config, system, params, dataset)
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise errors.UserError(f"cannot write the feature cache {path} ({e.strerror}): set "
                               f"--config.data.feature_cache_dir to a writable folder, or "
                               f"--config.data.feature_cache=False") from e
    if jax.process_count() > 1:  # the processes agree through barriers
        return _ensure(config, system, params, dataset, path, expected, overwrite, config_path, progress)
    with filelock.FileLock(os.path.join(path, ".lock")):  # one builder among the processes sharing the folder
        return _ensure(config, system, params, dataset, path, expected, overwrite, config_path, progress)


def _ensure(config, system, params, dataset, path, expected, overwrite, config_path, progress):
    store = store_lib.open_store(path)
    if store is not None and not overwrite:
        store_lib.check(store, expected, config_path)
    if store is None or overwrite:
        if jax.process_index() == 0:
            store_lib.create(path, expected)
        _barrier("feature cache created")
        store = store_lib.open_store(path)
    missing = store.missing()
    if missing:
        log.info("feature cache %s: computing %s (once; later runs read it)", path,
                 ", ".join(f"{n} rows of {name}" for name, n in missing.items()))
        _fill(config, system, params, dataset, store, progress and jax.process_index() == 0)
        _barrier("feature cache written")
        store = store_lib.open_store(path)
        if store.missing():
            raise RuntimeError(f"feature cache {path}: rows still missing after the build: {store.missing()}")
    return store


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _fill(config, system: system_lib.System, params: Mapping[str, Any], dataset: pipeline.Dataset,
          store: store_lib.FeatureStore, progress: bool) -> None:
    """Compute the missing rows of every array: chunks of train.batch_size rows (rounded up to this
    process's devices) over a mesh of the local devices; process p takes chunks p, p + P, …"""
    from tqdm.auto import tqdm

    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("data",))
    data, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    frozen = jax.device_put(_frozen(config, params), replicated)
    dtype = store_lib.DTYPES[config.data.feature_cache_dtype]
    fns = {"features": jax.jit(_feature_fn(system, dtype), in_shardings=(replicated, data), out_shardings=data),
           "moments": jax.jit(_moments_fn(system), in_shardings=(replicated, data), out_shardings=data)}
    chunk = -(-max(1, config.train.batch_size) // len(devices)) * len(devices)
    process, processes = jax.process_index(), jax.process_count()
    todo = {name: np.flatnonzero(~store.done(name)) for name in store_lib.arrays(store.meta)}
    bar = tqdm(total=sum(len(v) for v in todo.values()), desc="feature cache", unit="example", disable=not progress)
    with cf.ThreadPoolExecutor(max_workers=4) as pool:
        for name, rows in todo.items():
            kind, split = name.split(".", 1)
            src = dataset.source(split)
            load = ((lambda i: pipeline.record_audio(src[int(i)])) if kind == "features" else
                    (lambda i: pipeline.record_image(src[int(i)], f"{dataset.path}: split '{split}' record {i}",
                                                     config.data.bgr)))
            params_of = frozen["beats"] if kind == "features" else frozen["vae"]
            out, done = store.array(name, "r+"), store.done(name, process)
            for c, start in enumerate(range(0, len(rows), chunk)):
                if c % processes != process:
                    continue
                ids = rows[start:start + chunk]
                x = np.stack(list(pool.map(load, np.pad(ids, (0, chunk - len(ids)), mode="edge"))))
                values = np.asarray(fns[kind](params_of, x))[:len(ids)]
                out[ids] = values
                done[ids] = True
                store.mark_done(name, done, process)
                bar.update(len(ids) * processes)
    bar.close()


# ===================================================================================================
# CLI
# ===================================================================================================
def _define(fv: flags.FlagValues, argv: list[str]) -> None:
    cli.define_config_file("config", None, "experiment config (e.g. configs/exp1.py)", argv, flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "rebuild a cache built for other inputs", flag_values=fv)
    flags.mark_flag_as_required("config", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> str:
    cli.setup_logging()
    fv, _ = cli.parse_command("python -m mtok_jax.data.cache", __doc__, _define, argv)
    config = config_utils.validate(fv.config)
    system, params = system_lib.load_system(config, pipeline.configured_labels(config))
    reason = disabled_reason(config, params)
    if reason and reason != "data.feature_cache is off":
        raise errors.UserError(f"{cli.config_source('config', fv)}: this config cannot use the feature cache: {reason}")
    store = ensure(config, system, params, overwrite=fv.overwrite, config_path=cli.config_source("config", fv))
    print(f"feature cache {store.path} complete ({_size(store.path)})", file=sys.stderr)
    return store.path


def _size(path: str) -> str:
    total = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return f"{total / 2 ** 30:.2f} GiB" if total > 2 ** 28 else f"{total / 2 ** 20:.1f} MiB"


if __name__ == "__main__":
    cli.run(main)
