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
- ``blocked``: diffusers' computation one head and one block of ≤ ``MAX_BLOCK_QUERIES`` queries at a
  time (:func:`loop_heads_and_query_blocks`) where one head has ≥ ``MIN_BLOCKED_SCORES`` scores
  (self-attention from 32×32 latents), so that a block's scores stay in a CPU core's cache instead of
  streaming [N, T, S] through memory for each softmax pass (2 cores, float32: 8 heads × 1,024 tokens
  24 → 9 ms, × 4,096 tokens 338 → 140 ms), with a flash-attention backward (a ``jax.lax.map`` left to
  autodiff was slower than einsum's backward); einsum elsewhere. SD v1.4 at 256 px, 2 cores: UNet forward
  881 → 824 ms, cached exp1 step 2,249 → 2,187 ms.
- ``auto`` (default): ``cudnn`` on a GPU with a bfloat16 compute dtype, ``blocked`` on a CPU, else ``einsum``.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mtok_jax.constants import ATTENTIONS as IMPLEMENTATIONS

CUDNN_MIN_QUERIES = 1024  # query tokens from which cuDNN wins (H100, SD v1.4: 32×32 yes, 16×16 no)
KV_MULTIPLE = 8  # cuDNN's backward needs key lengths that are a multiple of 8
MAX_BLOCK_QUERIES = 768  # blocked: queries per block (2 cores, float32: 512–768 fastest at 1,024–4,096 tokens)
MIN_BLOCKED_SCORES = 1 << 20  # blocked: loop where one head's scores T·S are at least this (4 MiB in float32)


def resolve(name: str, dtype, backend: str | None = None) -> str:
    """`model.attention` → the implementation used: einsum | xla | cudnn | blocked (``auto`` decided here).

    Raises ValueError with the fix for an unknown name or cuDNN without a GPU / in float32."""
    backend = backend or jax.default_backend()
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"model.attention={name!r}: expected one of {', '.join(IMPLEMENTATIONS)}")
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if name == "auto":
        return "cudnn" if backend == "gpu" and half else "blocked" if backend == "cpu" else "einsum"
    if name == "cudnn" and backend != "gpu":
        raise ValueError(f"model.attention=cudnn needs a GPU (this backend is {backend}): use auto, xla or einsum")
    if name == "cudnn" and not half:
        raise ValueError("model.attention=cudnn needs a 16-bit compute dtype: set --config.model.dtype=bfloat16 "
                         "(or use model.attention=xla)")
    return name


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """How one call site attends: `implementation` (xla | cudnn: of ``jax.nn.dot_product_attention``;
    blocked: :func:`blocked_attention`), the key length the keys/values are zero-padded to (None: as they
    are) and, for blocked, the number of query blocks (0: no loop, all heads at once)."""
    implementation: str
    pad_keys_to: int | None = None
    query_blocks: int = 0


