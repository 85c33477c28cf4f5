"""Scaled dot-product attention of the UNet's transformer blocks, chosen per call site (`model.attention`).

Shapes: q [B, T, N, H], k and v [B, S, N, H] → [B, T, N, H]; softmax(q·kᵀ / √H)·v, as diffusers'
``FlaxAttention`` computes it. The choices:

- ``einsum``: diffusers' own ``FlaxAttention`` code (einsum, softmax in the compute dtype) — the reference.
- ``xla``: ``jax.nn.dot_product_attention(implementation="xla")`` at every site (softmax in float32).
- ``cudnn``: cuDNN's fused (flash) attention where it was measured faster on an H100 with SD v1.4 shapes
  — self-attention with ≥ ``CUDNN_MIN_QUERIES`` query tokens (the 64×64 and 32×32 latent levels of
  512 px images: 4× faster forward+backward, 6 GiB → 82 MiB of temporaries at 64×64) and the
  cross-attention of those levels, its 77 keys zero-padded to a multiple of 8 with
  ``key_value_seq_lengths`` = 77 (cuDNN's backward rejects 77 keys; padding without the lengths
  would add a zero key and change the result) — and XLA at the smaller levels, where cuDNN is slower.
  Needs a GPU and a 16-bit compute dtype (cuDNN rejects float32).
- ``auto`` (default): ``cudnn`` on a GPU with a bfloat16 compute dtype, else ``einsum``.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mtok_jax.constants import ATTENTIONS as IMPLEMENTATIONS

CUDNN_MIN_QUERIES = 1024  # query tokens from which cuDNN wins (H100, SD v1.4: 32×32 yes, 16×16 no)
KV_MULTIPLE = 8  # cuDNN's backward needs key lengths that are a multiple of 8


def resolve(name: str, dtype, backend: str | None = None) -> str:
    """`model.attention` → the implementation used: einsum | xla | cudnn (``auto`` decided here).

    Raises ValueError with the fix for an unknown name or cuDNN without a GPU / in float32."""
    backend = backend or jax.default_backend()
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        return "cudnn" if backend == "gpu" and half else "einsum"
    if name == "cudnn" and backend != "gpu":
        raise ValueError(f"model.attention=cudnn needs a GPU (this backend is {backend}): use auto, xla or einsum")
    if name == "cudnn" and not half:
        raise ValueError("model.attention=cudnn needs a 16-bit compute dtype: set --config.model.dtype=bfloat16 "
                         "(or use model.attention=xla)")
    return name


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """How one call site attends: `implementation` of ``jax.nn.dot_product_attention`` (xla | cudnn) and
    the key length the keys/values are zero-padded to (None: as they are)."""
    implementation: str
    pad_keys_to: int | None = None


def site_plan(implementation: str, queries: int, keys: int) -> SitePlan:
    """The plan of a call site with `queries` query and `keys` key tokens under a resolved xla | cudnn."""
    if implementation == "xla" or queries < CUDNN_MIN_QUERIES:
        return SitePlan("xla")
    padded = -(-keys // KV_MULTIPLE) * KV_MULTIPLE
    return SitePlan("cudnn", padded if padded != keys else None)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, plan: SitePlan) -> jax.Array:
    """softmax(q·kᵀ/√H)·v per head: q [B, T, N, H], k/v [B, S, N, H] → [B, T, N, H] (dtype of q)."""
    lengths = None
    if plan.pad_keys_to is not None and plan.pad_keys_to > k.shape[1]:
        s = k.shape[1]
        pad = [(0, 0), (0, plan.pad_keys_to - s), (0, 0), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        lengths = np.full((q.shape[0],), s, np.int32)  # the padded keys are masked out (a constant)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=plan.implementation)
