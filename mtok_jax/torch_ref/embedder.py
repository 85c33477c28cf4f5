"""AudioToken embedder in PyTorch: BEATs features [B, T, C_in] → one audio token [B, D] (docs/design.md §2.3).

The same computation as the Flax :class:`mtok_jax.models.embedder.AudioTokenEmbedder` (the reference
``FGAEmbedder``: MLP, then factor-graph attentive pooling with one unary and one self-pairwise potential):

  H   = fc2(GELU_erf(fc1(x)))                                   [B, T, D]
  u_t = w·Dropout_0.5(ReLU(W_e h_t + b_e)) + b                  unary potential      [B, T]
  p_t = mean_s cos(W_X h_t + b_X, W_Y h_s + b_Y)                self-pairwise        [B, T]
  z_t = r0·u_t + r1·p_t,  α = softmax_t z,  e = Σ_t α_t h_t                          [B, D]

Module names follow the reference state dict (``fc1``, ``fc2``, ``fga.un_models.0.{embed,feature_reduce}``,
``fga.pp_models.0.{embed_X,embed_Y}``, ``fga.reduce_potentials.0``; 1×1 Conv1d over [B, D, T]), the layout
:func:`mtok_jax.models.embedder.params_to_torch` writes. The unary dropout is off by default here (the
deterministic token the parity tests use); it is on in training mode (``train=True`` or ``module.train()``),
and at inference too with ``unary_dropout_at_inference=True`` (the reference's quirk, the Flax default).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mtok_jax.models import embedder as flax_embedder

UNARY_DROPOUT_RATE = flax_embedder.UNARY_DROPOUT_RATE
L2_EPS = flax_embedder.L2_EPS


class EmbedderStages(NamedTuple):
    """Every stage of one forward pass (the Flax module's ``intermediates`` plus the token)."""
    fc2_out: torch.Tensor         # H [B, T, D]
    unary: torch.Tensor           # [B, T]
    self_pairwise: torch.Tensor   # [B, T]
    logits: torch.Tensor          # [B, T]
    attn_weights: torch.Tensor    # [B, T], softmax over T
    output: torch.Tensor          # token [B, D]


class UnaryPotential(nn.Module):
    """u = feature_reduce(Dropout_0.5(ReLU(embed(H)))), 1×1 convs over ``[B, D, T]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.embed = nn.Conv1d(dim, dim, 1)
        self.feature_reduce = nn.Conv1d(dim, 1, 1)

    def forward(self, h: torch.Tensor, dropout: bool, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``h`` [B, D, T]; ``keep`` [B, D, T] (1 = kept) replays a mask → [B, T]."""
        r = F.relu(self.embed(h))
        if keep is not None:
            r = r * (keep.to(r.dtype) / (1.0 - UNARY_DROPOUT_RATE))
        elif dropout:
            r = F.dropout(r, UNARY_DROPOUT_RATE, training=True)
        return self.feature_reduce(r)[:, 0]


class SelfPairwisePotential(nn.Module):
    """p_t = mean over s of cos(embed_X(H)_t, embed_Y(H)_s), 1×1 convs over ``[B, D, T]``."""

    def __init__(self, dim: int):
        super().__init__()
        self.embed_X = nn.Conv1d(dim, dim, 1)
        self.embed_Y = nn.Conv1d(dim, dim, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:        # [B, D, T] → [B, T]
        a = F.normalize(self.embed_X(h), dim=1, eps=L2_EPS)
        b = F.normalize(self.embed_Y(h), dim=1, eps=L2_EPS)
        return torch.einsum("bct,bcs->bts", a, b).mean(-1)


class FactorGraphAttention(nn.Module):
    """The reference ``Atten`` with one utility: potentials [unary, self-pairwise] mixed by a bias-free 1×1 conv."""

    def __init__(self, dim: int):
        super().__init__()
        self.un_models = nn.ModuleList([UnaryPotential(dim)])
        self.pp_models = nn.ModuleList([SelfPairwisePotential(dim)])
        self.reduce_potentials = nn.ModuleList([nn.Conv1d(2, 1, 1, bias=False)])


class AudioTokenEmbedder(nn.Module):
    """MLP + factor-graph attentive pooling; ``x [B, T, input_dim] → audio token [B, output_dim]``."""

    def __init__(self, input_dim: int, output_dim: int, unary_dropout_at_inference: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(input_dim, input_dim)
        self.fc2 = nn.Linear(input_dim, output_dim)
        self.fga = FactorGraphAttention(output_dim)
        self.unary_dropout_at_inference = unary_dropout_at_inference

    def stages(self, x: torch.Tensor, train: Optional[bool] = None,
               unary_dropout_mask: Optional[torch.Tensor] = None) -> EmbedderStages:
        """``x`` [B, T, input_dim] → every stage. ``train`` (default ``self.training``) turns the unary dropout
        on; ``unary_dropout_mask`` [B, T, D] (1 = kept, as the Flax module takes it) replays one instead."""
        train = self.training if train is None else train
        h = self.fc2(F.gelu(self.fc1(x)))                          # [B, T, D]
        ht = h.transpose(1, 2)                                     # [B, D, T]
        keep = None if unary_dropout_mask is None else unary_dropout_mask.transpose(1, 2)
        unary = self.fga.un_models[0](ht, train or self.unary_dropout_at_inference, keep)
        pairwise = self.fga.pp_models[0](ht)
        logits = self.fga.reduce_potentials[0](torch.stack([unary, pairwise], dim=1))[:, 0]
        attn = torch.softmax(logits, dim=-1)
        return EmbedderStages(h, unary, pairwise, logits, attn, torch.einsum("bt,btd->bd", attn, h))

    def forward(self, x: torch.Tensor, train: Optional[bool] = None,
                unary_dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x`` [B, T, input_dim] → token [B, output_dim] (arguments as :meth:`stages`)."""
        return self.stages(x, train, unary_dropout_mask).output


def from_state_dict(state_dict: Mapping[str, Any], unary_dropout_at_inference: bool = False) -> AudioTokenEmbedder:
    """A reference ``FGAEmbedder`` state dict (numpy arrays or tensors) → the module in eval mode, loaded strictly."""
    tensors = {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state_dict.items()}   # copies
    output_dim, input_dim = tensors["fc2.weight"].shape
    module = AudioTokenEmbedder(int(input_dim), int(output_dim), unary_dropout_at_inference)
    module.load_state_dict(tensors, strict=True)
    return module.eval()


def from_flax(params: Mapping[str, Any], unary_dropout_at_inference: bool = False) -> AudioTokenEmbedder:
    """Flax embedder params (``mtok_jax.models.embedder``) → the same module in PyTorch, eval mode."""
    return from_state_dict(flax_embedder.params_to_torch(params), unary_dropout_at_inference)
