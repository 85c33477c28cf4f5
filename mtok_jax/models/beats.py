"""BEATs audio encoder (microsoft/unilm ``beats/``, the released iter3+ family) in Flax (docs/design.md §2.2).

waveform [B, N] 16 kHz ─► Kaldi fbank, normalised [B, F, 128] ─► Conv 16×16/16 (patches, token = t·8 + f)
─► LayerNorm(embed_dim) ─► Dense → C ─► (+ GELU(weight-normed grouped conv-pos)) ─► LayerNorm
─► ``encoder_layers`` post-LN deep-norm transformer layers with a shared, GRU-gated, bucketed relative
position bias ─► features [B, T, C], T = 8·⌊F/16⌋.

Every size and flag comes from the checkpoint's ``cfg`` dict (missing keys take the reference's
``BEATsConfig`` class defaults). Parameter names follow the PyTorch state-dict names
(``params_from_torch`` maps them). Weight norm of the conv-pos is recomposed once at load: the Flax
tree holds the effective kernel. Intermediate stages are ``sow``-n into the ``intermediates``
collection (``apply(..., mutable=['intermediates'])``) for debugging and parity tests.
"""

from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import struct, traverse_util

from mtok_jax import params_io
from mtok_jax.models import attention as attention_lib
from mtok_jax.audio.fbank import beats_normalize, kaldi_fbank
from mtok_jax.constants import BEATS_ATTENTIONS, SAMPLE_RATE  # (BEATs.preprocess hard-codes 16 kHz, 128 mel bins)

LN_EPS = 1e-5                     # torch.nn.LayerNorm default (Flax's is 1e-6)
NUM_MEL_BINS = 128
AUDIOTOKEN_LAYERS = (3, 7, 11)    # 0-based blocks whose outputs AudioToken concatenates ("layers 4, 8, 12")

# The reference's BEATsConfig class defaults (applied before the checkpoint's cfg, as BEATsConfig does).
BEATS_CONFIG_DEFAULTS: dict[str, Any] = dict(
    input_patch_size=-1, embed_dim=512, conv_bias=False,
    encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
    activation_fn="gelu", layer_wise_gradient_decay_ratio=1.0, layer_norm_first=False, deep_norm=False,
    dropout=0.1, attention_dropout=0.1, activation_dropout=0.0, encoder_layerdrop=0.0, dropout_input=0.0,
    conv_pos=128, conv_pos_groups=16,
    relative_position_embedding=False, num_buckets=320, max_distance=1280, gru_rel_pos=False,
    finetuned_model=False, predictor_dropout=0.1, predictor_class=527,
)

# checkpoint['cfg'] of BEATs_iter3_plus_AS2M.pt (docs/design.md §4.1.6); for eval_shape / benchmarks.
BEATS_ITER3_PLUS_AS2M_CFG: dict[str, Any] = dict(
    encoder_layers=12, encoder_embed_dim=768, encoder_ffn_embed_dim=3072, encoder_attention_heads=12,
    embed_dim=512, input_patch_size=16, conv_bias=False, activation_fn="gelu",
    layer_norm_first=False, deep_norm=True, layer_wise_gradient_decay_ratio=0.6,
    conv_pos=128, conv_pos_groups=16,
    relative_position_embedding=True, num_buckets=320, max_distance=800, gru_rel_pos=True,
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0, encoder_layerdrop=0.05,
    finetuned_model=False, predictor_dropout=0.0, predictor_class=527,
)


