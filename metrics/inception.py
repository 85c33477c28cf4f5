"""Inception-V3 pool3 features (2048-d) for FID, as ``pytorch_fid.inception.InceptionV3`` with FID weights.

The network is the TF "inception-2015-12-05" graph that pytorch-fid ports to torchvision's Inception-V3
layout with patched blocks (``FIDInceptionA/C/E_1/E_2``): average pools in the A, C and first E
blocks ignore the zero padding (``count_include_pad=False``), the last E block max-pools. Every conv
is conv(bias=False) → BatchNorm(running stats, eps 1e-3) → ReLU. Input handling is pytorch-fid's:
uint8 → [0, 1] → bilinear resize to 299×299 (``F.interpolate(align_corners=False)``, no antialias)
→ [-1, 1].

Parameters follow the FID checkpoint's module names (``Mixed_5b/branch1x1/conv/kernel`` …), NHWC/HWIO,
with BatchNorm as ``bn/{scale,bias,mean,var}``, all in one ``params`` collection.
"""

from __future__ import annotations

import os
from functools import partial
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from mtok_jax import pt_checkpoint
from mtok_jax.params_io import load_params, save_params

INPUT_SIZE = 299
FEATURE_DIM = 2048
BN_EPS = 1e-3
CONFIG = {"model": "inception_v3_fid", "input_size": INPUT_SIZE, "feature_dim": FEATURE_DIM, "bn_eps": BN_EPS}


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference mode: (x − mean)/sqrt(var + eps)·scale + bias over the last axis."""

    eps: float = BN_EPS

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.param("mean", nn.initializers.zeros, (c,))
        var = self.param("var", nn.initializers.ones, (c,))
        mult = scale * jax.lax.rsqrt(var + self.eps)
        return x * mult + (bias - mean * mult)


class BasicConv(nn.Module):
    """torchvision ``BasicConv2d``: conv (no bias) → frozen BN → ReLU. ``padding`` is (pad_h, pad_w)."""

    features: int
    kernel: tuple[int, int]
    strides: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)

    @nn.compact
    def __call__(self, x):
        pad = [(self.padding[0], self.padding[0]), (self.padding[1], self.padding[1])]
        x = nn.Conv(self.features, self.kernel, self.strides, padding=pad, use_bias=False, name="conv")(x)
        return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_3x3_same(x):
    """3×3 stride-1 average pool, padding 1, padding not counted (TF / FID blocks)."""
    return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_same(x):
    return nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)))


def _max_pool_3x3_s2(x):
    return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
    """``FIDInceptionA``: 1×1 | 1×1→5×5 | 1×1→3×3→3×3 | avgpool→1×1 (64+64+96+pool_features ch)."""

    pool_features: int

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(64, (1, 1), name="branch1x1")(x)
        b5 = BasicConv(48, (1, 1), name="branch5x5_1")(x)
        b5 = BasicConv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
        b3 = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
        b3 = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
        bp = BasicConv(self.pool_features, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
    """torchvision ``InceptionB`` (Mixed_6a): grid reduction 35→17."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(384, (3, 3), (2, 2), name="branch3x3")(x)
        bd = BasicConv(64, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = BasicConv(96, (3, 3), (2, 2), name="branch3x3dbl_3")(bd)
        return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
    """``FIDInceptionC``: factorised 7×7 branches, 4×192 channels out."""

    channels_7x7: int

    @nn.compact
    def __call__(self, x):
        c7 = self.channels_7x7
        b1 = BasicConv(192, (1, 1), name="branch1x1")(x)
        b7 = BasicConv(c7, (1, 1), name="branch7x7_1")(x)
        b7 = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
        bd = BasicConv(c7, (1, 1), name="branch7x7dbl_1")(x)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
        bd = BasicConv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
        bd = BasicConv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
        bd = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
        bp = BasicConv(192, (1, 1), name="branch_pool")(_avg_pool_3x3_same(x))
        return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
    """torchvision ``InceptionD`` (Mixed_7a): grid reduction 17→8."""

    @nn.compact
    def __call__(self, x):
        b3 = BasicConv(192, (1, 1), name="branch3x3_1")(x)
        b3 = BasicConv(320, (3, 3), (2, 2), name="branch3x3_2")(b3)
        b7 = BasicConv(192, (1, 1), name="branch7x7x3_1")(x)
        b7 = BasicConv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
        b7 = BasicConv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
        b7 = BasicConv(192, (3, 3), (2, 2), name="branch7x7x3_4")(b7)
        return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
    """``FIDInceptionE_1`` (pool='avg', padding not counted) / ``FIDInceptionE_2`` (pool='max')."""

    pool: str

    @nn.compact
    def __call__(self, x):
        b1 = BasicConv(320, (1, 1), name="branch1x1")(x)
        b3 = BasicConv(384, (1, 1), name="branch3x3_1")(x)
        b3 = jnp.concatenate([
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
        ], axis=-1)
        bd = BasicConv(448, (1, 1), name="branch3x3dbl_1")(x)
        bd = BasicConv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
        bd = jnp.concatenate([
            BasicConv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
            BasicConv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
        ], axis=-1)
        pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3_same(x)
        bp = BasicConv(192, (1, 1), name="branch_pool")(pooled)
        return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3Pool3(nn.Module):
    """FID Inception-V3 up to the final average pool: x [B, 299, 299, 3] in [-1, 1] → [B, 2048]."""

    @nn.compact
    def __call__(self, x):
        x = BasicConv(32, (3, 3), (2, 2), name="Conv2d_1a_3x3")(x)
        x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)
        x = BasicConv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = BasicConv(80, (1, 1), name="Conv2d_3b_1x1")(x)
        x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)
        x = _max_pool_3x3_s2(x)
        x = InceptionA(32, name="Mixed_5b")(x)
        x = InceptionA(64, name="Mixed_5c")(x)
        x = InceptionA(64, name="Mixed_5d")(x)
        x = InceptionB(name="Mixed_6a")(x)
        x = InceptionC(128, name="Mixed_6b")(x)
        x = InceptionC(160, name="Mixed_6c")(x)
        x = InceptionC(160, name="Mixed_6d")(x)
        x = InceptionC(192, name="Mixed_6e")(x)
        x = InceptionD(name="Mixed_7a")(x)
        x = InceptionE("avg", name="Mixed_7b")(x)
        x = InceptionE("max", name="Mixed_7c")(x)
        return jnp.mean(x, axis=(1, 2))


