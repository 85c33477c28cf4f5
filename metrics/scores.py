"""AIS, IIS and GIILS: baseline-subtracted cosine similarities mapped to percentages (thesis §4.1).

All functions are pure, jitted and float32 (cosines use HIGHEST-precision matmuls). Each takes embeddings
(CLIP image features, Wav2CLIP audio features, ...) and returns a :class:`Similarity` = (score, mean):
``mean`` is the raw baseline-subtracted mean cosine m, ``score = 100·(1 − arccos(m)/π)`` its percentage.

Defaults follow docs/design.md §2.8 (exact means). ``faithful=True`` reproduces the thesis scripts
(``AIS_complete.py``, ``IIS_complete.py``, ``GIILS_complete.py``; docs/design.md §2.8): their baselines
exclude reference items by **exact embedding equality** with the query and divide by a fixed count
(M − 1, N − 2) whatever the number of terms actually summed.

``reference=`` [T, d]: the baseline runs over a separate reference set, as the thesis defines it (T = the
audio files [images] of the *test set*, the scripts loop over all 2,425 test files): the default is the
exact mean over the reference items that are not the paired one (found by embedding equality); faithful
divides the same loop's sum by T − 1, with the scripts' exclusions (AIS: equal to the paired audio; IIS:
equal to the *generated* image, i.e. none).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


class Similarity(NamedTuple):
    """A metric value: ``score`` in percent (50 = no preference) and the raw mean ``mean`` it maps from."""

    score: jax.Array
    mean: jax.Array


@jax.jit
def score(m: jax.Array) -> jax.Array:
    """Map a mean cosine m ∈ [−1, 1] to a percentage: ``100·(1 − arccos(clip(m, −1, 1))/π)``.

    m = 1 → 100, m = 0 → 50, m = −1 → 0. Elementwise; float32.
    """
    m = jnp.asarray(m, jnp.float32)
    return 100.0 * (1.0 - jnp.arccos(jnp.clip(m, -1.0, 1.0)) / jnp.pi)


def cosine_matrix(x: jax.Array, y: jax.Array) -> jax.Array:
    """``C[r, j] = ⟨x_r, y_j⟩ / (‖x_r‖‖y_j‖)`` for x [R, d], y [J, d] → [R, J] float32."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    xn = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
    yn = y / jnp.linalg.norm(y, axis=-1, keepdims=True)
    return jnp.matmul(xn, yn.T, precision=_HIGHEST)


def equal_rows(x: jax.Array, y: jax.Array) -> jax.Array:
    """``E[r, j] = all(x_r == y_j)`` (exact equality, as the scripts' ``np.array_equal``) → [R, J] bool."""
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    return jax.lax.map(lambda row: jnp.all(row[None, :] == y, axis=-1), x)


def _paired_mean(reference: jax.Array, generated: jax.Array, faithful_exclude: jax.Array | None) -> jax.Array:
    """m = mean_j [cos(x_j, g_j) − baseline_j] for the paired sets x = reference [M, d], g = generated [M, d].

    Default baseline_j = mean_{r≠j} cos(x_r, g_j). With ``faithful_exclude`` (bool [M, M], True = drop term
    (r, j)): baseline_j = Σ_{r kept} cos(x_r, g_j) / (M − 1).
    """
    c = cosine_matrix(reference, generated)  # [r, j]
    m = c.shape[0]
    paired = jnp.diagonal(c)
    if faithful_exclude is None:
        baseline = (jnp.sum(c, axis=0) - paired) / (m - 1)
    else:
        baseline = jnp.sum(jnp.where(faithful_exclude, 0.0, c), axis=0) / (m - 1)
    return jnp.mean(paired - baseline)