def beats_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Checkpoint cfg → complete config (reference class defaults for missing keys), validated."""
    c = dict(BEATS_CONFIG_DEFAULTS)
    c.update(dict(cfg))
    if c["input_patch_size"] <= 0:
        raise ValueError(f"input_patch_size must be positive, got {c['input_patch_size']}")
    if c["deep_norm"] and c["layer_norm_first"]:
        raise ValueError("deep_norm and layer_norm_first are exclusive (as in the reference)")
    if c["encoder_embed_dim"] % c["encoder_attention_heads"]:
        raise ValueError("encoder_embed_dim must be divisible by encoder_attention_heads")
    if c["encoder_embed_dim"] % c["conv_pos_groups"]:
        raise ValueError("encoder_embed_dim must be divisible by conv_pos_groups")
    if c["activation_fn"] not in _ACTIVATIONS:
        raise NotImplementedError(f"activation_fn {c['activation_fn']!r} not supported "
                                  f"(supported: {sorted(_ACTIVATIONS)}; 'glu' is not ported)")
    return c


# ----------------------------------------------------------------------------------------------------
# Pure helpers


def _gelu_f32(x):
    """Exact (erf) GELU computed in float32, cast back (the reference's ``gelu``)."""
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


def _gelu_tanh_f32(x):
    return jax.nn.gelu(x.astype(jnp.float32), approximate=True).astype(x.dtype)


_ACTIVATIONS = {"gelu": _gelu_f32, "gelu_fast": _gelu_tanh_f32, "gelu_accurate": _gelu_tanh_f32,
                "relu": jax.nn.relu, "tanh": jnp.tanh, "linear": lambda x: x}


def downsample_padding_mask(padding_mask: jax.Array, length: int) -> jax.Array:
    """The reference's ``forward_padding_mask``: ``[B, n]`` → ``[B, length]`` (True = padding).

    Drops the last n mod length entries, groups the rest into ``length`` consecutive slots of n // length
    and marks a slot as padding iff all its entries are. Crude on purpose (copied, not fixed): the second
    application (frames → patches) ignores the time-major patch layout.
    """
    mask = jnp.asarray(padding_mask, bool)
    b, n = mask.shape
    per = n // length
    if per == 0:
        return jnp.ones((b, length), bool)
    return mask[:, : per * length].reshape(b, length, per).all(-1)


def relative_position_buckets_1d(max_rel: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional T5 bucket of r = key − query for r = −max_rel..max_rel, int32 ``[2·max_rel + 1]``.

    Float32 arithmetic with truncation toward zero, as the reference's ``_relative_positions_bucket``.
    """
    rel = np.arange(-max_rel, max_rel + 1, dtype=np.int64)
    nb = num_buckets // 2
    base = (rel > 0).astype(np.int64) * nb
    a = np.abs(rel)
    max_exact = nb // 2
    with np.errstate(divide="ignore"):
        ratio = np.log(a.astype(np.float32) / np.float32(max_exact))
    large = ratio / np.float32(math.log(max_distance / max_exact)) * np.float32(nb - max_exact)
    large = max_exact + np.trunc(np.where(a < max_exact, 0.0, large)).astype(np.int64)
    large = np.minimum(large, nb - 1)
    return (base + np.where(a < max_exact, a, large)).astype(np.int32)


@jax.custom_vjp
def _grad_multiply(x, scale):
    return x


def _grad_multiply_fwd(x, scale):
    return x, scale


def _grad_multiply_bwd(scale, g):
    return g * scale, None


_grad_multiply.defvjp(_grad_multiply_fwd, _grad_multiply_bwd)


def grad_multiply(x: jax.Array, scale: float) -> jax.Array:
    """Identity forward; multiplies the gradient by ``scale`` (the reference's ``GradMultiply``)."""
    return _grad_multiply(x, jnp.asarray(scale, x.dtype))


# ----------------------------------------------------------------------------------------------------
# Modules


@struct.dataclass
class BEATsOutput:
    """What ``BEATs.apply`` returns.

    fbank: normalised fbank ``[B, F, 128]`` float32; hidden_states: output of every layer, each
    ``[B, T, C]``; features: final output ``[B, T, C]``; padding_mask: patch-level mask ``[B, T]``
    (True = padding) or None.
    """
    fbank: jax.Array
    hidden_states: tuple
    features: jax.Array
    padding_mask: Optional[jax.Array] = None


def _conv1d(x, kernel, groups: int):
    """'Same'-padded (K//2 each side) grouped Conv1d: x [B, T, C], kernel [K, C/groups, C] → [B, T + 1 − K%2, C]."""
    k = kernel.shape[0]
    return jax.lax.conv_general_dilated(x, kernel, window_strides=(1,), padding=[(k // 2, k // 2)],
                                        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


def _split_conv(x, kernel, groups: int):
    cg = x.shape[-1] // groups
    return jnp.concatenate([_conv1d(x[..., g * cg:(g + 1) * cg], kernel[..., g * cg:(g + 1) * cg], 1)
                            for g in range(groups)], axis=-1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def split_conv_pos(x, kernel, groups: int):
    """:func:`_conv1d` as `groups` ungrouped convs on channel slices (XLA:CPU's input gradient of the grouped
    form is ~60× slower), with the kernel gradient as one matrix product per group of the input's K shifted
    windows: XLA:CPU computes it as a convolution with a 1,496-wide window at 4 GFLOP/s (16 × 210 ms of a
    20 s exp2 step), the product takes milliseconds."""
    return _split_conv(x, kernel, groups)


def _split_conv_pos_fwd(x, kernel, groups):
    return _split_conv(x, kernel, groups), (x, kernel)


def _split_conv_pos_bwd(groups, residuals, dy):
    x, kernel = residuals
    _, input_vjp = jax.vjp(lambda inp: _split_conv(inp, kernel, groups), x)
    (dx,) = input_vjp(dy)
    k, cg = kernel.shape[0], kernel.shape[1]
    t_out = dy.shape[1]
    padded = jnp.pad(x, [(0, 0), (k // 2, k // 2), (0, 0)])

    def group_kernel_grad(g):  # dW[j, i, o] = Σ_b,t x_pad[b, t + j, i] · dy[b, t, o] for one group
        xg = jax.lax.dynamic_slice_in_dim(padded, g * cg, cg, axis=2)
        dyg = jax.lax.dynamic_slice_in_dim(dy, g * cg, cg, axis=2)
        windows = jnp.stack([xg[:, j:j + t_out] for j in range(k)], axis=2)  # [B, T', K, cg]
        return jnp.einsum("btki,bto->kio", windows, dyg, preferred_element_type=jnp.float32)
    dk = jax.lax.map(group_kernel_grad, jnp.arange(groups))                    # [groups, K, cg, cg]
    dk = jnp.moveaxis(dk, 0, 2).reshape(kernel.shape).astype(kernel.dtype)
    return dx, dk


split_conv_pos.defvjp(_split_conv_pos_fwd, _split_conv_pos_bwd)


class ConvPositionalEmbedding(nn.Module):
    """GELU(grouped Conv1d(C→C, kernel K, padding K//2) with the last step removed for even K).

    ``kernel`` is ``[K, C/groups, C]`` (the effective, weight-norm-recomposed weight). ``split=True``
    runs it as ``groups`` ungrouped convs on channel slices: numerically the same, and its gradient
    is ~60× faster on XLA:CPU than ``feature_group_count`` (docs/design.md §5).
    """
    kernel_size: int
    groups: int
    split: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):                                      # [B, T, C]
        c = x.shape[-1]
        cg = c // self.groups
        k = self.kernel_size
        std = math.sqrt(4.0 / (k * c))
        kernel = self.param("kernel", nn.initializers.normal(std), (k, cg, c), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        y = split_conv_pos(x, kernel, self.groups) if self.split else _conv1d(x, kernel, self.groups)
        y = y + bias.astype(self.dtype)
        if k % 2 == 0:                                          # SamePad
            y = y[:, :-1]
        return _gelu_f32(y)


def resolve_attention(name: str, backend: str | None = None, trained: bool = False) -> bool:
    """`model.beats_attention` → blocked (True) or batched (False); ``auto``: blocked on a CPU where BEATs
    is not `trained` (blocked's loops are left to autodiff, whose backward was slower than the batched one's
    for the UNet's attention, which therefore has its own flash backward)."""
    if name not in BEATS_ATTENTIONS:
        raise ValueError(f"model.beats_attention={name!r}: expected one of {', '.join(BEATS_ATTENTIONS)}")
    return name == "blocked" or (name == "auto" and (backend or jax.default_backend()) == "cpu" and not trained)


def attention_probs(q, k, pos_bias, gate, key_padding_mask):
    """Softmax attention weights, float32 ``[B, H, T, S]``: q (scaled) ``[B, H, T, d]`` and k ``[B, H, S, d]``;
    pos_bias ``[H, T, S]`` or None, scaled per query by gate ``[B, H, T]`` (the GRU gate) when given;
    key_padding_mask ``[B, S]`` (True = padding) or None."""
    logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
    if key_padding_mask is not None:
        logits = jnp.where(key_padding_mask[:, None, None, :], -jnp.inf, logits)
    if pos_bias is not None:
        logits = logits + (pos_bias[None] if gate is None else gate[..., None] * pos_bias[None])
    return jax.nn.softmax(logits, axis=-1)


def attend_blocked(q, k, v, pos_bias, gate, key_padding_mask):
    """``attention_probs · v`` ``[B, H, T, d]`` one head and block of queries at a time
    (:func:`attention_lib.loop_heads_and_query_blocks`, blocks from :func:`attention_lib.query_blocks`;
    all at once below its size): at 1,496 tokens a head's [748, 1,496] block of scores stays in a CPU
    core's cache, where all heads at once stream [B, 12, T, T] (107 MB) through memory for each pass."""
    blocks = attention_lib.query_blocks(q.shape[2], k.shape[2])
    if blocks == 0:
        return jnp.einsum("bhqk,bhkd->bhqd", attention_probs(q, k, pos_bias, gate, key_padding_mask).astype(v.dtype), v)
    heads = lambda x: None if x is None else jnp.moveaxis(x, 1, 0)  # noqa: E731 ([B, H, ...] → [H, B, ...])
    per_query = (heads(q), None if pos_bias is None else pos_bias[:, None], heads(gate))  # [H, B|1, T, ...]

    def attend(queries, keys):  # q [B, t, d], bias [1, t, S], gate [B, t]; k/v [B, S, d]
        qb, bias, g = queries
        kb, vb = keys
        probs = attention_probs(qb[:, None], kb[:, None], bias, None if g is None else g[:, None], key_padding_mask)
        return jnp.einsum("bhqk,bhkd->bhqd", probs.astype(vb.dtype), vb[:, None])[:, 0]
    out = attention_lib.loop_heads_and_query_blocks(attend, per_query, (heads(k), heads(v)), blocks)
    return jnp.moveaxis(out, 0, 1)


class BEATsAttention(nn.Module):
    """Multi-head self-attention with the (optionally GRU-gated) shared relative position bias.
    ``blocked``: by heads and blocks of queries (:func:`attend_blocked`) where nothing else needs the
    weights (no dropout, no sown intermediates)."""
    embed_dim: int
    num_heads: int
    gru_rel_pos: bool
    attention_dropout: float
    dtype: Any = jnp.float32
    blocked: bool = False

    @nn.compact
    def __call__(self, x, pos_bias, key_padding_mask, deterministic: bool):
        b, t, c = x.shape
        h = self.num_heads
        d = c // h
        dense = lambda name: nn.Dense(c, dtype=self.dtype, name=name,   # noqa: E731
                                      kernel_init=nn.initializers.normal(0.02))
        q = dense("q_proj")(x).reshape(b, t, h, d)
        k = dense("k_proj")(x).reshape(b, t, h, d)
        v = dense("v_proj")(x).reshape(b, t, h, d)
        gate = None
        if pos_bias is not None and self.gru_rel_pos:
            g = nn.Dense(8, dtype=self.dtype, name="grep_linear",
                         kernel_init=nn.initializers.normal(0.02))(q)              # [B, T, H, 8]
            self.sow("intermediates", "grep_linear_out", g.transpose(0, 2, 1, 3))
            g = jax.nn.sigmoid(g.astype(jnp.float32).reshape(b, t, h, 2, 4).sum(-1))
            grep_a = self.param("grep_a", nn.initializers.ones, (h,), jnp.float32)
            gate = (g[..., 0] * (g[..., 1] * grep_a - 1.0) + 2.0).transpose(0, 2, 1)  # [B, H, T]
        # [B, H, T, d] operands: with v as [B, T, H, d] ("bhqk,bkhd->bqhd") XLA:CPU computes vᵀ·Pᵀ and
        # copies P [B, H, T, T] transposed every layer (≈ 55 ms a layer at 1,496 tokens)
        q = (q * jnp.asarray(d ** -0.5, q.dtype)).transpose(0, 2, 1, 3)
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        if self.blocked and deterministic and not self.is_mutable_collection("intermediates"):
            out = attend_blocked(q, k, v, pos_bias, gate, key_padding_mask)
        else:
            probs = attention_probs(q, k, pos_bias, gate, key_padding_mask)
            self.sow("intermediates", "attn_probs", probs)
            probs = nn.Dropout(self.attention_dropout)(probs, deterministic=deterministic)
            out = jnp.einsum("bhqk,bhkd->bhqd", probs.astype(v.dtype), v)
        out = dense("out_proj")(out.transpose(0, 2, 1, 3).reshape(b, t, c))
        self.sow("intermediates", "attn_out", out)
        return out


class BEATsLayer(nn.Module):
    """One transformer layer: post-LN with deep-norm residual scale α, or pre-LN (layer_norm_first)."""
    cfg: Mapping[str, Any]
    dtype: Any = jnp.float32
    blocked_attention: bool = False

    @nn.compact
    def __call__(self, x, pos_bias, key_padding_mask, deterministic: bool):
        c = self.cfg
        dim = c["encoder_embed_dim"]
        alpha = (2.0 * c["encoder_layers"]) ** 0.25 if c["deep_norm"] else 1.0
        act = _ACTIVATIONS[c["activation_fn"]]
        attn = BEATsAttention(dim, c["encoder_attention_heads"], bool(c["gru_rel_pos"]),
                              c["attention_dropout"], self.dtype, self.blocked_attention, name="self_attn")
        attn_ln = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="self_attn_layer_norm")
        final_ln = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="final_layer_norm")
        init = nn.initializers.normal(0.02)
        fc1 = nn.Dense(c["encoder_ffn_embed_dim"], dtype=self.dtype, kernel_init=init, name="fc1")
        fc2 = nn.Dense(dim, dtype=self.dtype, kernel_init=init, name="fc2")
        drop = lambda y, rate: nn.Dropout(rate)(y, deterministic=deterministic)   # noqa: E731

        def ffn(y):
            y = drop(act(fc1(y)), c["activation_dropout"])
            return drop(fc2(y), c["dropout"])

        if c["layer_norm_first"]:
            x = x + drop(attn(attn_ln(x), pos_bias, key_padding_mask, deterministic), c["dropout"])
            return x + ffn(final_ln(x))
        a = drop(attn(x, pos_bias, key_padding_mask, deterministic), c["dropout"])
        x = attn_ln(x * alpha + a)
        return final_ln(x * alpha + ffn(x))


class BEATsEncoder(nn.Module):
    """Conv-pos embedding, LayerNorm and the layer stack (the reference's ``TransformerEncoder``).
    ``remat``: each layer's activations are recomputed in the backward pass (same numbers, less memory);
    ``blocked_attention``: :class:`BEATsAttention`'s ``blocked``."""
    cfg: Mapping[str, Any]
    dtype: Any = jnp.float32
    split_conv_pos: bool = True
    remat: bool = False
    blocked_attention: bool = False

    def relative_position_bias(self, length: int) -> jax.Array:
        """Shared bias ``[H, T, T]``: ``bias[h, i, j] = table[bucket(j − i), h]`` (float32)."""
        c = self.cfg
        table = self.param("relative_attention_bias",
                           lambda k, s: nn.initializers.xavier_normal()(k, s, jnp.float32),
                           (c["num_buckets"], c["encoder_attention_heads"]))
        b1d = jnp.asarray(relative_position_buckets_1d(length - 1, c["num_buckets"], c["max_distance"]))
        pos = jnp.arange(length)
        buckets = b1d[pos[None, :] - pos[:, None] + (length - 1)]     # [T, T]
        return table.T[:, buckets].astype(jnp.float32)                 # (gathered as [H, T, T]: no transpose)

    @nn.compact
    def __call__(self, x, padding_mask, deterministic: bool):
        c = self.cfg
        if padding_mask is not None:
            x = jnp.where(padding_mask[..., None], 0.0, x).astype(x.dtype)
        pos = ConvPositionalEmbedding(c["conv_pos"], c["conv_pos_groups"], self.split_conv_pos,
                                      self.dtype, name="pos_conv")(x)
        self.sow("intermediates", "pos_conv_out", pos)
        x = x + pos.astype(x.dtype)
        layer_norm = nn.LayerNorm(LN_EPS, dtype=self.dtype, name="layer_norm")
        if not c["layer_norm_first"]:
            x = layer_norm(x)
        self.sow("intermediates", "encoder_input", x)
        x = nn.Dropout(c["dropout"])(x, deterministic=deterministic)
        pos_bias = None
        if c["relative_position_embedding"]:
            pos_bias = self.relative_position_bias(x.shape[1])
            self.sow("intermediates", "rel_pos_bias", pos_bias)
        ratio = c["layer_wise_gradient_decay_ratio"]
        layerdrop = c["encoder_layerdrop"]
        hidden = []
        layer = nn.remat(BEATsLayer, static_argnums=(4,)) if self.remat else BEATsLayer  # 4: deterministic
        for i in range(c["encoder_layers"]):
            if ratio != 1.0:
                x = grad_multiply(x, ratio)
            y = layer(c, self.dtype, self.blocked_attention, name=f"layers_{i}")(x, pos_bias, padding_mask,
                                                                                deterministic)
            if not deterministic and layerdrop > 0.0:
                keep = jax.random.uniform(self.make_rng("dropout")) > layerdrop
                y = jnp.where(keep, y, x)
            x = y
            hidden.append(x)
        if c["layer_norm_first"]:
            x = layer_norm(x)
        return x, tuple(hidden)


class BEATs(nn.Module):
    """BEATs from a checkpoint ``cfg`` dict.

    ``apply({'params': p}, waveforms [B, N] float32 16 kHz in [−1, 1], padding_mask [B, N] bool
    (True = padding) or None, deterministic=True)`` → :class:`BEATsOutput`. With
    ``deterministic=False`` dropout, attention dropout and layer drop (rates from cfg) are active and
    ``rngs={'dropout': key}`` is needed. ``dtype=jnp.bfloat16`` computes in bf16 (params stay float32;
    fbank, softmax, GELU and LayerNorm statistics in float32). ``split_conv_pos`` picks the conv-pos form
    (same numbers; split trains much faster on CPU). ``remat``: rematerialise each transformer layer in
    the backward pass (``train.remat``). ``blocked_attention``: attention by heads and blocks of queries
    where no dropout or sown weights need them all (same numbers; faster on CPU: ``model.beats_attention``).
    """
    cfg: Mapping[str, Any]
    dtype: Any = jnp.float32
    split_conv_pos: bool = True
    remat: bool = False
    blocked_attention: bool = False

    def setup(self):
        c = beats_config(self.cfg)
        self.config = c
        p = c["input_patch_size"]
        self.patch_embedding = nn.Conv(c["embed_dim"], (p, p), strides=(p, p), padding="VALID",
                                       use_bias=bool(c["conv_bias"]), dtype=self.dtype)
        self.layer_norm = nn.LayerNorm(LN_EPS, dtype=self.dtype)
        if c["embed_dim"] != c["encoder_embed_dim"]:
            self.post_extract_proj = nn.Dense(c["encoder_embed_dim"], dtype=self.dtype)
        self.dropout_input = nn.Dropout(c["dropout_input"])
        self.encoder = BEATsEncoder(c, self.dtype, self.split_conv_pos, self.remat, self.blocked_attention)

    def __call__(self, waveforms, padding_mask=None, deterministic: bool = True) -> BEATsOutput:
        fbank = beats_normalize(kaldi_fbank(waveforms, SAMPLE_RATE, NUM_MEL_BINS))
        frame_mask = None
        if padding_mask is not None:
            frame_mask = downsample_padding_mask(padding_mask, fbank.shape[1])
        return self.from_fbank(fbank, frame_mask, deterministic)

    def from_fbank(self, fbank, padding_mask=None, deterministic: bool = True) -> BEATsOutput:
        """Same as ``__call__`` from a normalised fbank ``[B, F, 128]`` and a frame mask ``[B, F]``."""
        c = self.config
        p = c["input_patch_size"]
        if fbank.shape[1] < p or fbank.shape[2] < p:
            raise ValueError(f"fbank {fbank.shape} is smaller than one {p}×{p} patch "
                             f"(need ≥ {400 + (p - 1) * 160} samples at 16 kHz)")
        x = self.patch_embedding(fbank[..., None])               # [B, F/p, 128/p, E]
        x = x.reshape(x.shape[0], -1, x.shape[-1])               # token = t·(128/p) + f
        self.sow("intermediates", "patch_embed", x)
        x = self.layer_norm(x)
        self.sow("intermediates", "patch_embed_ln", x)
        if padding_mask is not None:
            padding_mask = downsample_padding_mask(padding_mask, x.shape[1])
        if c["embed_dim"] != c["encoder_embed_dim"]:
            x = self.post_extract_proj(x)
        self.sow("intermediates", "post_extract_proj_out", x)
        x = self.dropout_input(x, deterministic=deterministic)
        features, hidden = self.encoder(x, padding_mask, deterministic)
        return BEATsOutput(fbank=fbank, hidden_states=hidden, features=features, padding_mask=padding_mask)


def audiotoken_features(output: BEATsOutput, layers: Sequence[int] = AUDIOTOKEN_LAYERS) -> jax.Array:
    """Outputs of the 0-based blocks ``layers`` concatenated on channels: ``[B, T, len(layers)·C]``."""
    return jnp.concatenate(selected_layers(output.hidden_states, layers), axis=-1)


def selected_layers(hidden_states: Sequence[Any], layers: Sequence[int]) -> list[Any]:
    """hidden_states[i] for i in layers, or a ValueError naming the model's layer count."""
    n = len(hidden_states)
    if max(layers) >= n:
        raise ValueError(f"audiotoken_features needs layers {tuple(layers)} but the model has only {n} "
                         f"layers; pass layers= for a small model")
    return [hidden_states[i] for i in layers]


# ----------------------------------------------------------------------------------------------------
# Parameters: PyTorch state dict → Flax, init, save/load


def _weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``nn.utils.weight_norm(dim=2)``: W[o, i, k] = g[k] · v[o, i, k] / ‖v[:, :, k]‖ (float64 math)."""
    v64 = v.astype(np.float64)
    norm = np.sqrt((v64 ** 2).sum(axis=(0, 1), keepdims=True))
    return (g.astype(np.float64).reshape(1, 1, -1) * v64 / norm).astype(np.float32)


POS_CONV = "encoder.pos_conv.0."  # the weight-normed conv-pos (weight_g / weight_v in the official files)


def _torch_layout(c: Mapping[str, Any]) -> list[tuple[str, tuple[str, ...], str]]:
    """The one key map both directions use: (torch key, Flax path, kind) per tensor of a complete cfg ``c``.

    kind: 'linear' (weight [out, in] ↔ kernel [in, out]), 'conv2d' ([out, in, kh, kw] ↔ [kh, kw, in,
    out]), 'conv1d' ([out, in/g, k] ↔ [k, in/g, out]), 'grep_a' ([1, H, 1, 1] ↔ [H]), 'copy'. The conv-pos
    weight is listed as its recomposed ``weight`` and the shared relative-bias table once (layer 0)."""
    out: list[tuple[str, tuple[str, ...], str]] = []

    def dense(key, path):
        out.extend([(key + ".weight", path + ("kernel",), "linear"), (key + ".bias", path + ("bias",), "copy")])

    def layer_norm(key, path):
        out.extend([(key + ".weight", path + ("scale",), "copy"), (key + ".bias", path + ("bias",), "copy")])

    out.append(("patch_embedding.weight", ("patch_embedding", "kernel"), "conv2d"))
    if c["conv_bias"]:
        out.append(("patch_embedding.bias", ("patch_embedding", "bias"), "copy"))
    layer_norm("layer_norm", ("layer_norm",))
    if c["embed_dim"] != c["encoder_embed_dim"]:
        dense("post_extract_proj", ("post_extract_proj",))
    out.extend([(POS_CONV + "weight", ("encoder", "pos_conv", "kernel"), "conv1d"),
                (POS_CONV + "bias", ("encoder", "pos_conv", "bias"), "copy")])
    layer_norm("encoder.layer_norm", ("encoder", "layer_norm"))
    if c["relative_position_embedding"]:
        out.append(("encoder.layers.0.self_attn.relative_attention_bias.weight",
                    ("encoder", "relative_attention_bias"), "copy"))
    for i in range(c["encoder_layers"]):
        pre, path = f"encoder.layers.{i}.", ("encoder", f"layers_{i}")
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            dense(pre + "self_attn." + n, path + ("self_attn", n))
        if c["gru_rel_pos"]:
            dense(pre + "self_attn.grep_linear", path + ("self_attn", "grep_linear"))
            out.append((pre + "self_attn.grep_a", path + ("self_attn", "grep_a"), "grep_a"))
        layer_norm(pre + "self_attn_layer_norm", path + ("self_attn_layer_norm",))
        layer_norm(pre + "final_layer_norm", path + ("final_layer_norm",))
        dense(pre + "fc1", path + ("fc1",))
        dense(pre + "fc2", path + ("fc2",))
    return out


_TO_FLAX = {"linear": lambda w: w.T, "conv2d": lambda w: w.transpose(2, 3, 1, 0),
            "conv1d": lambda w: w.transpose(2, 1, 0), "grep_a": lambda w: w.reshape(-1), "copy": lambda w: w}
_TO_TORCH = {"linear": lambda w: w.T, "conv2d": lambda w: w.transpose(3, 2, 0, 1),
             "conv1d": lambda w: w.transpose(2, 1, 0), "grep_a": lambda w: w.reshape(1, -1, 1, 1),
             "copy": lambda w: w}


def params_from_torch(state_dict: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Reference state dict (``checkpoint['model']``, key names as in microsoft/unilm) → Flax params.

    Linear ``[out, in]`` → Dense kernel ``[in, out]``; Conv weights ``[out, in/g, k...]`` → ``[k..., in/g,
    out]``; the conv-pos weight norm (``weight_g``/``weight_v``, or the parametrizations names) is
    recomposed; the shared relative-bias table is taken from layer 0. ``predictor.*`` (fine-tuned
    heads; AudioToken drops them) is ignored. Any other unused or missing key raises ``ValueError``.
    Inverse: :func:`params_to_torch`.
    """
    c = beats_config(cfg)
    sd = {k: np.asarray(v) for k, v in state_dict.items()}
    used: set[str] = set()

    def take(key):
        if key not in sd:
            raise ValueError(f"BEATs state dict has no {key!r} (cfg and checkpoint disagree?)")
        used.add(key)
        return sd[key].astype(np.float32)

    for g, v in (("weight_g", "weight_v"), ("parametrizations.weight.original0", "parametrizations.weight.original1")):
        if POS_CONV + g in sd:
            sd[POS_CONV + "weight"] = _weight_norm(take(POS_CONV + g), take(POS_CONV + v))
            break
    if c["relative_position_embedding"]:
        keys = [f"encoder.layers.{i}.self_attn.relative_attention_bias.weight" for i in range(c["encoder_layers"])]
        tables = [take(k) for k in keys if k in sd or k == keys[0]]
        if any(not np.array_equal(t, tables[0]) for t in tables[1:]):
            warnings.warn("relative_attention_bias copies differ between layers; using layer 0's "
                          "(the reference shares one table)")
    flat = {path: _TO_FLAX[kind](take(key)) for key, path, kind in _torch_layout(c)}
    unused = sorted(k for k in sd if k not in used and not k.startswith("predictor."))
    if unused:
        raise ValueError(f"unexpected BEATs state-dict keys (cfg and checkpoint disagree?): {unused[:8]}"
                         + (f" … ({len(unused)} in all)" if len(unused) > 8 else ""))
    return traverse_util.unflatten_dict(flat)


def params_to_torch(params: Mapping[str, Any], cfg: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params → the official state dict (``checkpoint['model']`` of microsoft/unilm BEATs), float32.

    The conv-pos kernel W is written weight-normed (dim=2) as ``weight_g`` [1, 1, K] = ‖W[:, :, k]‖ and
    ``weight_v`` = W, which the reference recomposes to W (float64 norm; ≤ 1 ulp); the shared
    relative-bias table is written into every layer, as the reference's state dict holds it.
    Inverse of :func:`params_from_torch`."""
    c = beats_config(cfg)
    flat = traverse_util.flatten_dict(dict(params))
    sd = {key: np.ascontiguousarray(_TO_TORCH[kind](np.asarray(flat[path], np.float32)))
          for key, path, kind in _torch_layout(c)}
    w = sd.pop(POS_CONV + "weight")
    norm = np.sqrt((w.astype(np.float64) ** 2).sum(axis=(0, 1), keepdims=True))
    sd[POS_CONV + "weight_g"], sd[POS_CONV + "weight_v"] = norm.astype(np.float32), w
    if c["relative_position_embedding"]:
        table = sd["encoder.layers.0.self_attn.relative_attention_bias.weight"]
        for i in range(1, c["encoder_layers"]):
            sd[f"encoder.layers.{i}.self_attn.relative_attention_bias.weight"] = table
    return sd


def _dummy_waveform(cfg: Mapping[str, Any]) -> jax.ShapeDtypeStruct:
    """Shortest input giving one patch row (params do not depend on the length)."""
    p = beats_config(cfg)["input_patch_size"]
    return jax.ShapeDtypeStruct((1, 400 + (p - 1) * 160), jnp.float32)


def param_shapes(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Parameter tree of ``ShapeDtypeStruct`` (no compute, no weights), e.g. for the full-size model."""
    model = BEATs(dict(cfg))
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), _dummy_waveform(cfg))["params"]


def init_params(cfg: Mapping[str, Any], rng: jax.Array | int) -> dict[str, Any]:
    """Random float32 params for ``BEATs(cfg)`` (tiny demo models, benchmarks), fast at full size.

    Shapes come from ``jax.eval_shape`` (nothing compiled); values are drawn on the host with numpy:
    LayerNorm scales and ``grep_a`` 1, biases 0, kernels N(0, 1/fan_in), the relative-bias table
    N(0, 0.02²). (``BEATs(cfg).init`` uses the modules' own initialisers instead, slower for 90 M.)
    """
    seed = rng if isinstance(rng, int) else np.asarray(jax.random.key_data(rng)).ravel().tolist()
    gen = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name in ("scale", "grep_a"):
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        std = 0.02 if name == "relative_attention_bias" else 1.0 / math.sqrt(np.prod(leaf.shape[:-1]))
        return gen.standard_normal(leaf.shape, dtype=np.float32) * np.float32(std)

    return jax.tree_util.tree_map_with_path(fill, param_shapes(cfg))


# Provenance keys the converter adds to config.json (not part of the BEATs cfg).
PROVENANCE_KEYS = ("source_checkpoint", "finetuned_head")
RANDOM_SOURCE = "random"  # source_checkpoint of random weights (demo models, tests): no provenance warning
FINETUNED_FROM = "fine-tuned from "  # source_checkpoint prefix of a BEATs trained further by a run (export)
FINETUNED_CHECKPOINT = "BEATs_iter3_plus_AS2M_finetuned_on_AS2M_cpt2.pt"  # what AudioToken and the thesis load


def save_beats(directory: str | os.PathLike, cfg: Mapping[str, Any], params: Mapping[str, Any], *,
               source_checkpoint: str = RANDOM_SOURCE, finetuned_head: bool | None = None) -> None:
    """Write a params_io folder: params.safetensors + config.json (the complete cfg plus provenance:
    ``source_checkpoint`` file name and ``finetuned_head`` = whether ``predictor.*`` was in it)."""
    params_io.save_params(directory, jax.device_get(params),
                          {**beats_config(cfg), "source_checkpoint": source_checkpoint,
                           "finetuned_head": finetuned_head})


def check_provenance(directory: str | os.PathLike, config: Mapping[str, Any]) -> None:
    """Warn unless the folder records a fine-tuned source (``predictor.*`` present) or random weights.

    AudioToken and the thesis use the AudioSet-fine-tuned checkpoint; the self-supervised one has the same
    shapes but different features, so an embedder trained on one silently gets inputs it never saw."""
    source = config.get("source_checkpoint")
    origin = source.removeprefix(FINETUNED_FROM) if isinstance(source, str) else source
    if origin == RANDOM_SOURCE or config.get("finetuned_head") is True:
        return
    what = ("no record of its source checkpoint" if source is None
            else f"converted from {source}, which has no fine-tuning head (predictor.*)")
    warnings.warn(f"BEATs at {directory}: {what}; AudioToken and the thesis use {FINETUNED_CHECKPOINT} "
                  f"(fine-tuned on AudioSet). Convert that file with `python -m mtok_jax.convert beats`.",
                  stacklevel=3)


def load_beats(directory: str | os.PathLike, dtype: Any = jnp.float32, split_conv_pos: bool = True,
               remat: bool = False, blocked_attention: bool = False) -> tuple[BEATs, dict[str, Any]]:
    """Read a folder written by :func:`save_beats` / the converter → ``(BEATs module, params)``; warns
    (:func:`check_provenance`) when it was not converted from a fine-tuned checkpoint."""
    params, config = params_io.load_params(directory)
    check_provenance(directory, config)
    cfg = {k: v for k, v in config.items() if k not in PROVENANCE_KEYS}
    model = BEATs(cfg, dtype=dtype, split_conv_pos=split_conv_pos, remat=remat, blocked_attention=blocked_attention)
    return model, jax.tree.map(jnp.asarray, params)