# ----------------------------------------------------------------------------------------------
# Input preprocessing (pytorch-fid): resize to 299 bilinear (align_corners=False), scale to [-1, 1].

def bilinear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] float32 weights of torch's 1-D bilinear resize (align_corners=False, no antialias).

    Source coordinate s = (d + 0.5)·n_in/n_out − 0.5, clamped at 0; taps floor(s) and floor(s)+1
    (clamped to the last pixel) with weights 1 − frac and frac. s is rounded to float32 once, after a
    fused multiply-add, as torch's CPU kernel computes it (the weights then agree bit for bit).
    """
    scale = np.float64(np.float32(n_in) / np.float32(n_out))
    src = ((np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)  # fma(s, d+½, −½)
    src = np.maximum(src, np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    w = np.zeros((n_out, n_in), np.float32)
    rows = np.arange(n_out)
    np.add.at(w, (rows, i0), 1 - frac)
    np.add.at(w, (rows, i1), frac)
    return w


def preprocess(images: jax.Array, size: int = INPUT_SIZE) -> jax.Array:
    """uint8 (or 0..255 float) [B, H, W, 3] → float32 [B, size, size, 3] in [-1, 1], as pytorch-fid."""
    x = images.astype(jnp.float32) / 255.0
    h, w = x.shape[1], x.shape[2]
    if (h, w) != (size, size):
        wh = jnp.asarray(bilinear_resize_matrix(h, size))
        ww = jnp.asarray(bilinear_resize_matrix(w, size))
        hp = jax.lax.Precision.HIGHEST
        x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=hp)
        x = jnp.einsum("pw,bowc->bopc", ww, x, precision=hp)
    return 2.0 * x - 1.0


@partial(jax.jit, static_argnums=0)
def _pool3_batch(model: InceptionV3Pool3, params, images):
    return model.apply({"params": params}, preprocess(images))


def pool3_features(model: InceptionV3Pool3, params, images, batch_size: int = 50) -> np.ndarray:
    """Pool3 features of uint8 images [N, H, W, 3] (any H, W) → float32 [N, 2048].

    Runs jitted in fixed-size batches (the last one zero-padded), so one compile serves any N.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got {images.shape}")
    n = images.shape[0]
    bs = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, bs):
        chunk = images[start:start + bs]
        if chunk.shape[0] < bs:
            pad = np.zeros((bs - chunk.shape[0],) + chunk.shape[1:], chunk.dtype)
            chunk = np.concatenate([chunk, pad])
        out.append(np.asarray(_pool3_batch(model, params, jnp.asarray(chunk)))[: n - start])
    return np.concatenate(out) if out else np.zeros((0, FEATURE_DIM), np.float32)


# ----------------------------------------------------------------------------------------------
# Parameters: shapes, random init (demo / benchmarks), conversion from the FID checkpoint.

def param_shapes(model: InceptionV3Pool3 | None = None) -> dict[str, Any]:
    """Nested dict of ``jax.ShapeDtypeStruct`` for every parameter (no compute)."""
    model = model or InceptionV3Pool3()
    x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
    return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape, x.dtype)))["params"]