def _reference_mean(reference: jax.Array, paired: jax.Array, generated: jax.Array, exclude_equal_to: jax.Array,
                    faithful: bool) -> jax.Array:
    """m = mean_j [cos(x_j, g_j) − baseline_j], baseline over a reference set R [T, d]; x = paired [M, d],
    g = generated [M, d]. Terms r with R_r == exclude_equal_to_j are dropped; the kept sum is divided by the
    kept count (default) or T − 1 (faithful, the scripts' divisor)."""
    c = cosine_matrix(reference, generated)  # [r, j]
    keep = ~equal_rows(reference, exclude_equal_to)  # [r, j]
    total = jnp.sum(jnp.where(keep, c, 0.0), axis=0)
    count = jnp.float32(c.shape[0] - 1) if faithful else jnp.sum(keep.astype(jnp.float32), axis=0)
    paired_cos = jnp.sum(cosine_matrix(paired, generated) * jnp.eye(paired.shape[0]), axis=0)
    return jnp.mean(paired_cos - total / count)


@functools.partial(jax.jit, static_argnames=("faithful", "exclude_generated"))
def _with_reference(reference, paired, generated, faithful: bool, exclude_generated: bool):
    exclude = generated if exclude_generated else paired
    m = _reference_mean(reference, paired, generated, exclude, faithful)
    return Similarity(score(m), m)


def _check_reference(reference, paired, what: str) -> None:
    if reference.ndim != 2 or reference.shape[1] != paired.shape[1] or reference.shape[0] < 2:
        raise ValueError(f"{what}: reference must be [T ≥ 2, {paired.shape[1]}], got {reference.shape}")


def _check_paired(a, b, what: str) -> None:
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"{what}: expected two [M, d] arrays of the same shape, got {a.shape} and {b.shape}")
    if a.shape[0] < 2:
        raise ValueError(f"{what}: needs M ≥ 2 pairs for a baseline, got {a.shape[0]}")


@functools.partial(jax.jit, static_argnames=("faithful",))
def _ais(audio_emb, image_emb, faithful: bool):
    exclude = equal_rows(audio_emb, audio_emb) if faithful else None
    m = _paired_mean(audio_emb, image_emb, exclude)
    return Similarity(score(m), m)


def ais(audio_emb: jax.Array, image_emb: jax.Array, *, faithful: bool = False,
        reference: jax.Array | None = None) -> Similarity:
    """Audio–image similarity of M generated images g_j with their conditioning audios a_j.

    ``m = mean_j [cos(a_j, g_j) − mean_{r≠j} cos(a_r, g_j)]``, ``AIS = score(m)``; audio_emb [M, d]
    (Wav2CLIP), image_emb [M, d] (CLIP image features), row j of both belonging together; the baseline
    set is the M audios themselves.
    faithful: ``AIS_complete.py`` — baseline Σ over audios r whose embedding differs from a_j, divided by
    M − 1 (identical to the default unless two audios have identical embeddings).
    reference [T, d]: baseline over these audios (the whole test split) instead: mean over r with a_r ≠ a_j;
    faithful: that sum / (T − 1), the script's loop over all test audios.
    """
    audio_emb, image_emb = jnp.asarray(audio_emb), jnp.asarray(image_emb)
    _check_paired(audio_emb, image_emb, "ais")
    if reference is not None:
        reference = jnp.asarray(reference)
        _check_reference(reference, audio_emb, "ais")
        return _with_reference(reference, audio_emb, image_emb, faithful, False)
    return _ais(audio_emb, image_emb, faithful)


@functools.partial(jax.jit, static_argnames=("faithful",))
def _iis(generated_emb, ground_truth_emb, faithful: bool):
    # The script excludes reference images equal to the *generated* one, which never happens in practice:
    # all M terms (the ground truth included) stay in the sum, still divided by M − 1.
    exclude = equal_rows(ground_truth_emb, generated_emb) if faithful else None
    m = _paired_mean(ground_truth_emb, generated_emb, exclude)
    return Similarity(score(m), m)


