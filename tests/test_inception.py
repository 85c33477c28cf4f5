"""FID Inception-V3 pool3: resize vs torch, parity with pytorch-fid's InceptionV3, converter round trip."""

import importlib.util
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_or_skip
from metrics import inception as inc

def _torchvision_inception_stub(torch):
    """A stand-in ``torchvision`` holding only what pytorch-fid's module code uses.

    PyPI's torchvision links its C++ ops against the CUDA torch build: beside the local CPU torch
    2.13.0 wheel it fails to import ('operator torchvision::nms does not exist'), and once installed it
    also breaks ``transformers`` image processors (they import torchvision when it is present). So the
    torchvision blocks are transcribed here from torchvision's ``models/inception.py`` architecture:
    layer definitions of BasicConv2d / InceptionA–E / Inception3 and the forwards of the blocks that
    pytorch-fid does not patch (B, D). The FID blocks' forwards, the assembly into pool3, the resize
    and the [-1, 1] scaling are pytorch-fid's own code.
    """
    import types

    nn, F = torch.nn, torch.nn.functional

    class BasicConv2d(nn.Module):
        def __init__(self, cin, cout, **kw):
            super().__init__()
            self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
            self.bn = nn.BatchNorm2d(cout, eps=0.001)

        def forward(self, x):
            return F.relu(self.bn(self.conv(x)))

    C = BasicConv2d

    class InceptionA(nn.Module):
        def __init__(self, cin, pool_features):
            super().__init__()
            self.branch1x1 = C(cin, 64, kernel_size=1)
            self.branch5x5_1, self.branch5x5_2 = C(cin, 48, kernel_size=1), C(48, 64, kernel_size=5, padding=2)
            self.branch3x3dbl_1 = C(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = C(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = C(96, 96, kernel_size=3, padding=1)
            self.branch_pool = C(cin, pool_features, kernel_size=1)

    class InceptionB(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3 = C(cin, 384, kernel_size=3, stride=2)
            self.branch3x3dbl_1 = C(cin, 64, kernel_size=1)
            self.branch3x3dbl_2 = C(64, 96, kernel_size=3, padding=1)
            self.branch3x3dbl_3 = C(96, 96, kernel_size=3, stride=2)

        def forward(self, x):
            d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
            return torch.cat([self.branch3x3(x), d, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionC(nn.Module):
        def __init__(self, cin, channels_7x7):
            super().__init__()
            c7 = channels_7x7
            self.branch1x1 = C(cin, 192, kernel_size=1)
            self.branch7x7_1 = C(cin, c7, kernel_size=1)
            self.branch7x7_2 = C(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7_3 = C(c7, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_1 = C(cin, c7, kernel_size=1)
            self.branch7x7dbl_2 = C(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_3 = C(c7, c7, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7dbl_4 = C(c7, c7, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7dbl_5 = C(c7, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch_pool = C(cin, 192, kernel_size=1)

    class InceptionD(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch3x3_1, self.branch3x3_2 = C(cin, 192, kernel_size=1), C(192, 320, kernel_size=3, stride=2)
            self.branch7x7x3_1 = C(cin, 192, kernel_size=1)
            self.branch7x7x3_2 = C(192, 192, kernel_size=(1, 7), padding=(0, 3))
            self.branch7x7x3_3 = C(192, 192, kernel_size=(7, 1), padding=(3, 0))
            self.branch7x7x3_4 = C(192, 192, kernel_size=3, stride=2)

        def forward(self, x):
            a = self.branch3x3_2(self.branch3x3_1(x))
            b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
            return torch.cat([a, b, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

    class InceptionE(nn.Module):
        def __init__(self, cin):
            super().__init__()
            self.branch1x1 = C(cin, 320, kernel_size=1)
            self.branch3x3_1 = C(cin, 384, kernel_size=1)
            self.branch3x3_2a = C(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3_2b = C(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch3x3dbl_1 = C(cin, 448, kernel_size=1)
            self.branch3x3dbl_2 = C(448, 384, kernel_size=3, padding=1)
            self.branch3x3dbl_3a = C(384, 384, kernel_size=(1, 3), padding=(0, 1))
            self.branch3x3dbl_3b = C(384, 384, kernel_size=(3, 1), padding=(1, 0))
            self.branch_pool = C(cin, 192, kernel_size=1)

    class Inception3(nn.Module):
        def __init__(self, num_classes=1000, aux_logits=True, init_weights=None, **_):
            super().__init__()
            assert not aux_logits
            self.Conv2d_1a_3x3 = C(3, 32, kernel_size=3, stride=2)
            self.Conv2d_2a_3x3 = C(32, 32, kernel_size=3)
            self.Conv2d_2b_3x3 = C(32, 64, kernel_size=3, padding=1)
            self.Conv2d_3b_1x1 = C(64, 80, kernel_size=1)
            self.Conv2d_4a_3x3 = C(80, 192, kernel_size=3)
            self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = InceptionA(192, 32), InceptionA(256, 64), InceptionA(288, 64)
            self.Mixed_6a = InceptionB(288)
            self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
            self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
            self.Mixed_7a = InceptionD(768)
            self.Mixed_7b, self.Mixed_7c = InceptionE(1280), InceptionE(2048)
            self.fc = nn.Linear(2048, num_classes)

    inception = types.ModuleType("torchvision.models.inception")
    for cls in (BasicConv2d, InceptionA, InceptionB, InceptionC, InceptionD, InceptionE, Inception3):
        setattr(inception, cls.__name__, cls)
    models = types.ModuleType("torchvision.models")
    models.inception = inception
    models.inception_v3 = lambda weights=None, **kw: Inception3(**kw)
    tv = types.ModuleType("torchvision")
    tv.__version__, tv.models = "0.28.0", models
    return {"torchvision": tv, "torchvision.models": models, "torchvision.models.inception": inception}


def _import_pytorch_fid_inception(monkeypatch):
    """``pytorch_fid.inception`` on the real torchvision when it imports, else on the stub above."""
    torch = torch_or_skip()
    if importlib.util.find_spec("pytorch_fid") is None:
        pytest.skip("pytorch-fid not installed (pip install -c requirements-lock.txt --no-deps pytorch-fid==0.3.0)")
    try:
        import pytorch_fid.inception as pfi

        return torch, pfi
    except (ImportError, RuntimeError):  # no torchvision, or PyPI's build beside the CPU torch
        pass
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith(("torchvision.", "pytorch_fid"))]:
        monkeypatch.delitem(sys.modules, name)
    for name, module in _torchvision_inception_stub(torch).items():
        monkeypatch.setitem(sys.modules, name, module)
    import pytorch_fid.inception as pfi

    monkeypatch.delitem(sys.modules, "pytorch_fid.inception")  # do not leak the stub-based module
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
    torch, pfi = _import_pytorch_fid_inception(monkeypatch)
    rng = np.random.default_rng(2)
    sd = _to_fid_state_dict(params, rng)
    pth = tmp_path / "pt_inception-2015-12-05-test.pth"
    torch.save(sd, pth)

    out = tmp_path / "inception"
    from metrics.convert import main as convert_main

    convert_main(["inception", str(pth), str(out)])  # the CLI → inc.convert_checkpoint
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
