"""Losses (docs/design.md §1) against numpy transcriptions of the reference code's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import torch_or_skip
from mtok_jax import losses, train


def _np_reference(pred, target, e, tau, l1, l2, cl):
    """AudioToken/thesis train.py: F.mse_loss(mean) + λa·mean|e| + λb·mean_b ||e||² + λc·(1 − mean cos)²."""
    mse = np.mean((pred.astype(np.float64) - target) ** 2)
    l1_term = np.mean(np.abs(e.astype(np.float64)))
    l2_term = np.mean(np.sum(e.astype(np.float64) ** 2, axis=1))
    cos = np.sum(e * tau, axis=1) / np.maximum(np.linalg.norm(e, axis=1) * np.linalg.norm(tau, axis=1), 1e-8)
    cos_term = (1.0 - np.mean(cos)) ** 2
    return mse + l1 * l1_term + l2 * l2_term + cl * cos_term, dict(mse=mse, l1=l1_term, l2=l2_term, cosine=cos_term)


@pytest.fixture(scope="module")
def arrays():
    rng = np.random.default_rng(0)
    pred = rng.normal(size=(5, 4, 6, 6)).astype(np.float32)
    target = rng.normal(size=(5, 4, 6, 6)).astype(np.float32)
    e = rng.normal(size=(5, 16)).astype(np.float32)
    tau = rng.normal(size=(5, 16)).astype(np.float32) + 0.5 * e
    return pred, target, e, tau


def test_total_loss_matches_numpy(arrays):
    pred, target, e, tau = arrays
    w = losses.Weights(l1=0.01, l2=0.01, cl=0.01)
    loss, terms = losses.total_loss(pred, target, e, tau, w)
    ref, ref_terms = _np_reference(pred, target, e, tau, 0.01, 0.01, 0.01)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)
    for k in ref_terms:
        np.testing.assert_allclose(float(terms[k]), ref_terms[k], rtol=1e-5)


def test_l1_is_mean_abs_not_l1_norm(arrays):
    _, _, e, _ = arrays
    np.testing.assert_allclose(float(losses.l1_penalty(e)), np.abs(e).sum(1).mean() / e.shape[1], rtol=1e-6)


def test_cosine_batch_mean_inside_square():
    e = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    tau = np.array([[1.0, 0.0], [1.0, 0.0]], np.float32)  # cos = 1 and 0
    assert float(losses.label_cosine_term(e, tau)) == pytest.approx(0.25)  # (1 − 0.5)², not mean of (1−cos)² = 0.5
    assert float(losses.cosine_similarity(np.zeros((1, 2), np.float32), tau[:1])[0]) == 0.0  # eps, no NaN


def test_masked_mean_ignores_padding(arrays):
    pred, target, e, tau = arrays
    mask = np.array([1, 1, 1, 0, 0], np.float32)
    w = losses.Weights(0.01, 0.02, 0.03)
    padded = losses.total_loss(pred, target, e, tau, w, mask)[0]
    ref, _ = _np_reference(pred[:3], target[:3], e[:3], tau[:3], 0.01, 0.02, 0.03)
    np.testing.assert_allclose(float(padded), ref, rtol=1e-6)


def test_linearised_cosine_gives_big_batch_gradient(arrays):
    """Micro-batch terms linearised around the big batch's mean cosine average to its exact gradient."""
    _, _, e, tau = arrays
    e, tau = e[:4], tau[:4]

    def big(x):
        return losses.label_cosine_term(x, tau)

    def micro_mean(x):
        c = jnp.mean(losses.cosine_similarity(x, tau))
        parts = [losses.label_cosine_term(x[i:i + 1], tau[i:i + 1], batch_mean_cos=c) for i in range(4)]
        return sum(parts) / 4

    np.testing.assert_allclose(float(micro_mean(e)), float(big(e)), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(micro_mean)(e)), np.asarray(jax.grad(big)(e)), rtol=1e-5,
                               atol=1e-7)


@pytest.mark.parametrize("faithful", [True, False])
def test_faithful_accumulation_equals_pytorch_per_micro_batch_backward(faithful):
    """train.make_train_step on a tiny linear model (token e = x·W, prediction e·V), 4 micro-batches of 1,
    one SGD step of lr 1 (so the step *is* the gradient): faithful_accumulation equals PyTorch calling
    loss.backward() per micro-batch with no division (Σᵢ Lᵢ, cosine (1 − cosᵢ)² per micro-batch); the
    default equals backward of the big batch's loss (cosine of the mean over all 4) instead."""
    torch = torch_or_skip()
    rng = np.random.default_rng(3)
    accum, micro, d_in, d, c = 4, 1, 5, 6, 3
    x, tau = rng.normal(size=(accum, micro, d_in)), rng.normal(size=(accum, micro, d))
    target = rng.normal(size=(accum, micro, c))
    w0, v = rng.normal(size=(d_in, d)), rng.normal(size=(d, c))
    weights = losses.Weights(l1=0.1, l2=0.05, cl=1.0)

    def loss_fn(tr, fr, mb, keys, batch_mean_cos):
        e = mb["x"] @ tr["w"]
        return losses.total_loss(e @ fr["v"], mb["target"], e, mb["tau"], weights, None, batch_mean_cos)

    def cosine_fn(tr, fr, batch, keys):
        return losses.cosine_similarity(batch["x"] @ tr["w"], batch["tau"])

    schedule = optax.constant_schedule(1.0)
    step = jax.jit(train.make_train_step(loss_fn, cosine_fn, optax.sgd(schedule), schedule, faithful))
    batch = {k: jnp.asarray(a, jnp.float32) for k, a in (("x", x), ("tau", tau), ("target", target))}
    tr = {"w": jnp.asarray(w0, jnp.float32)}
    new, _, _ = step(tr, optax.sgd(schedule).init(tr), {"v": jnp.asarray(v, jnp.float32)}, batch, 0, jax.random.key(0))
    grad = np.asarray(tr["w"] - new["w"])

    f64 = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    w = torch.nn.Parameter(f64(w0))

    def torch_loss(xb, taub, tb):
        e = xb @ w
        cos = torch.nn.functional.cosine_similarity(e, taub, dim=-1)
        return (torch.nn.functional.mse_loss(e @ f64(v), tb) + weights.l1 * e.abs().mean()
                + weights.l2 * (e ** 2).sum(-1).mean() + weights.cl * (1 - cos.mean()) ** 2)

    if faithful:
        for i in range(accum):  # the reference: backward every micro-batch, gradients accumulate in .grad
            torch_loss(f64(x[i]), f64(tau[i]), f64(target[i])).backward()
    else:
        torch_loss(f64(x.reshape(-1, d_in)), f64(tau.reshape(-1, d)), f64(target.reshape(-1, c))).backward()
    np.testing.assert_allclose(grad, w.grad.numpy(), rtol=2e-5, atol=1e-6)
