"""BEATs audio encoder in PyTorch (eager, SDPA attention): the reference our Flax port is timed and checked against.

The computation of microsoft/unilm ``beats/BEATs.py`` + ``backbone.py`` (docs/design.md §2.2, §4.1), written
batch-first and in eval form: waveform [B, N] 16 kHz → Kaldi fbank, normalised [B, F, 128] → Conv 16×16/16 patches
(token = t·8 + f) → LayerNorm(embed_dim) → Linear → C → + GELU(weight-normed grouped conv-pos) → LayerNorm
→ post-LN deep-norm layers with one shared, GRU-gated, bucketed relative position bias → features [B, T, C].

Parameter names and layouts are the official state dict's (``checkpoint['model']``, conv-pos as ``weight_g`` /
``weight_v``, the bias table repeated in every layer), so ``load_state_dict(strict=True)`` takes the golden
``sd/`` entries and :func:`mtok_jax.models.beats.params_to_torch` output; a fine-tuned checkpoint's
``predictor.*`` keys (AudioToken drops the head) must be left out. Dropout, attention dropout and layer drop
are not implemented (eval only); the backward pass works, with ``layer_wise_gradient_decay_ratio`` scaling the
gradient at each layer input as the reference's ``GradMultiply`` does.
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtok_jax.models import beats as flax_beats
from mtok_jax.torch_ref.fbank import KaldiFbank, beats_normalize

AUDIOTOKEN_LAYERS = flax_beats.AUDIOTOKEN_LAYERS   # 0-based blocks AudioToken concatenates ("layers 4, 8, 12")


class BEATsOutput(NamedTuple):
    """What :meth:`BEATs.forward` returns, field for field the Flax ``BEATsOutput``.

    fbank: normalised fbank ``[B, F, 128]`` float32; hidden_states: output of every layer, each ``[B, T, C]``;
    features: final output ``[B, T, C]``; padding_mask: patch-level mask ``[B, T]`` (True = padding) or None.
    """
    fbank: torch.Tensor
    hidden_states: tuple
    features: torch.Tensor
    padding_mask: Optional[torch.Tensor] = None


# ----------------------------------------------------------------------------------------------------
# Pure helpers


def _in_float32(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """An activation evaluated in float32 and cast back (the reference's ``gelu``)."""
    return lambda x: fn(x.float()).type_as(x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": _in_float32(F.gelu),
    "gelu_fast": _in_float32(lambda x: F.gelu(x, approximate="tanh")),
    "gelu_accurate": _in_float32(lambda x: F.gelu(x, approximate="tanh")),
    "relu": F.relu, "tanh": torch.tanh, "linear": lambda x: x,
}


def downsample_padding_mask(padding_mask: torch.Tensor, length: int) -> torch.Tensor:
    """The reference's ``forward_padding_mask``: ``[B, n]`` → ``[B, length]`` bool (True = padding).

    Drops the last n mod length entries and marks slot i as padding iff all of its n // length entries are
    (crude on purpose, as the reference); all padding when n < length, as the Flax port.
    """
    b, n = padding_mask.shape
    per = n // length
    if per == 0:
        return torch.ones(b, length, dtype=torch.bool, device=padding_mask.device)
    return padding_mask[:, : per * length].reshape(b, length, per).all(-1)


def relative_position_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of r = key − query (int64, same shape): half the buckets per sign, exact below
    ``num_buckets // 4``, log-spaced up to ``max_distance``; float32 arithmetic truncated toward zero."""
    half = num_buckets // 2
    max_exact = half // 2
    distance = relative.abs()
    scaled = torch.log(distance.clamp(min=1).float() / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + (scaled * (half - max_exact)).long()).clamp(max=half - 1)
    return (relative > 0).long() * half + torch.where(distance < max_exact, distance, large)


class GradMultiply(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` (the reference's ``GradMultiply``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


# ----------------------------------------------------------------------------------------------------
# Modules


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d(C → C, kernel K, padding K//2) whose weight is ``weight_norm(dim=2)``-parametrised:
    W[o, i, k] = g[k] · v[o, i, k] / ‖v[:, :, k]‖ (parameters ``weight_g`` [1, 1, K], ``weight_v`` [C, C/g, K])."""

    def __init__(self, channels: int, kernel_size: int, groups: int):
        super().__init__()
        self.kernel_size, self.groups = kernel_size, groups
        v = torch.randn(channels, channels // groups, kernel_size) * math.sqrt(4.0 / (kernel_size * channels))
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.linalg.vector_norm(v, dim=(0, 1), keepdim=True))
        self.bias = nn.Parameter(torch.zeros(channels))

    def weight(self) -> torch.Tensor:
        """The effective kernel ``[C, C/groups, K]``."""
        return self.weight_v * (self.weight_g / torch.linalg.vector_norm(self.weight_v, dim=(0, 1), keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, C, T] → [B, C, T + 1 − K mod 2]
        return F.conv1d(x, self.weight(), self.bias, padding=self.kernel_size // 2, groups=self.groups)


class SamePad(nn.Module):
    """Drops the extra last step an even kernel with padding K//2 produces."""

    def __init__(self, kernel_size: int):
        super().__init__()
        self.trim = 1 if kernel_size % 2 == 0 else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:          # [B, C, T']
        return x[..., :-self.trim] if self.trim else x


class SelfAttention(nn.Module):
    """Multi-head self-attention with the (optionally GRU-gated) shared relative position bias, via SDPA.

    ``relative_attention_bias`` (``[num_buckets, H]`` table) is owned by layer 0 and shared by reference with
    the other layers (as the reference does, so the state dict lists it once per layer).
    """

    def __init__(self, dim: int, heads: int, relative_bias: bool, num_buckets: int, max_distance: int,
                 gru_rel_pos: bool):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.num_buckets, self.max_distance = num_buckets, max_distance
        self.q_proj, self.k_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.v_proj, self.out_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
        if relative_bias:
            self.relative_attention_bias = nn.Embedding(num_buckets, heads)
        self.gru_rel_pos = gru_rel_pos
        if gru_rel_pos:
            self.grep_linear = nn.Linear(self.head_dim, 8)
            self.grep_a = nn.Parameter(torch.ones(1, heads, 1, 1))

    def position_bias(self, length: int) -> torch.Tensor:
        """Raw shared bias ``[H, T, T]``: ``bias[h, i, j] = table[bucket(j − i), h]`` (i query, j key)."""
        table = self.relative_attention_bias.weight
        pos = torch.arange(length, device=table.device)
        buckets = relative_position_buckets(pos[None, :] - pos[:, None], self.num_buckets, self.max_distance)
        return F.embedding(buckets, table).permute(2, 0, 1).contiguous()

    def gate(self, q: torch.Tensor) -> torch.Tensor:
        """Per-query bias gate ``[B, H, T, 1]`` from the unscaled query ``q`` [B, H, T, d]."""
        b, h, t, _ = q.shape
        g = torch.sigmoid(self.grep_linear(q).view(b, h, t, 2, 4).sum(-1))
        return g[..., :1] * (g[..., 1:] * self.grep_a - 1.0) + 2.0

    def forward(self, x: torch.Tensor, pos_bias: Optional[torch.Tensor],
                key_padding_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """``x`` [B, T, C], ``pos_bias`` [H, T, T] or None, ``key_padding_mask`` [B, T] bool or None → [B, T, C]."""
        b, t, c = x.shape
        split = lambda y: y.view(b, t, self.heads, self.head_dim).transpose(1, 2)   # noqa: E731  [B, H, T, d]
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        mask = None
        if pos_bias is not None:
            mask = self.gate(q) * pos_bias if self.gru_rel_pos else pos_bias[None]
        if key_padding_mask is not None:
            keys = torch.zeros(b, 1, 1, t, dtype=x.dtype, device=x.device)
            keys = keys.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            mask = keys if mask is None else mask + keys
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim ** -0.5)
        return self.out_proj(out.transpose(1, 2).reshape(b, t, c))


class EncoderLayer(nn.Module):
    """One transformer layer: post-LN with deep-norm residual scale α = (2·layers)^¼, or pre-LN."""

    def __init__(self, c: Mapping[str, Any]):
        super().__init__()
        dim = c["encoder_embed_dim"]
        self.self_attn = SelfAttention(dim, c["encoder_attention_heads"], bool(c["relative_position_embedding"]),
                                       c["num_buckets"], c["max_distance"], bool(c["gru_rel_pos"]))
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, c["encoder_ffn_embed_dim"])
        self.fc2 = nn.Linear(c["encoder_ffn_embed_dim"], dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = ACTIVATIONS[c["activation_fn"]]
        self.pre_norm = bool(c["layer_norm_first"])
        self.alpha = (2.0 * c["encoder_layers"]) ** 0.25 if c["deep_norm"] else 1.0

    def ffn(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))

    def forward(self, x: torch.Tensor, pos_bias: Optional[torch.Tensor],
                padding_mask: Optional[torch.Tensor]) -> torch.Tensor:   # [B, T, C] → [B, T, C]
        if self.pre_norm:
            x = x + self.self_attn(self.self_attn_layer_norm(x), pos_bias, padding_mask)
            return x + self.ffn(self.final_layer_norm(x))
        x = self.self_attn_layer_norm(x * self.alpha + self.self_attn(x, pos_bias, padding_mask))
        return self.final_layer_norm(x * self.alpha + self.ffn(x))


class TransformerEncoder(nn.Module):
    """Conv-pos embedding (``pos_conv``: weight-normed conv, SamePad, GELU), LayerNorm and the layer stack."""

    def __init__(self, c: Mapping[str, Any]):
        super().__init__()
        dim = c["encoder_embed_dim"]
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, c["conv_pos"], c["conv_pos_groups"]),
                                      SamePad(c["conv_pos"]), nn.GELU())
        self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c["encoder_layers"]))
        if c["relative_position_embedding"]:
            for layer in self.layers[1:]:                          # one table, listed in every layer's keys
                layer.self_attn.relative_attention_bias = self.layers[0].self_attn.relative_attention_bias
        self.layer_norm = nn.LayerNorm(dim)
        self.pre_norm = bool(c["layer_norm_first"])
        self.relative_bias = bool(c["relative_position_embedding"])
        self.gradient_decay = float(c["layer_wise_gradient_decay_ratio"])

    def forward(self, x: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, tuple]:
        """``x`` [B, T, C], ``padding_mask`` [B, T] bool or None → (features [B, T, C], per-layer outputs)."""
        if padding_mask is not None:
            x = x.masked_fill(padding_mask[..., None], 0.0)
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)
        if not self.pre_norm:
            x = self.layer_norm(x)
        pos_bias = self.layers[0].self_attn.position_bias(x.shape[1]) if self.relative_bias else None
        hidden = []
        for layer in self.layers:
            if self.gradient_decay != 1.0 and torch.is_grad_enabled():
                x = GradMultiply.apply(x, self.gradient_decay)
            x = layer(x, pos_bias, padding_mask)
            hidden.append(x)
        if self.pre_norm:
            x = self.layer_norm(x)
        return x, tuple(hidden)


class BEATs(nn.Module):
    """BEATs from a checkpoint ``cfg`` dict (missing keys: the reference's ``BEATsConfig`` class defaults).

    ``forward(waveforms [B, N] float32 16 kHz in [−1, 1], padding_mask [B, N] bool (True = padding) or None)``
    → :class:`BEATsOutput`; :meth:`from_fbank` starts from the normalised fbank.
    """

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        c = flax_beats.beats_config(cfg)
        self.config = c
        self.kaldi_fbank = KaldiFbank(num_mel_bins=flax_beats.NUM_MEL_BINS)   # buffers only, not in the state dict
        p = c["input_patch_size"]
        self.patch_embedding = nn.Conv2d(1, c["embed_dim"], kernel_size=p, stride=p, bias=bool(c["conv_bias"]))
        self.layer_norm = nn.LayerNorm(c["embed_dim"])
        self.post_extract_proj = (nn.Linear(c["embed_dim"], c["encoder_embed_dim"])
                                  if c["embed_dim"] != c["encoder_embed_dim"] else None)
        self.encoder = TransformerEncoder(c)

    def forward(self, waveforms: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> BEATsOutput:
        fbank = beats_normalize(self.kaldi_fbank(waveforms))
        frame_mask = None if padding_mask is None else downsample_padding_mask(padding_mask, fbank.shape[1])
        return self.from_fbank(fbank, frame_mask)

    def from_fbank(self, fbank: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> BEATsOutput:
        """Same as :meth:`forward` from a normalised fbank ``[B, F, 128]`` and a frame mask ``[B, F]``."""
        p = self.config["input_patch_size"]
        if fbank.shape[1] < p or fbank.shape[2] < p:
            raise ValueError(f"fbank {tuple(fbank.shape)} is smaller than one {p}×{p} patch")
        x = self.patch_embedding(fbank[:, None])                   # [B, E, F/p, 128/p]
        x = self.layer_norm(x.flatten(2).transpose(1, 2))          # [B, T, E], token = t·(128/p) + f
        if padding_mask is not None:
            padding_mask = downsample_padding_mask(padding_mask, x.shape[1])
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)
        features, hidden = self.encoder(x, padding_mask)
        return BEATsOutput(fbank=fbank, hidden_states=hidden, features=features, padding_mask=padding_mask)


def audiotoken_features(output: BEATsOutput, layers: Sequence[int] = AUDIOTOKEN_LAYERS) -> torch.Tensor:
    """Outputs of the 0-based blocks ``layers`` concatenated on channels: ``[B, T, len(layers)·C]``."""
    return torch.cat(flax_beats.selected_layers(output.hidden_states, layers), dim=-1)


# ----------------------------------------------------------------------------------------------------
# Construction from our weights


def from_state_dict(state_dict: Mapping[str, Any], cfg: Mapping[str, Any]) -> BEATs:
    """``BEATs(cfg)`` in eval mode with an official-layout state dict (numpy arrays or tensors) loaded strictly."""
    model = BEATs(cfg)
    tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}   # copies
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def from_flax(params: Mapping[str, Any], cfg: Mapping[str, Any]) -> BEATs:
    """Flax BEATs params (``mtok_jax.models.beats``) → the same model in PyTorch, eval mode."""
    return from_state_dict(flax_beats.params_to_torch(params, cfg), cfg)


def from_folder(directory: str | os.PathLike) -> BEATs:
    """A folder written by :func:`mtok_jax.models.beats.save_beats` (read with ``load_beats``) → BEATs, eval mode."""
    module, params = flax_beats.load_beats(directory)
    return from_flax(params, module.cfg)
