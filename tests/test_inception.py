"""FID Inception-V3 pool3: resize vs torch, parity with pytorch-fid's InceptionV3, converter round trip."""

import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_or_skip
from metrics import inception as inc

_TV_LIB = []  # keeps the shim's torch.library.Library alive


def _import_pytorch_fid_inception():
    """Import ``pytorch_fid.inception`` (and torchvision) or skip with the exact reason.

    PyPI's torchvision wheel links its C++ ops against the CUDA torch build; beside the local CPU
    torch 2.13.0 wheel ``_C.so`` does not load and ``import torchvision`` fails in
    ``_meta_registrations`` ('operator torchvision::nms does not exist'). pytorch-fid only needs
    torchvision's pure-Python Inception blocks, so when the ops do not load we declare the two op
    schemas that the import registers fake kernels for (nms, qnms); no op is ever called.
    """
    torch = torch_or_skip()
    spec = importlib.util.find_spec("torchvision")
    if spec is None or importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("pytorch-fid / torchvision not installed (pip install -e '.[torch]')")
    if not _TV_LIB and "torchvision" not in __import__("sys").modules:
        so = [f for f in os.listdir(os.path.dirname(spec.origin)) if f.startswith("_C") and f.endswith(".so")]
        try:
            torch.ops.load_library(os.path.join(os.path.dirname(spec.origin), so[0]))
        except (OSError, RuntimeError, IndexError):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _TV_LIB.append(lib)
    import pytorch_fid.inception as pfi

    return torch, pfi


@pytest.fixture(scope="module")
def params():
    return inc.random_params(seed=1)


def _to_fid_state_dict(params, rng):
    """Our params → torch state dict in the FID checkpoint layout (written here, independently)."""
    import torch

    sd = {}

    def walk(tree, prefix):
        for k, v in tree.items():
            if isinstance(v, dict):
                walk(v, prefix + [k])
                continue
            mod = ".".join(prefix)
            if k == "kernel":
                sd[mod + ".weight"] = torch.from_numpy(np.ascontiguousarray(np.transpose(v, (3, 2, 0, 1))))
            else:
                name = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}[k]
                sd[mod + "." + name] = torch.from_numpy(np.array(v))
                if k == "var":
                    sd[mod + ".num_batches_tracked"] = torch.tensor(0)

    walk(params, [])
    sd["fc.weight"] = torch.from_numpy(rng.standard_normal((1008, 2048)).astype(np.float32) * 0.01)
    sd["fc.bias"] = torch.zeros(1008)
    return sd


def test_resize_matrix_properties():
    for n_in, n_out in [(7, 299), (299, 299), (310, 299), (1024, 299)]:
        w = inc.bilinear_resize_matrix(n_in, n_out)
        assert w.shape == (n_out, n_in)
        np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
        assert (w >= 0).all() and ((w > 0).sum(1) <= 2).all()
    np.testing.assert_array_equal(inc.bilinear_resize_matrix(299, 299), np.eye(299, dtype=np.float32))


@pytest.mark.torch
def test_preprocess_matches_torch_interpolate():
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (40, 57), (299, 299), (320, 310), (512, 384)]:
        img = rng.integers(0, 256, (2, h, w, 3), dtype=np.uint8)
        ours = np.asarray(inc.preprocess(jnp.asarray(img)))
        x = torch.from_numpy(img).permute(0, 3, 1, 2).float() / 255.0
        ref = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        ref = (2 * ref - 1).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6, err_msg=f"{h}x{w}")


def test_params_from_torch_rejects_wrong_layout(params):
    sd = {"Conv2d_1a_3x3.conv.weight": np.zeros((32, 3, 3, 3), np.float32)}
    with pytest.raises(ValueError, match="missing"):
        inc.params_from_torch(sd)
    with pytest.raises(KeyError, match="unexpected key"):
        inc.params_from_torch({"Conv2d_1a_3x3.conv.bias": np.zeros(32, np.float32)})


@pytest.mark.torch
def test_pool3_parity_with_pytorch_fid_and_converter_round_trip(params, tmp_path, monkeypatch):
    torch, pfi = _import_pytorch_fid_inception()
    rng = np.random.default_rng(2)
    sd = _to_fid_state_dict(params, rng)
    pth = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(sd, pth)

    out = tmp_path / "inception"
    inc.convert_checkpoint(pth, out)
    model, loaded = inc.load_inception(out)
    for path, leaf in inc.traverse_util.flatten_dict(params).items():
        got = loaded
        for k in path:
            got = got[k]
        np.testing.assert_array_equal(np.asarray(got), leaf, err_msg="/".join(path))

    # pytorch-fid's own InceptionV3 (FID blocks), with our checkpoint instead of the download.
    monkeypatch.setattr(pfi, "load_state_dict_from_url", lambda *a, **k: torch.load(pth, weights_only=True))
    ref_model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()

    images = rng.integers(0, 256, (3, 48, 64, 3), dtype=np.uint8)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0  # pytorch-fid's ToTensor
        ref = ref_model(x)[0].squeeze(-1).squeeze(-1).numpy()
    ours = inc.pool3_features(model, loaded, images, batch_size=2)  # 2 batches, the last one padded
    assert ours.shape == (3, inc.FEATURE_DIM) and ref.shape == (3, 2048)
    assert np.abs(ref).max() > 1e-2
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
