"""AIS / IIS / GIILS / FID against direct numpy transcriptions of their formulas, plus properties."""

import ast
import importlib.util
import math

import numpy as np
import pytest

from metrics import ais, fid, frechet_distance, giils, iis, score
from metrics.fid import feature_statistics


# ---------------------------------------------------------------- numpy references (loops, float64)
def np_cos(u, v):
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


def np_score(m):
    return ((1 - (2 / math.pi) * math.acos(max(-1.0, min(1.0, m)))) + 1) / 2 * 100


def np_paired(ref, gen):
    """docs/design.md §2.8: mean_j [cos(x_j, g_j) − mean_{r≠j} cos(x_r, g_j)]."""
    M = len(ref)
    terms = []
    for j in range(M):
        base = sum(np_cos(ref[r], gen[j]) for r in range(M) if r != j) / (M - 1)
        terms.append(np_cos(ref[j], gen[j]) - base)
    return float(np.mean(terms))


def np_ais_script(audio, gen):
    """AIS_complete.py: skip reference audios equal to the paired audio, divide by M − 1."""
    M = len(audio)
    total = 0.0
    for j in range(M):
        s2 = sum(np_cos(audio[r], gen[j]) for r in range(M) if not np.array_equal(audio[r], audio[j]))
        total += np_cos(audio[j], gen[j]) - s2 / (M - 1)
    return total / M


def np_iis_script(gen, gt):
    """IIS_complete.py: skip reference images equal to the *generated* one, divide by M − 1."""
    M = len(gt)
    total = 0.0
    for j in range(M):
        s2 = sum(np_cos(gt[r], gen[j]) for r in range(M) if not np.array_equal(gt[r], gen[j]))
        total += np_cos(gt[j], gen[j]) - s2 / (M - 1)
    return total / M


def np_giils(pool, labels, script):
    out = {}
    N = len(pool)
    for L in sorted(set(int(l) for l in labels if l >= 0)):
        f = [i for i in range(N) if labels[i] == L]
        if len(f) < 2:
            continue
        S = B = 0.0
        P = 0
        for a in range(len(f)):
            for b in range(a + 1, len(f)):
                i, j = f[a], f[b]
                S += np_cos(pool[i], pool[j])
                if script:  # exclusion by embedding equality, divisor N − 2 regardless
                    ks = [k for k in range(N) if not (np.array_equal(pool[k], pool[i]) or np.array_equal(pool[k], pool[j]))]
                else:
                    ks = [k for k in range(N) if k not in (i, j)]
                B += sum(np_cos(pool[k], pool[i]) for k in ks) / (N - 2)
                P += 1
        out[L] = (S - B) / P
    return out


def emb(rng, n, d, shift=0.0):
    return (rng.standard_normal((n, d)) + shift).astype(np.float32)


# ---------------------------------------------------------------- score
def test_score_values():
    m = np.array([-1.0, -0.5, 0.0, 0.05, 0.5, 1.0, 1.2, -3.0], np.float32)
    want = [np_score(float(v)) for v in m]
    np.testing.assert_allclose(np.asarray(score(m)), want, atol=1e-4)
    assert abs(float(score(0.05)) - 51.59) < 5e-3  # the notes' worked example


# ---------------------------------------------------------------- AIS / IIS
@pytest.mark.parametrize("M,d", [(2, 3), (7, 16), (33, 64)])
def test_ais_iis_vs_numpy(M, d):
    rng = np.random.default_rng(M * 100 + d)
    a, g, x = emb(rng, M, d, 0.3), emb(rng, M, d, 0.3), emb(rng, M, d, 0.3)
    r = ais(a, g)
    np.testing.assert_allclose(float(r.mean), np_paired(a, g), atol=2e-6)
    np.testing.assert_allclose(float(r.score), np_score(np_paired(a, g)), atol=2e-4)
    r = iis(g, x)
    np.testing.assert_allclose(float(r.mean), np_paired(x, g), atol=2e-6)
    rf = iis(g, x, faithful=True)
    np.testing.assert_allclose(float(rf.mean), np_iis_script(g, x), atol=2e-6)
    np.testing.assert_allclose(float(rf.score), np_score(np_iis_script(g, x)), atol=2e-4)
    ra = ais(a, g, faithful=True)
    np.testing.assert_allclose(float(ra.mean), np_ais_script(a, g), atol=2e-6)


