"""Training loss of AudioToken as the thesis ran it (docs/design.md §1), as pure functions of arrays.

  loss = MSE(ε̂, target) + λ_l1 · mean|e| + λ_l2 · mean_b ||e_b||² + λ_cl · (1 − mean_b cos(e_b, τ_b))²

e [B, D] is the audio token, τ [B, D] the label target (mean of the raw CLIP token-embedding rows of
the label's BPE tokens). Two facts of the reference code that this module follows on purpose:
  * the L1 term is mean|e| over all B·D entries (= ||e||₁ / D, batch-averaged), not the thesis's ||e||₁;
  * the batch mean of the cosine is taken *inside* the square.
Every batch reduction takes an optional `mask` [B] (1 = real example, 0 = padding), so that padded
evaluation batches give the loss of their real examples only. All terms are computed in float32.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

COSINE_EPS = 1e-8  # torch.nn.functional.cosine_similarity default


class Weights(NamedTuple):
    """λ weights of the regularisers."""

    l1: float = 0.01
    l2: float = 0.0
    cl: float = 0.01


def masked_mean(x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean of per-example values x [B] over the examples with mask 1 (all when mask is None)."""
    x = x.astype(jnp.float32)
    if mask is None:
        return jnp.mean(x)
    mask = mask.astype(jnp.float32)
    return jnp.sum(x * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def diffusion_mse(pred: jax.Array, target: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Mean squared error over all elements of pred/target [B, ...] (== F.mse_loss(reduction='mean'))."""
    err = jnp.square(pred.astype(jnp.float32) - target.astype(jnp.float32))
    return masked_mean(jnp.mean(err.reshape(err.shape[0], -1), axis=1), mask)


def l1_penalty(e: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """mean|e| over batch and channels, e [B, D] (the reference's L1; equals mean_b ||e_b||₁ / D)."""
    return masked_mean(jnp.mean(jnp.abs(e.astype(jnp.float32)), axis=1), mask)


def l2_penalty(e: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """mean_b ||e_b||² for e [B, D]."""
    return masked_mean(jnp.sum(jnp.square(e.astype(jnp.float32)), axis=1), mask)


def cosine_similarity(e: jax.Array, tau: jax.Array, eps: float = COSINE_EPS) -> jax.Array:
    """Row-wise cos(e_b, τ_b) [B] = e·τ / max(||e||·||τ||, eps) (torch's documented formula)."""
    e = e.astype(jnp.float32)
    tau = tau.astype(jnp.float32)
    norms = jnp.linalg.norm(e, axis=-1) * jnp.linalg.norm(tau, axis=-1)
    return jnp.sum(e * tau, axis=-1) / jnp.maximum(norms, eps)


def label_cosine_term(e: jax.Array, tau: jax.Array, mask: jax.Array | None = None,
                      batch_mean_cos: jax.Array | None = None) -> jax.Array:
    """(1 − mean_b cos(e_b, τ_b))², the batch mean inside the square.

    `batch_mean_cos`: when this batch is one micro-batch of a bigger (accumulated) batch whose mean
    cosine is known, the term is replaced by its linearisation around that mean,
    (1 − c̄)² − 2(1 − c̄)(mean_b cos − c̄) with c̄ held constant: the micro-batch gradients then average
    to exactly the big batch's gradient, and the value equals the big batch's term when c̄ is the mean.
    """
    mean_cos = masked_mean(cosine_similarity(e, tau), mask)
    if batch_mean_cos is None:
        return jnp.square(1.0 - mean_cos)
    c = jax.lax.stop_gradient(batch_mean_cos.astype(jnp.float32))
    return jnp.square(1.0 - c) - 2.0 * (1.0 - c) * (mean_cos - c)


def total_loss(pred: jax.Array, target: jax.Array, audio_token: jax.Array, label_target: jax.Array,
               weights: Weights, mask: jax.Array | None = None,
               batch_mean_cos: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The training objective → (scalar loss, {'mse', 'l1', 'l2', 'cosine'} unweighted terms).

    pred, target: UNet output and its target [B, C, h, w]; audio_token, label_target: [B, D].
    """
    terms = {
        "mse": diffusion_mse(pred, target, mask),
        "l1": l1_penalty(audio_token, mask),
        "l2": l2_penalty(audio_token, mask),
        "cosine": label_cosine_term(audio_token, label_target, mask, batch_mean_cos),
    }
    loss = terms["mse"] + weights.l1 * terms["l1"] + weights.l2 * terms["l2"] + weights.cl * terms["cosine"]
    return loss, terms
