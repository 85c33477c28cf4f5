"""`python -m mtok_jax.convert beats` on an official-layout .pt made from the golden state dict."""

import argparse
import json
import warnings

import jax
import numpy as np
import pytest

from mtok_jax import convert, pt_checkpoint
from mtok_jax.models import beats as B
from mtok_jax.models import diffusion
from mtok_jax.models.embedder import WRAPPER_PARTS
from test_diffusion import TINY_UNET


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
    recorded = json.loads((out_dir / "config.json").read_text())
    assert recorded["source_checkpoint"] == "BEATs_small.pt" and recorded["finetuned_head"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fine-tuned source loads without the provenance warning
        model, params = B.load_beats(out_dir)
    assert model.cfg["encoder_embed_dim"] == 64 and model.cfg["deep_norm"] is True

    out = jax.jit(model.apply)({"params": params}, d["wav_3p3s"][None])
    np.testing.assert_allclose(np.asarray(out.fbank), d["b_3p3s/fbank"], atol=5e-4, rtol=0)
    np.testing.assert_allclose(np.stack([np.asarray(h) for h in out.hidden_states]), d["b_3p3s/hidden_states"],
                               atol=1e-3, rtol=1e-3)
    np.testing.assert_allclose(np.asarray(out.features), d["b_3p3s/final"], atol=1e-3, rtol=1e-3)


@pytest.mark.torch
def test_checkpoint_without_head_warns(golden_dir, tmp_path, capsys):
    """The self-supervised BEATs_iter3_plus_AS2M.pt (no predictor.*) converts, with a warning at conversion
    and at every load naming the fine-tuned checkpoint; a folder without any record warns too."""
    torch = pytest.importorskip("torch")
    d = np.load(golden_dir / "beats_small.npz")
    model_sd = {k[3:]: torch.from_numpy(np.array(d[k])) for k in d.files if k.startswith("sd/")}
    ckpt = tmp_path / "BEATs_iter3_plus_AS2M.pt"
    torch.save({"cfg": json.loads(str(d["config_json"])), "model": model_sd}, ckpt)
    out_dir = tmp_path / "beats"
    convert.main(["beats", str(ckpt), str(out_dir)])
    assert "no fine-tuning head" in capsys.readouterr().err
    assert json.loads((out_dir / "config.json").read_text())["finetuned_head"] is False
    with pytest.warns(UserWarning, match="BEATs_iter3_plus_AS2M.pt, which has no fine-tuning head.*cpt2"):
        B.load_beats(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    for key in B.PROVENANCE_KEYS:  # a folder converted before the record existed
        del config[key]
    (out_dir / "config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match="no record of its source checkpoint"):
        B.load_beats(out_dir)
    # A run's export of BEATs trained from random weights (the demo) loads silently; from the
    # self-supervised file it still warns.
    for source, warns in ((B.RANDOM_SOURCE, False), ("BEATs_iter3_plus_AS2M.pt", True)):
        (out_dir / "config.json").write_text(json.dumps({**config, "source_checkpoint": B.FINETUNED_FROM + source,
                                                         "finetuned_head": None}))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            B.load_beats(out_dir)
        assert any("BEATs at" in str(w.message) for w in caught) == warns, source


@pytest.mark.torch
def test_convert_rejects_other_layouts(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {}}, bad)
    with pytest.raises(SystemExit, match="official BEATs layout"):
        convert.main(["beats", str(bad), str(tmp_path / "out")])
    pickled = tmp_path / "pickled.pt"                  # not loadable with weights_only=True: needs --trusted
    torch.save({"args": argparse.Namespace(a=1)}, pickled)
    with pytest.raises(pt_checkpoint.UntrustedCheckpoint, match="holds non-tensor objects"):
        convert.main(["beats", str(pickled), str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="official BEATs layout"):
        convert.main(["beats", str(pickled), str(tmp_path / "out"), "--trusted"])


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        convert.main(["--help"])
    assert e.value.code == 0
    assert "beats" in capsys.readouterr().out


@pytest.mark.torch
def test_exp2_wrapper_beats_and_unet_parts(golden_dir, tmp_path):
    """An exp2 wrapper state dict: aud_encoder.* → OUT/beats equal to the official-layout conversion of
    the same weights (cfg and provenance from --beats_from); unet.* → OUT/sd whose UNet loads equal to
    the torch UNet's own saved folder, the other SD parts linked."""
    torch = pytest.importorskip("torch")
    import diffusers

    d = np.load(golden_dir / "beats_small.npz")
    beats_sd = {k[3:]: torch.from_numpy(np.array(d[k])) for k in d.files if k.startswith("sd/")}
    torch.save({"cfg": json.loads(str(d["config_json"])), "model": {**beats_sd, "predictor.weight": torch.zeros(2, 64),
                                                                    "predictor.bias": torch.zeros(2)}},
               tmp_path / "cpt2.pt")
    convert.main(["beats", str(tmp_path / "cpt2.pt"), str(tmp_path / "beats_ref")])
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY_UNET)
    sd = tmp_path / "sd"
    unet.save_pretrained(sd / "unet", safe_serialization=True)
    (sd / "vae").mkdir()
    wrapper = {**{f"aud_encoder.{k}": v for k, v in beats_sd.items()},
               **{f"unet.{k}": v for k, v in unet.state_dict().items()}}
    assert {k.split(".")[0] + "." for k in wrapper} == {WRAPPER_PARTS["beats"], WRAPPER_PARTS["unet"]}
    out = tmp_path / "out"
    written = convert.convert_wrapper_parts(wrapper, "model_x_36", str(out), beats_from=str(tmp_path / "beats_ref"),
                                            sd_path=str(sd))
    assert written == {"beats": str(out / "beats"), "unet": str(out / "sd")}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # provenance (fine-tuned head) carried over from --beats_from
        m1, p1 = B.load_beats(out / "beats")
        m0, p0 = B.load_beats(tmp_path / "beats_ref")
    assert m1.cfg == m0.cfg
    jax.tree.map(np.testing.assert_array_equal, p1, p0)
    _, u1 = diffusion.load_unet(out / "sd")
    _, u0 = diffusion.load_unet(sd)
    jax.tree.map(np.testing.assert_array_equal, u1, u0)
    assert (out / "sd" / "vae").is_symlink()