def query_blocks(queries: int, keys: int) -> int:
    """blocked's query blocks for one head's [queries, keys] scores: 0 (no loop) below MIN_BLOCKED_SCORES,
    else the fewest blocks of equal size ≤ MAX_BLOCK_QUERIES (a divisor of `queries`)."""
    if queries * keys < MIN_BLOCKED_SCORES:
        return 0
    return next(n for n in range(1, queries + 1) if queries % n == 0 and queries // n <= MAX_BLOCK_QUERIES)


def site_plan(implementation: str, queries: int, keys: int) -> SitePlan:
    """The plan of a call site with `queries` query and `keys` key tokens under a resolved xla | cudnn |
    blocked."""
    if implementation == "blocked":
        return SitePlan("blocked", query_blocks=query_blocks(queries, keys))
    if implementation == "xla" or queries < CUDNN_MIN_QUERIES:
        return SitePlan("xla")
    padded = -(-keys // KV_MULTIPLE) * KV_MULTIPLE
    return SitePlan("cudnn", padded if padded != keys else None)


def loop_heads_and_query_blocks(attend: Callable, per_query, per_key, blocks: int):
    """``attend(per_query, per_key)`` for each head, and within a head for each of `blocks` equal blocks of
    queries (``jax.lax.map``: one after the other, the same numbers as all at once).

    per_query / per_key: pytrees of arrays with heads on axis 0 (None leaves allowed); per_query's have
    the queries on axis 2 ([N, X, T, ...]), per_key's are whole ([N, X, S, ...]). attend gets them
    without the head axis, per_query's with T/blocks queries on axis 1, and returns [X, T/blocks, ...]
    → [N, X, T, ...]."""
    def head(x):
        queries, keys = x
        if blocks <= 1:
            return attend(queries, keys)
        split = jax.tree.map(lambda a: jnp.moveaxis(a.reshape(a.shape[0], blocks, -1, *a.shape[2:]), 1, 0), queries)
        out = jax.lax.map(lambda q_block: attend(q_block, keys), split)          # [blocks, X, T/blocks, ...]
        return jnp.moveaxis(out, 0, 1).reshape(out.shape[1], -1, *out.shape[3:])
    return jax.lax.map(head, (per_query, per_key))


def _attend(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """diffusers' ``FlaxAttention`` computation (scores and softmax in the dtype of q): q [..., t, N, H],
    k/v [..., S, N, H] → [..., t, N, H]."""
    scores = jnp.einsum("...tnh,...snh->...nts", q, k) * q.shape[-1] ** -0.5
    return jnp.einsum("...nts,...snh->...tnh", jax.nn.softmax(scores, axis=-1), v)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, blocks: int) -> jax.Array:
    """:func:`_attend` one head and block of queries at a time (``blocks``; 0: all heads at once): q [B, T,
    N, H], k/v [B, S, N, H] → [B, T, N, H]. Its gradient is computed block by block too (the flash-attention
    backward: the weights recomputed per block, dK and dV summed over the blocks)."""
    if blocks == 0:
        return _attend(q, k, v)
    return _blocked(q, k, v, blocks)


def _blocked_forward(q, k, v, blocks):
    heads = lambda x: jnp.moveaxis(x, 2, 0)[:, :, :, None]  # noqa: E731 ([B, T, N, H] → [N, B, T, 1, H])
    attend = lambda queries, keys: _attend(queries, *keys)  # noqa: E731
    out = loop_heads_and_query_blocks(attend, heads(q), (heads(k), heads(v)), blocks)  # [N, B, T, 1, H]
    return jnp.moveaxis(out[:, :, :, 0], 0, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked(q, k, v, blocks):
    return _blocked_forward(q, k, v, blocks)


def _blocked_fwd(q, k, v, blocks):
    out = _blocked_forward(q, k, v, blocks)
    return out, (q, k, v, out)


def _blocked_bwd(blocks, residuals, d_out):
    q, k, v, out = residuals
    scale = q.shape[-1] ** -0.5
    heads = lambda x: jnp.moveaxis(x, 2, 0)  # noqa: E731 ([B, T, N, H] → [N, B, T, H])

    def head(x):
        qn, kn, vn, on, dn = x                                                     # [B, T|S, H]
        split = lambda a: jnp.moveaxis(a.reshape(a.shape[0], blocks, -1, a.shape[-1]), 1, 0)  # noqa: E731

        def block(carry, y):
            dk, dv = carry
            qb, ob, db = y                                                          # [B, t, H]
            weights = jax.nn.softmax(jnp.einsum("bth,bsh->bts", qb, kn) * scale, axis=-1)
            d_weights = jnp.einsum("bth,bsh->bts", db, vn)
            d_scores = weights * (d_weights - jnp.sum(db * ob, axis=-1, keepdims=True))  # softmax's backward
            dq = jnp.einsum("bts,bsh->bth", d_scores, kn) * scale
            return (dk + jnp.einsum("bts,bth->bsh", d_scores, qb) * scale,
                    dv + jnp.einsum("bts,bth->bsh", weights, db)), dq
        (dk, dv), dq = jax.lax.scan(block, (jnp.zeros_like(kn), jnp.zeros_like(vn)),
                                    (split(qn), split(on), split(dn)))
        return jnp.moveaxis(dq, 0, 1).reshape(qn.shape), dk, dv
    dq, dk, dv = jax.lax.map(head, tuple(heads(x) for x in (q, k, v, out, d_out.astype(out.dtype))))
    return tuple(jnp.moveaxis(g, 0, 2) for g in (dq, dk, dv))


_blocked.defvjp(_blocked_fwd, _blocked_bwd)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, plan: SitePlan) -> jax.Array:
    """softmax(q·kᵀ/√H)·v per head: q [B, T, N, H], k/v [B, S, N, H] → [B, T, N, H] (dtype of q)."""
    if plan.implementation == "blocked":
        return blocked_attention(q, k, v, plan.query_blocks)
    lengths = None
    if plan.pad_keys_to is not None and plan.pad_keys_to > k.shape[1]:
        s = k.shape[1]
        pad = [(0, 0), (0, plan.pad_keys_to - s), (0, 0), (0, 0)]
        k, v = jnp.pad(k, pad), jnp.pad(v, pad)
        lengths = np.full((q.shape[0],), s, np.int32)  # the padded keys are masked out (a constant)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation=plan.implementation)