def test_faithful_variants_differ_where_the_scripts_do():
    rng = np.random.default_rng(1)
    M, d = 9, 8
    g, x = emb(rng, M, d, 0.5), emb(rng, M, d, 0.5)
    # IIS script keeps the ground truth in the baseline and divides by M − 1: not the exact mean.
    assert abs(float(iis(g, x, faithful=True).mean) - float(iis(g, x).mean)) > 1e-3
    # AIS script == exact mean for distinct audios, but differs when two audios are identical (ties).
    a = emb(rng, M, d, 0.5)
    np.testing.assert_allclose(float(ais(a, g, faithful=True).mean), float(ais(a, g).mean), atol=1e-6)
    a[3] = a[5]
    np.testing.assert_allclose(float(ais(a, g, faithful=True).mean), np_ais_script(a, g), atol=2e-6)
    np.testing.assert_allclose(float(ais(a, g).mean), np_paired(a, g), atol=2e-6)
    assert abs(float(ais(a, g, faithful=True).mean) - float(ais(a, g).mean)) > 1e-4


def test_paired_properties():
    rng = np.random.default_rng(2)
    d = 12
    # identical pairs and zero baseline → 100: orthonormal vectors, each paired with itself.
    e = np.eye(d, dtype=np.float32)[:6]
    assert abs(float(ais(e, e).score) - 100.0) < 1e-3
    assert abs(float(iis(e, 3.0 * e).score) - 100.0) < 1e-3
    # orthogonal everything → m = 0 → 50.
    assert abs(float(ais(e[:3], e[3:6]).score) - 50.0) < 1e-4
    # scale invariance (per row, positive scales).
    a, g = emb(rng, 10, d), emb(rng, 10, d)
    s = rng.uniform(0.1, 10.0, (10, 1)).astype(np.float32)
    np.testing.assert_allclose(float(ais(a * s, g).mean), float(ais(a, g).mean), atol=1e-6)
    np.testing.assert_allclose(float(iis(g, a * s[::-1]).mean), float(iis(g, a).mean), atol=1e-6)
    with pytest.raises(ValueError):
        ais(a[:1], g[:1])
    with pytest.raises(ValueError):
        iis(a, g[:5])


# ---------------------------------------------------------------- GIILS
@pytest.mark.parametrize("N,d,n_labels", [(5, 4, 1), (23, 16, 3), (40, 32, 6)])
def test_giils_vs_numpy(N, d, n_labels):
    rng = np.random.default_rng(N)
    pool = emb(rng, N, d, 0.2)
    labels = rng.integers(0, n_labels, N)
    labels[: min(N, 2 * n_labels)] = np.repeat(np.arange(n_labels), 2)[:N]  # every label has ≥ 2 images
    labels[-1] = -1  # an image that is only in the pool
    for faithful in (False, True):
        got = giils(pool, labels, faithful=faithful)
        want = np_giils(pool, labels, script=faithful)
        assert set(got) == set(want)
        for L in want:
            np.testing.assert_allclose(float(got[L].mean), want[L], atol=2e-6)
            np.testing.assert_allclose(float(got[L].score), np_score(want[L]), atol=2e-4)
        s = [float(v.score) for v in got.values()]
        assert s == sorted(s, reverse=True)


def test_giils_single_label_ties_and_duplicates():
    rng = np.random.default_rng(3)
    pool = emb(rng, 12, 8)
    got = giils(pool, np.zeros(12, int))
    assert list(got) == [0]
    np.testing.assert_allclose(float(got[0].mean), np_giils(pool, np.zeros(12), False)[0], atol=2e-6)
    # two labels with identical geometry (one a rotated copy of the other) → equal scores; ties by label id.
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    base = emb(rng, 4, 8)
    pool2 = np.concatenate([base @ q.T.astype(np.float32), base]).astype(np.float32)
    pool2 = np.concatenate([pool2, emb(rng, 1, 8)])
    t = giils(pool2, np.array([5, 5, 5, 5, 2, 2, 2, 2, -1]))
    # not exactly equal baselines (the extra pool image differs), so check vs numpy and ordering rule only.
    want = np_giils(pool2, np.array([5, 5, 5, 5, 2, 2, 2, 2, -1]), False)
    for L in want:
        np.testing.assert_allclose(float(t[L].mean), want[L], atol=2e-6)
    tie = giils(np.concatenate([base, base, emb(rng, 2, 8)]), np.array([7, 7, 7, 7, 1, 1, 1, 1, -1, -1]))
    assert list(tie) == [1, 7] and float(tie[1].score) == pytest.approx(float(tie[7].score), abs=1e-4)
    # duplicates in the pool: the script's equality exclusion removes more terms (still / (N − 2)).
    dup = pool.copy()
    dup[7] = dup[0]
    lab = np.array([0, 0, 0, 1, 1, 1, -1, -1, -1, -1, -1, -1])
    for faithful in (False, True):
        w = np_giils(dup, lab, faithful)
        g = giils(dup, lab, faithful=faithful)
        for L in w:
            np.testing.assert_allclose(float(g[L].mean), w[L], atol=2e-6)
    assert abs(float(giils(dup, lab, faithful=True)[0].mean) - float(giils(dup, lab)[0].mean)) > 1e-4
    assert giils(pool, np.array([0] + [-1] * 11)) == {}


