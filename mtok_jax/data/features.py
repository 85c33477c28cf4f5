"""The exp1 feature cache on disk: frozen BEATs features per clip and VAE posterior moments per image.

When neither BEATs nor the VAE trains (exp1), both are the same every epoch; `python -m mtok_jax.data.cache`
(mtok_jax.data.cache) computes them once and the training step starts at the embedder. Layout of a cache
folder (default DATA_DIR/feature_cache/BUILDER_CONFIG):

  meta.json                        what the values depend on (`fingerprint`): a cache built for other
                                   BEATs or VAE weights, layers, clip length, image size, dataset or
                                   compute dtype is refused (StaleCacheError says how to rebuild it)
  features.<split>.bin             BEATs layers concatenated, [n, T, C] of `feature_dtype` (train,
                                   validation, test: one row per audio record)
  moments.<split>.bin              VAE posterior (mean, log-variance) float32 [n, h, w, 2·4] (train_images:
                                   one row per training image; validation, test: the record's own image)
  done.<array>.<process>.npy       bool [n]: the rows written (a build resumes where it stopped)

Size per 30 s clip at BEATs iter3+ (T = 1,496 tokens, C = 3 · 768): 6.9 MB in bfloat16; per 512 px image
0.13 MB of moments.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

from mtok_jax import errors

VERSION = 1
META = "meta.json"
AUDIO_SPLITS = ("train", "validation", "test")
IMAGE_SPLITS = {"train": "train_images", "validation": "validation", "test": "test"}  # where a split's images are
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
REBUILD = "python -m mtok_jax.data.cache --config CONFIG --overwrite"


class StaleCacheError(errors.UserError, ValueError):
    """The cache was built for other inputs than the config asks for (the message says which and how to
    rebuild it)."""


def cache_dir(data_dir: str, builder_config: str, override: str = "") -> str:
    """`override` (config data.feature_cache_dir) or DATA_DIR/feature_cache/BUILDER_CONFIG."""
    return override or os.path.join(data_dir, "feature_cache", builder_config)


def arrays(meta: Mapping[str, Any]) -> dict[str, tuple[tuple[int, ...], Any]]:
    """{array name: (shape, numpy dtype)} of a cache with this meta."""
    out = {}
    for split in AUDIO_SPLITS:
        n = meta["num_examples"].get(split, 0)
        if n:
            out[f"features.{split}"] = ((n, *meta["feature_shape"]), DTYPES[meta["feature_dtype"]])
    for split in AUDIO_SPLITS:
        images = IMAGE_SPLITS[split]
        n = meta["num_examples"].get(images, 0)
        if meta["num_examples"].get(split, 0) and n:
            out[f"moments.{images}"] = ((n, *meta["moments_shape"]), np.float32)
    return out


@dataclasses.dataclass
class FeatureStore:
    """An open cache folder: `features(split, i)` / `moments(split, i)` read one row (memory-mapped)."""
    path: str
    meta: dict
    _maps: dict = dataclasses.field(default_factory=dict)

    def array(self, name: str, mode: str = "r") -> np.memmap:
        key = (name, mode)
        if key not in self._maps:
            shape, dtype = arrays(self.meta)[name]
            self._maps[key] = np.memmap(os.path.join(self.path, f"{name}.bin"), dtype=dtype, mode=mode, shape=shape)
        return self._maps[key]

    def features(self, split: str, index: int) -> np.ndarray:
        """[T, C] of `feature_dtype`: BEATs features of audio record `index` of `split`."""
        return np.asarray(self.array(f"features.{split}")[index])

    def moments(self, split: str, index: int) -> np.ndarray:
        """float32 [h, w, 2C]: posterior moments of image `index` of IMAGE_SPLITS[split]'s records (for
        'train' an index into train_images)."""
        return np.asarray(self.array(f"moments.{IMAGE_SPLITS[split]}")[index])

    def done(self, name: str, process: Optional[int] = None) -> np.ndarray:
        """bool [n]: rows of array `name` written (by process `process`; None: by any)."""
        out = np.zeros(arrays(self.meta)[name][0][0], bool)
        for f in glob.glob(os.path.join(self.path, f"done.{name}.{'*' if process is None else process}.npy")):
            out |= np.load(f)
        return out

    def mark_done(self, name: str, done: np.ndarray, process: int) -> None:
        """Record this process's written rows (after flushing the array), atomically."""
        self.array(name, "r+").flush()
        path = os.path.join(self.path, f"done.{name}.{process}.npy")
        with open(path + ".tmp", "wb") as f:
            np.save(f, done)
        os.replace(path + ".tmp", path)

    def missing(self) -> dict[str, int]:
        """{array: rows not yet written} of the incomplete arrays."""
        return {name: int((~self.done(name)).sum()) for name in arrays(self.meta) if not self.done(name).all()}

    def batch_shapes(self) -> dict[str, tuple[tuple[int, ...], Any]]:
        """Per-example (shape, dtype) of the batch keys that replace 'audio' and 'image'."""
        return {"features": (tuple(self.meta["feature_shape"]), DTYPES[self.meta["feature_dtype"]]),
                "moments": (tuple(self.meta["moments_shape"]), np.float32)}


def create(path: str, meta: Mapping[str, Any]) -> FeatureStore:
    """A new, empty cache folder (its arrays allocated sparse, nothing marked done)."""
    os.makedirs(path, exist_ok=True)
    for f in glob.glob(os.path.join(path, "done.*.npy")) + glob.glob(os.path.join(path, "*.bin")):
        os.remove(f)
    for name, (shape, dtype) in arrays(meta).items():
        with open(os.path.join(path, f"{name}.bin"), "wb") as f:
            f.truncate(int(np.prod(shape)) * np.dtype(dtype).itemsize)
    tmp = os.path.join(path, META + ".tmp")
    Path(tmp).write_text(json.dumps(dict(meta), indent=2, sort_keys=True))
    os.replace(tmp, os.path.join(path, META))
    return FeatureStore(path, json.loads(Path(path, META).read_text()))


def open_store(path: str) -> Optional[FeatureStore]:
    """The cache at `path`, or None when there is none."""
    meta = Path(path, META)
    if not meta.is_file():
        return None
    return FeatureStore(path, json.loads(meta.read_text()))


def check(store: FeatureStore, expected: Mapping[str, Any], config_path: str = "CONFIG") -> None:
    """Raise StaleCacheError naming the first fingerprint entry that differs from `expected`."""
    found = {k: v for k, v in store.meta.items()}
    for key in sorted(set(expected) | set(found)):
        if _normal(found.get(key)) != _normal(expected.get(key)):
            raise StaleCacheError(
                f"feature cache {store.path} is stale: it was built with {key}={found.get(key)!r}, the config "
                f"asks for {expected.get(key)!r}; rebuild it: {REBUILD.replace('CONFIG', config_path)} (or train "
                f"without it: --config.data.feature_cache=False)")


def _normal(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples → lists, as meta.json stores them
