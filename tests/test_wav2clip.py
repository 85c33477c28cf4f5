"""Wav2CLIP audio encoder: parity with the PyTorch reference outputs in golden/wav2clip_audio.npz
(docs/design.md §4.2, tolerances from §4.0), converter round trips, and the tiny demo writer."""

import numpy as np
import pytest

from conftest import torch_or_skip
from metrics import wav2clip as w2c

EMB = dict(atol=2e-5, rtol=1e-4)
LAYER = dict(atol=5e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def golden(golden_dir):
    return dict(np.load(golden_dir / "wav2clip_audio.npz"))


@pytest.fixture(scope="module")
def state_dict(golden):
    return {k[3:]: v for k, v in golden.items() if k.startswith("sd/")}


@pytest.fixture(scope="module")
def converted(state_dict):
    variables, config = w2c.params_from_torch(state_dict)
    return w2c.model_from_config(config), variables, config


def test_config_inferred(converted):
    _, _, config = converted
    assert config["width"] == 64 and config["mlp_units"] == [512, 512, 512]
    assert (config["n_fft"], config["hop_length"]) == (512, 353)


def test_stages_utterance_3s(golden, converted):
    model, variables, _ = converted
    power = w2c.power_spectrogram(golden["wav_3s"][None])
    ref_power = golden["utt_3s/power_spec"][:, 0]
    np.testing.assert_allclose(np.asarray(power), ref_power, rtol=1e-4, atol=1e-4 * ref_power.max())
    spec = w2c.normalized_log_spectrogram(power)
    np.testing.assert_allclose(np.asarray(spec), golden["utt_3s/log_spec_normalized"][:, 0], atol=5e-4)
    # feed the stored conv1 input so the network is checked on its own
    emb, state = model.apply(variables, golden["utt_3s/log_spec_normalized"][:, 0], mutable=["intermediates"])
    inter = state["intermediates"]
    for i in range(1, 5):
        got = np.asarray(inter["encoder"][f"layer{i}"][0]).transpose(0, 3, 1, 2)  # NHWC → NCHW
        np.testing.assert_allclose(got, golden[f"utt_3s/layer{i}"], **LAYER)
    np.testing.assert_allclose(np.asarray(inter["encoder_out"][0]), golden["utt_3s/encoder_out"], **EMB)
    np.testing.assert_allclose(np.asarray(emb), golden["utt_3s/embedding"], **EMB)


def test_embed_utterances_and_batch(golden, converted):
    model, variables, config = converted
    for name in ("5s", "3s"):
        got = w2c.embed_audio(model, variables, golden[f"wav_{name}"][None], config=config)
        np.testing.assert_allclose(np.asarray(got), golden[f"utt_{name}/embedding"], **EMB)
    # batch-wide normalisation: differs from the single-clip results, matches the reference batch
    got = np.asarray(w2c.embed_audio(model, variables, golden["batch/input"]))
    np.testing.assert_allclose(got, golden["batch/embedding"], **EMB)
    assert np.abs(got[0] - golden["utt_5s/embedding"][0]).max() > 1e-3
    # per-item normalisation = each clip embedded alone
    two = np.stack([golden["wav_5s"], golden["batch/input"][0]])
    got = np.asarray(w2c.embed_audio(model, variables, two, normalization="item"))
    np.testing.assert_allclose(got, np.repeat(golden["utt_5s/embedding"], 2, 0), **EMB)


@pytest.mark.parametrize("fl,hop,wav", [(16000, 16000, "5s"), (16000, 16000, "3s"), (16000, 8000, "5s")])
def test_frame_mode(golden, converted, fl, hop, wav):
    model, variables, _ = converted
    got = np.asarray(w2c.embed_audio(model, variables, golden[f"wav_{wav}"][None], frame_length=fl, hop_length=hop))
    want = golden[f"frame_fl{fl}_hop{hop}/embedding_{wav}"]  # [1, 512, n] channels first
    assert got.shape == (1, want.shape[2], 512)
    np.testing.assert_allclose(got.transpose(0, 2, 1), want, **EMB)


def test_module_key_names_and_errors(state_dict, converted):
    # the module's own state_dict names (encoder.* / transform.*) convert to the same tree
    _, variables, _ = converted
    renamed = {k.replace("audio_encoder.", "encoder.").replace("audio_transform.", "transform."): v
               for k, v in state_dict.items()}
    renamed["encoder.fc.weight"] = np.zeros((10, 512), np.float32)  # unused classifier in real checkpoints
    other, _ = w2c.params_from_torch(renamed)
    from mtok_jax.params_io import flatten

    a, b = flatten(variables), flatten(other)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    broken = dict(state_dict)
    del broken["audio_encoder.layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match="missing"):
        w2c.params_from_torch(broken)
    with pytest.raises(KeyError):
        w2c.params_from_torch({"image_encoder.x": np.zeros(3)})


@pytest.mark.torch
def test_convert_checkpoint_roundtrip(tmp_path, golden, state_dict):
    torch = torch_or_skip()
    ckpt = {"state_dict": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()},
            "epoch": 3}
    ckpt["state_dict"]["image_encoder.proj.weight"] = torch.zeros(4, 4)  # ignored
    torch.save(ckpt, tmp_path / "Wav2CLIP.pt")
    out = w2c.convert_checkpoint(tmp_path / "Wav2CLIP.pt", tmp_path / "w2c")
    model, variables, config = w2c.load_wav2clip(out)
    got = w2c.embed_audio(model, variables, golden["wav_3s"][None], config=config)
    np.testing.assert_allclose(np.asarray(got), golden["utt_3s/embedding"], **EMB)


def test_tiny_writer(tmp_path):
    from metrics.demo_models import write_tiny_wav2clip

    d = write_tiny_wav2clip(tmp_path / "tiny", seed=1, width=8, embed_dim=24)
    model, variables, config = w2c.load_wav2clip(d)
    assert config["width"] == 8 and config["mlp_units"] == [64, 24, 24]
    wav = np.random.default_rng(0).uniform(-0.5, 0.5, (3, 16000)).astype(np.float32)
    e = np.asarray(w2c.embed_audio(model, variables, wav, normalization="item"))
    assert e.shape == (3, 24) and np.isfinite(e).all() and np.abs(e[0] - e[1]).max() > 1e-6
    # random (not 0/1) running statistics were written and loaded
    assert np.abs(np.asarray(variables["batch_stats"]["encoder"]["bn1"]["mean"])).max() > 0
