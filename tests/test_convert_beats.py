"""`python -m mtok_jax.convert beats` on an official-layout .pt made from the golden state dict."""

import argparse
import json

import jax
import numpy as np
import pytest

from mtok_jax import convert
from mtok_jax.models import beats as B


@pytest.mark.torch
def test_convert_official_checkpoint_reproduces_golden(golden_dir, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    d = np.load(golden_dir / "beats_small.npz")
    cfg = json.loads(str(d["config_json"]))
    model_sd = {k[3:]: torch.from_numpy(np.array(d[k])) for k in d.files if k.startswith("sd/")}
    # a fine-tuned checkpoint's predictor head is present in the file and ignored (AudioToken drops it)
    model_sd["predictor.weight"] = torch.zeros(527, cfg["encoder_embed_dim"])
    model_sd["predictor.bias"] = torch.zeros(527)
    ckpt = tmp_path / "BEATs_small.pt"
    torch.save({"cfg": cfg, "model": model_sd}, ckpt)

    out_dir = tmp_path / "beats"
    convert.main(["beats", str(ckpt), str(out_dir)])
    assert "12 layers" in capsys.readouterr().out
    model, params = B.load_beats(out_dir)
    assert model.cfg["encoder_embed_dim"] == 64 and model.cfg["deep_norm"] is True

    out = jax.jit(model.apply)({"params": params}, d["wav_3p3s"][None])
    np.testing.assert_allclose(np.asarray(out.fbank), d["b_3p3s/fbank"], atol=5e-4, rtol=0)
    np.testing.assert_allclose(np.stack([np.asarray(h) for h in out.hidden_states]), d["b_3p3s/hidden_states"],
                               atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(out.features), d["b_3p3s/final"], atol=1e-3, rtol=1e-3)


@pytest.mark.torch
def test_convert_rejects_other_layouts(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(SystemExit, match="official BEATs layout"):
        convert.main(["beats", str(bad), str(tmp_path / "out")])
    pickled = tmp_path / "pickled.pt"                  # not loadable with weights_only=True: needs --trusted
    torch.save({"args": argparse.Namespace(a=1)}, pickled)
    with pytest.raises(SystemExit, match="holds non-tensor objects"):
        convert.main(["beats", str(pickled), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="official BEATs layout"):
        convert.main(["beats", str(pickled), str(tmp_path / "out"), "--trusted"])


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    assert e.value.code == 0
    assert "beats" in capsys.readouterr().out