def random_params(seed: int = 0) -> dict[str, Any]:
    """Random parameters with the full architecture, in milliseconds (numpy, no jit).

    Conv kernels ~ N(0, 2/fan_in) (He); BN scale ~ U(0.8, 1.2), bias ~ N(0, 0.1²), running mean
    ~ N(0, 0.1²), running var ~ U(0.5, 1.5): activations keep a sensible scale through 94 convs.
    """
    rng = np.random.default_rng(seed)
    flat = traverse_util.flatten_dict(param_shapes())
    out = {}
    for path, sd in flat.items():
        name, shape = path[-1], sd.shape
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
        elif name == "scale":
            v = rng.uniform(0.8, 1.2, shape)
        elif name in ("bias", "mean"):
            v = rng.standard_normal(shape) * 0.1
        elif name == "var":
            v = rng.uniform(0.5, 1.5, shape)
        else:
            raise KeyError(f"unexpected parameter {'/'.join(path)}")
        out[path] = v.astype(np.float32)
    return traverse_util.unflatten_dict(out)


_BN_NAMES = {"weight": "scale", "bias": "bias", "running_mean": "mean", "running_var": "var"}
_IGNORED_PREFIXES = ("fc.", "AuxLogits.")


def params_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """FID checkpoint ``state_dict`` (``pt_inception-2015-12-05-*.pth`` keys) → our params.

    ``X.conv.weight`` [O, I, kh, kw] → ``X/conv/kernel`` [kh, kw, I, O]; ``X.bn.{weight, bias,
    running_mean, running_var}`` → ``X/bn/{scale, bias, mean, var}``; ``fc.*``, ``AuxLogits.*`` and
    ``num_batches_tracked`` are not part of pool3 and are dropped. Checks names and shapes.
    """
    flat = {}
    for key, value in state_dict.items():
        if key.startswith(_IGNORED_PREFIXES) or key.endswith("num_batches_tracked"):
            continue
        v = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, np.float32)
        parts = key.split(".")
        if parts[-2] == "conv" and parts[-1] == "weight":
            flat[tuple(parts[:-1]) + ("kernel",)] = np.ascontiguousarray(v.transpose(2, 3, 1, 0))
        elif parts[-2] == "bn" and parts[-1] in _BN_NAMES:
            flat[tuple(parts[:-1]) + (_BN_NAMES[parts[-1]],)] = v
        else:
            raise KeyError(f"unexpected key in the Inception checkpoint: {key}")
    expected = traverse_util.flatten_dict(param_shapes())
    missing = sorted("/".join(k) for k in expected.keys() - flat.keys())
    extra = sorted("/".join(k) for k in flat.keys() - expected.keys())
    wrong = sorted("/".join(k) for k in expected.keys() & flat.keys() if tuple(expected[k].shape) != flat[k].shape)
    if missing or extra or wrong:
        raise ValueError(f"Inception checkpoint mismatch: missing {missing[:5]}…({len(missing)}), "
                         f"unexpected {extra[:5]}…({len(extra)}), wrong shape {wrong[:5]}…({len(wrong)})")
    return traverse_util.unflatten_dict(flat)


def convert_checkpoint(pth_path: str | os.PathLike, out_dir: str | os.PathLike, *, trusted: bool = False) -> str:
    """``pt_inception-2015-12-05-*.pth`` → params_io folder ``out_dir`` (needs torch). Returns out_dir.
    ``trusted``: allow full unpickling (:func:`mtok_jax.pt_checkpoint.load`)."""
    state_dict = pt_checkpoint.load(pth_path, trusted=trusted)
    save_params(out_dir, params_from_torch(state_dict), {**CONFIG, "source": os.path.basename(str(pth_path))})
    return str(out_dir)


def load_inception(directory: str | os.PathLike) -> tuple[InceptionV3Pool3, dict[str, Any]]:
    """params_io folder (from :func:`convert_checkpoint` or the demo) → (model, params as jnp arrays)."""
    params, config = load_params(directory)
    if config.get("model") != CONFIG["model"]:
        raise ValueError(f"{directory}: config model={config.get('model')!r}, expected {CONFIG['model']!r}")
    return InceptionV3Pool3(), jax.tree_util.tree_map(jnp.asarray, params)


def save_random_inception(directory: str | os.PathLike, seed: int = 0) -> None:
    """Write a random-init full-size Inception in the converted format (demo / benchmarks)."""
    save_params(directory, random_params(seed), {**CONFIG, "source": f"random(seed={seed})"})


__all__: Sequence[str] = [
    "InceptionV3Pool3", "bilinear_resize_matrix", "preprocess", "pool3_features", "param_shapes",
    "random_params", "params_from_torch", "convert_checkpoint", "load_inception", "save_random_inception",
]