def iis(generated_emb: jax.Array, ground_truth_emb: jax.Array, *, faithful: bool = False,
        reference: jax.Array | None = None) -> Similarity:
    """Image–image similarity of M generated images g_j with their ground-truth images x_j.

    ``m = mean_j [cos(x_j, g_j) − mean_{r≠j} cos(x_r, g_j)]``, ``IIS = score(m)``; both [M, d] (CLIP image
    features), row j paired; the baseline set is the M ground-truth images.
    faithful: ``IIS_complete.py`` — baseline_j = Σ_{r: x_r ≠ g_j} cos(x_r, g_j) / (M − 1), i.e. normally all
    M terms including the ground truth x_j itself, divided by M − 1.
    reference [T, d]: baseline over these images (the test split's images) instead: mean over r with
    x_r ≠ x_j; faithful: Σ over r with x_r ≠ g_j (normally all T, the ground truth included) / (T − 1).
    """
    generated_emb, ground_truth_emb = jnp.asarray(generated_emb), jnp.asarray(ground_truth_emb)
    _check_paired(generated_emb, ground_truth_emb, "iis")
    if reference is not None:
        reference = jnp.asarray(reference)
        _check_reference(reference, ground_truth_emb, "iis")
        return _with_reference(reference, ground_truth_emb, generated_emb, faithful, faithful)
    return _iis(generated_emb, ground_truth_emb, faithful)


@functools.partial(jax.jit, static_argnames=("faithful",))
def _giils_means(generated_emb, members, faithful: bool):
    """Per-group GIILS means. members: float32 [L, N] (1 = image n is in group l) → [L] means."""
    c = cosine_matrix(generated_emb, generated_emb)  # symmetric [k, i]
    n = c.shape[0]
    if faithful:
        keep = 1.0 - equal_rows(generated_emb, generated_emb).astype(jnp.float32)  # keep[k, i]: e_k ≠ e_i
        # base[i, j] = Σ_k [e_k ≠ f_i][e_k ≠ f_j] cos(e_k, f_i) / (N − 2)
        base = jnp.matmul((c * keep).T, keep, precision=_HIGHEST) / (n - 2)
    else:
        # base[i, j] = mean_{k∉{i,j}} cos(e_k, f_i) = (Σ_k c[k, i] − c[i, i] − c[j, i]) / (N − 2)
        col = jnp.sum(c, axis=0)
        base = (col[:, None] - jnp.diagonal(c)[:, None] - c.T) / (n - 2)
    upper = jnp.triu(jnp.ones((n, n), jnp.float32), k=1)  # pairs i < j (pool order)

    def one(mask):
        pairs = mask[:, None] * mask[None, :] * upper
        return jnp.sum(pairs * (c - base)) / jnp.sum(pairs)

    means = jax.lax.map(one, members)
    return means


def giils(generated_emb: jax.Array, labels, *, faithful: bool = False) -> dict[int, Similarity]:
    """Generated image–image label similarity, per label, sorted by descending score (Tables 5.2 / 5.4).

    generated_emb [N, d]: the pool E of all N generated images (CLIP image features); labels [N] int: the
    label of each image, or a negative value for images that are only in the pool (e.g. when GIILS uses
    10 images per label out of 335). For label L with images f_1..f_n (pool order):
    ``m_L = mean_{i<j} [cos(f_i, f_j) − mean_{k∉{i,j}} cos(e_k, f_i)]``, ``GIILS_L = score(m_L)``
    (the baseline uses the first image of each pair, as the thesis does).
    faithful: ``GIILS_complete.py`` — the k-sum excludes pool images whose embedding equals f_i or f_j and
    is divided by N − 2 regardless (identical to the default when embeddings are distinct).
    Labels with fewer than 2 images are left out. Returns {label: Similarity} (python-int keys),
    ordered by score descending, ties by label.
    """
    emb = jnp.asarray(generated_emb, jnp.float32)
    labels = np.asarray(labels).astype(np.int64)
    if emb.ndim != 2 or labels.shape != (emb.shape[0],):
        raise ValueError(f"giils: expected [N, d] embeddings and [N] labels, got {emb.shape} and {labels.shape}")
    if emb.shape[0] < 3:
        raise ValueError("giils: needs a pool of N ≥ 3 images")
    groups = [int(l) for l in np.unique(labels) if l >= 0 and np.sum(labels == l) >= 2]
    if not groups:
        return {}
    members = np.stack([(labels == l).astype(np.float32) for l in groups])
    means = np.asarray(_giils_means(emb, jnp.asarray(members), faithful))
    scores = np.asarray(score(means))
    order = sorted(range(len(groups)), key=lambda i: (-float(scores[i]), groups[i]))
    return {groups[i]: Similarity(jnp.float32(scores[i]), jnp.float32(means[i])) for i in order}