def test_giils_properties():
    d = 16
    e = np.eye(d, dtype=np.float32)
    # a pair of identical images, pool otherwise orthogonal to it → cos 1, baseline 0 → 100.
    pool = np.concatenate([np.repeat(e[:1], 2, 0), e[1:8]])
    labels = np.array([0, 0] + [-1] * 7)
    assert abs(float(giils(pool, labels)[0].score) - 100.0) < 1e-3
    # mutually orthogonal label images in an orthogonal pool → 50.
    assert abs(float(giils(e[:9], np.array([0, 0, 0, 1, 1, -1, -1, -1, -1]))[0].score) - 50.0) < 1e-4
    rng = np.random.default_rng(4)
    p = emb(rng, 15, d)
    lab = rng.integers(0, 3, 15)
    s = rng.uniform(0.1, 10, (15, 1)).astype(np.float32)
    a, b = giils(p, lab), giils(p * s, lab)
    for L in a:
        np.testing.assert_allclose(float(a[L].mean), float(b[L].mean), atol=1e-6)


# ---------------------------------------------------------------- FID
def np_frechet(mu1, s1, mu2, s2):
    """Direct formula via an eigen-decomposition: Tr sqrt(S1 S2) = Σ sqrt(eig(sqrt(S1) S2 sqrt(S1)))."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    ev = np.linalg.eigvalsh(r @ s2 @ r)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(ev, 0, None))))


def test_fid_formula_and_properties():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((200, 16)).astype(np.float32)
    b = (rng.standard_normal((150, 16)) @ rng.standard_normal((16, 16)) * 0.5 + 0.3).astype(np.float32)
    ma, sa = a.astype(np.float64).mean(0), np.cov(a.astype(np.float64), rowvar=False)
    mb, sb = b.astype(np.float64).mean(0), np.cov(b.astype(np.float64), rowvar=False)
    want = np_frechet(ma, sa, mb, sb)
    for method in ("auto", "svd", "sqrtm"):
        np.testing.assert_allclose(fid(a, b, method=method), want, rtol=1e-9, atol=1e-9)
    # fewer samples than dimensions (335 images vs 2048-d features): singular covariances
    c, e = rng.standard_normal((20, 64)), rng.standard_normal((25, 64)) * 0.7 + 0.1
    want = np_frechet(*feature_statistics(c), *feature_statistics(e))
    np.testing.assert_allclose(fid(c, e), want, rtol=1e-7)
    np.testing.assert_allclose(fid(c, e, method="sqrtm"), want, rtol=1e-6)
    with pytest.raises(ValueError):
        fid(a, b, method="fast")
    mu, sig = feature_statistics(a)
    np.testing.assert_allclose(sig, sa, rtol=1e-12)
    assert abs(fid(a, a)) < 1e-6
    assert fid(a, b) == pytest.approx(fid(b, a), rel=1e-8)
    # translation: adding t to one set adds exactly ‖t‖² (covariance unchanged).
    t = np.full(16, 0.25, np.float32)
    assert fid(a, a + t) == pytest.approx(16 * 0.25**2, rel=1e-5)
    assert fid(a, b + 1.0) > fid(a, b) + 1.0


def _pytorch_fid_frechet():
    """pytorch-fid's own calculate_frechet_distance, taken from its installed source.

    pytorch_fid.fid_score imports torchvision at module level (not installable here); the function itself
    only needs numpy and scipy, so it is compiled from the package file unchanged.
    """
    spec = importlib.util.find_spec("pytorch_fid")
    if spec is None:
        pytest.skip("pytorch-fid not installed (pip install -c requirements-lock.txt pytorch-fid --no-deps)")
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance

        return calculate_frechet_distance
    except Exception:  # ImportError, or a torchvision build that does not match torch (RuntimeError)
        pass
    import os

    from scipy import linalg

    path = os.path.join(spec.submodule_search_locations[0], "fid_score.py")
    tree = ast.parse(open(path).read())
    fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "calculate_frechet_distance")
    ns = {"np": np, "linalg": linalg}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), ns)
    return ns["calculate_frechet_distance"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::scipy.linalg.LinAlgWarning", "ignore::RuntimeWarning")
def test_frechet_distance_equals_pytorch_fid(capsys):
    ref = _pytorch_fid_frechet()
    rng = np.random.default_rng(6)
    cases = []
    for n, d in [(64, 8), (300, 32)]:
        a = rng.standard_normal((n, d))
        b = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + 0.1
        cases.append((*feature_statistics(a), *feature_statistics(b)))
    # singular covariances (fewer samples than dimensions) → complex / regularised sqrtm paths.
    a, b = rng.standard_normal((10, 24)), rng.standard_normal((12, 24)) + 0.2
    cases.append((*feature_statistics(a), *feature_statistics(b)))
    cases.append((np.zeros(4), np.diag([1.0, 0, 0, 0]), np.ones(4), np.diag([0, 2.0, 0, 0])))
    for mu1, s1, mu2, s2 in cases:
        want = ref(mu1, s1, mu2, s2)
        got = frechet_distance(mu1, s1, mu2, s2)
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def np_script_reference(paired, gen, ref, skip_equal_to):
    """AIS_complete.py / IIS_complete.py over a reference folder R (the test audios / images): for each
    generated image g_j loop over all of R, skip items equal to skip_equal_to[j] (AIS: the paired audio;
    IIS: the generated image itself), divide by the last loop index T − 1."""
    total = 0.0
    for j in range(len(paired)):
        s2 = 0.0
        for i in range(len(ref)):
            if not np.array_equal(ref[i], skip_equal_to[j]):
                s2 += np_cos(ref[i], gen[j])
        total += np_cos(paired[j], gen[j]) - s2 / i
    return total / len(paired)


def np_reference_exact(paired, gen, ref):
    """Default: exact mean over the reference items other than the paired one."""
    terms = []
    for j in range(len(paired)):
        kept = [np_cos(r, gen[j]) for r in ref if not np.array_equal(r, paired[j])]
        terms.append(np_cos(paired[j], gen[j]) - sum(kept) / len(kept))
    return float(np.mean(terms))


def test_ais_iis_with_reference_set_vs_script_loops():
    """T = 13 reference items, M = 5 pairs (four of the paired audios / ground truths are reference rows,
    one is not), reference rows in another order than the pairs."""
    rng = np.random.default_rng(7)
    d, T = 8, 13
    for kind in ("ais", "iis"):
        ref = emb(rng, T, d, 0.3)
        paired = np.concatenate([ref[[9, 2, 11, 2]], emb(rng, 1, d, 0.3)])  # row 2 twice, one outside R
        gen = emb(rng, 5, d, 0.3) + 0.5 * paired
        if kind == "ais":
            got, got_f = ais(paired, gen, reference=ref), ais(paired, gen, reference=ref, faithful=True)
            want_f = np_script_reference(paired, gen, ref, skip_equal_to=paired)
        else:
            got, got_f = iis(gen, paired, reference=ref), iis(gen, paired, reference=ref, faithful=True)
            want_f = np_script_reference(paired, gen, ref, skip_equal_to=gen)
        np.testing.assert_allclose(float(got_f.mean), want_f, atol=2e-6, err_msg=kind)
        np.testing.assert_allclose(float(got.mean), np_reference_exact(paired, gen, ref), atol=2e-6, err_msg=kind)
        np.testing.assert_allclose(float(got.score), np_score(np_reference_exact(paired, gen, ref)), atol=2e-4)
        assert abs(float(got_f.mean) - float(got.mean)) > 1e-4  # the divisors / exclusions matter here
        # without a reference set the baseline is over the M pairs: a different number
        assert abs(float((ais(paired, gen) if kind == "ais" else iis(gen, paired)).mean) - float(got.mean)) > 1e-4
    with pytest.raises(ValueError, match="reference"):
        ais(paired, gen, reference=ref[:, :4])
