"""Fréchet distance between Gaussian fits of two feature sets (FID on Inception-V3 pool3 features).

``d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2·(Σ₁Σ₂)^{1/2})``, computed in float64 on the host with
``scipy.linalg.sqrtm``, following ``pytorch_fid.fid_score.calculate_frechet_distance`` step by step
(same ε-regularisation of a singular product, same tolerance on the imaginary part).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy import linalg


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """features [n, d] → (μ [d], Σ [d, d]) in float64; Σ is the unbiased covariance (``np.cov``, n − 1)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"feature_statistics: expected [n ≥ 2, d] features, got {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, host).

    ``‖μ₁ − μ₂‖² + Tr Σ₁ + Tr Σ₂ − 2 Tr sqrtm(Σ₁Σ₂)``. If sqrtm of the product is not finite, ``eps·I`` is
    added to both covariances and it is recomputed; a numerically complex square root is accepted when the
    imaginary part of its diagonal is within 1e-3 of 0 (then its real part is used), else ValueError.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"frechet_distance: shape mismatch {mu1.shape}/{mu2.shape}, {sigma1.shape}/{sigma2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid(features_a, features_b, *, method: str = "auto") -> float:
    """FID between two feature sets [n_a, d] and [n_b, d] (e.g. Inception pool3, d = 2048): the Fréchet
    distance of their Gaussian fits (:func:`feature_statistics`).

    method ``"sqrtm"``: :func:`frechet_distance` on the statistics (pytorch-fid's route; a 2048² sqrtm takes
    minutes on a small CPU). ``"svd"``: with Σ_i = A_iᵀA_i, A_i = centred features/√(n_i − 1), the
    non-zero eigenvalues of Σ₁Σ₂ are the squared singular values of A₁A₂ᵀ [n_a, n_b], so
    ``Tr (Σ₁Σ₂)^{1/2} = ‖A₁A₂ᵀ‖_*`` (nuclear norm): exact, and milliseconds for a few hundred images
    (agrees with the sqrtm route to ~1e-7 relative, which is sqrtm's own error on these singular products).
    ``"auto"``: "svd" when n_a·n_b ≤ d², else "sqrtm".
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"fid: expected [n ≥ 2, d] feature sets of equal d, got {a.shape} and {b.shape}")
    if method == "auto":
        method = "svd" if a.shape[0] * b.shape[0] <= a.shape[1] ** 2 else "sqrtm"
    if method == "sqrtm":
        return frechet_distance(*feature_statistics(a), *feature_statistics(b))
    if method != "svd":
        raise ValueError(f"fid: method must be auto | svd | sqrtm, got {method!r}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ca = (a - mu_a) / np.sqrt(a.shape[0] - 1)
    cb = (b - mu_b) / np.sqrt(b.shape[0] - 1)
    tr_covmean = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    diff = mu_a - mu_b
    return float(diff @ diff + np.sum(ca * ca) + np.sum(cb * cb) - 2.0 * tr_covmean)
