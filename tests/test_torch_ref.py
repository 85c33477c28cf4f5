"""The PyTorch reference of the audio branch (mtok_jax.torch_ref) against the golden tensors and our Flax ports."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_arrays, golden_state_dict, torch_or_skip
from mtok_jax.models import beats as B
from mtok_jax.models import embedder as E

torch = torch_or_skip()

from mtok_jax.torch_ref import beats as TB  # noqa: E402
from mtok_jax.torch_ref import embedder as TE  # noqa: E402
from mtok_jax.torch_ref import fbank as TF  # noqa: E402

TOL = dict(atol=1e-3, rtol=1e-3)          # BEATs from the waveform (as tests/test_beats.py)
STAGE_TOL = dict(atol=1e-4, rtol=1e-4)    # BEATs from the stored fbank
EMBED_TOL = dict(atol=1e-5, rtol=1e-5)    # embedder (as tests/test_embedder.py)
EMBED_CASES = ("beats10s", "rand")
# A small config on the other code paths: pre-LN, no deep norm, no relative bias, no gate, no post_extract_proj.
TINY_PRENORM = dict(B.BEATS_ITER3_PLUS_AS2M_CFG, encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                    encoder_attention_heads=4, embed_dim=32, conv_pos=16, conv_pos_groups=4, layer_norm_first=True,
                    deep_norm=False, relative_position_embedding=False, gru_rel_pos=False, activation_fn="relu")


def _np(x):
    return x.detach().numpy()


@pytest.fixture(scope="module")
def golden(golden_dir):
    return golden_arrays(golden_dir, "beats_small.npz")


@pytest.fixture(scope="module")
def cfg(golden):
    return json.loads(str(golden["config_json"]))


@pytest.fixture(scope="module")
def state_dict(golden):
    return golden_state_dict(golden)


@pytest.fixture(scope="module")
def model(state_dict, cfg):
    return TB.from_state_dict(state_dict, cfg)


@pytest.fixture(scope="module")
def pad_batch(golden):
    """[wav_10s, wav_3p3s zero-padded to 10 s] and its sample-level padding mask, as tensors."""
    wav = np.stack([golden["wav_10s"], np.pad(golden["wav_3p3s"], (0, 160000 - 52800))])
    return torch.from_numpy(wav), torch.from_numpy(golden["pad_batch/padding_mask_samples"])


@pytest.fixture(scope="module")
def embedder_golden(golden_dir):
    return golden_arrays(golden_dir, "audiotoken_embedder.npz")


@pytest.fixture(scope="module")
def embedder_sd(embedder_golden):
    return golden_state_dict(embedder_golden)


class Recorder:
    """Forward-hook outputs of named submodules: ``with Recorder(model, {'name': module}) as seen: ...``."""

    def __init__(self, modules):
        self.modules, self.seen, self.handles = modules, {}, []

    def __enter__(self):
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: self.seen.setdefault(name, out.detach().clone())))
        return self.seen

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


# ----------------------------------------------------------------------------------------------------
# fbank


@pytest.mark.torch
def test_fbank_matches_golden(golden, pad_batch):
    wav, _ = pad_batch
    raw = _np(TF.kaldi_fbank(wav))
    assert raw.shape == (2, 998, 128) and raw.dtype == np.float32
    np.testing.assert_allclose(raw, golden["pad_batch/fbank_raw"], atol=5e-3, rtol=0)
    assert np.abs(raw[0] - golden["a_10s/fbank_raw"][0]).mean() < 2e-5
    np.testing.assert_allclose(_np(TF.beats_fbank(wav)), golden["pad_batch/fbank"], atol=5e-4, rtol=0)
    np.testing.assert_array_equal(raw[..., 3], np.float32(np.log(np.finfo(np.float32).eps)))   # empty filter 3
    short = _np(TF.kaldi_fbank(torch.from_numpy(golden["wav_3p3s"])))                          # 1-D input
    assert short.shape == (328, 128)
    np.testing.assert_allclose(short, golden["b_3p3s/fbank_raw"][0], atol=5e-3, rtol=0)
    np.testing.assert_allclose(_np(TF.beats_normalize(torch.from_numpy(short))), golden["b_3p3s/fbank"][0],
                               atol=5e-4, rtol=0)
    with pytest.raises(ValueError, match="shorter than one"):
        TF.kaldi_fbank(torch.zeros(1, 300))


# ----------------------------------------------------------------------------------------------------
# BEATs against the golden tensors


@pytest.mark.torch
def test_buckets_weight_norm_and_raw_bias(golden, model):
    rel = torch.from_numpy(golden["rel_pos_1d"].astype(np.int64))
    np.testing.assert_array_equal(_np(TB.relative_position_buckets(rel, 320, 800)), golden["rel_bucket_1d"])
    conv = model.encoder.pos_conv[0]
    np.testing.assert_allclose(_np(conv.weight()), golden["derived/pos_conv_weight_effective"], atol=1e-7, rtol=1e-6)
    attn = [layer.self_attn for layer in model.encoder.layers]
    assert all(a.relative_attention_bias is attn[0].relative_attention_bias for a in attn)   # one shared table
    np.testing.assert_array_equal(_np(attn[0].position_bias(160)), golden["b_3p3s/rel_pos_bias_raw"])


@pytest.mark.torch
def test_state_dict_layout_is_the_official_one(model, state_dict, cfg):
    assert set(model.state_dict()) == set(state_dict)
    with pytest.raises(RuntimeError, match="Missing key"):
        TB.from_state_dict({k: v for k, v in state_dict.items() if k != "encoder.layers.11.fc1.weight"}, cfg)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        TB.from_state_dict(state_dict, dict(cfg, encoder_layers=11))


@pytest.mark.torch
def test_every_stage_from_fbank(golden, model):
    g = lambda k: golden["b_3p3s/" + k]                        # noqa: E731
    layer0 = model.encoder.layers[0]
    watched = {"patch_embed_ln": model.layer_norm, "post_extract_proj": model.post_extract_proj,
               "pos_conv": model.encoder.pos_conv, "encoder_input": model.encoder.layer_norm,
               "layer1_grep_linear_out": layer0.self_attn.grep_linear, "layer1_attn_out": layer0.self_attn,
               "patch_embed": model.patch_embedding}
    with torch.inference_mode(), Recorder(watched) as seen:
        out = model.from_fbank(torch.from_numpy(g("fbank")))
    seen["patch_embed"] = seen["patch_embed"].flatten(2).transpose(1, 2)     # [B, E, F/16, 8] → [B, T, E]
    seen["pos_conv"] = seen["pos_conv"].transpose(1, 2)                      # [B, C, T] → [B, T, C]
    for name, ours in seen.items():
        assert tuple(ours.shape) == g(name).shape, name
        np.testing.assert_allclose(_np(ours), g(name), err_msg=name, **STAGE_TOL)
    np.testing.assert_allclose(_np(torch.stack(out.hidden_states)), g("hidden_states"), **STAGE_TOL)
    np.testing.assert_allclose(_np(out.features), g("final"), **STAGE_TOL)
    assert len(out.hidden_states) == 12 and out.padding_mask is None
    assert torch.equal(out.features, out.hidden_states[-1])


@pytest.mark.torch
def test_from_waveform_without_and_with_padding_mask(golden, model, pad_batch, embedder_golden):
    wav, mask = pad_batch
    with torch.inference_mode():
        plain, padded = model(wav), model(wav, mask)
    # no mask: row 0 is case a_10s
    assert plain.padding_mask is None and tuple(plain.features.shape) == (2, 496, 64)
    np.testing.assert_allclose(_np(plain.fbank[:1]), golden["a_10s/fbank"], atol=5e-4, rtol=0)
    np.testing.assert_allclose(_np(torch.stack(plain.hidden_states)[:, :1]), golden["a_10s/hidden_states"], **TOL)
    np.testing.assert_allclose(_np(plain.features[:1]), golden["a_10s/final"], **TOL)
    np.testing.assert_allclose(_np(TB.audiotoken_features(plain)[:1]), embedder_golden["beats10s/input"], **TOL)
    # with the mask: the crude downsampling, bit-exact, then every layer
    np.testing.assert_array_equal(_np(TB.downsample_padding_mask(mask, 998)), golden["pad_batch/padding_mask_frames"])
    np.testing.assert_array_equal(_np(padded.padding_mask), golden["pad_batch/padding_mask_patches"])
    np.testing.assert_array_equal(_np(padded.padding_mask), golden["pad_batch/padding_mask_out"])
    np.testing.assert_allclose(_np(padded.fbank), golden["pad_batch/fbank"], atol=5e-4, rtol=0)
    np.testing.assert_allclose(_np(torch.stack(padded.hidden_states)), golden["pad_batch/hidden_states"], **TOL)
    np.testing.assert_allclose(_np(padded.features), golden["pad_batch/final"], **TOL)
    assert np.abs(_np(padded.features[1]) - _np(plain.features[1])).max() > 1e-2    # the mask matters


@pytest.mark.torch
def test_audiotoken_features_needs_enough_layers(golden, model):
    with torch.inference_mode():
        out = model.from_fbank(torch.from_numpy(golden["b_3p3s/fbank"]))
    short = out._replace(hidden_states=out.hidden_states[:4])
    with pytest.raises(ValueError, match="only 4 layers"):
        TB.audiotoken_features(short)
    assert tuple(TB.audiotoken_features(short, layers=(1, 3)).shape) == (1, 160, 128)


# ----------------------------------------------------------------------------------------------------
# BEATs against our Flax port


def _flax_and_torch(params, cfg, wav, mask):
    flax_out = jax.jit(B.BEATs(cfg).apply)({"params": params}, wav, mask)
    with torch.inference_mode():
        torch_out = TB.from_flax(params, cfg)(torch.from_numpy(wav), torch.from_numpy(mask))
    return flax_out, torch_out


@pytest.mark.torch
@pytest.mark.parametrize("which", ["golden", "tiny_prenorm"])
def test_from_flax_matches_flax(which, state_dict, cfg):
    if which == "golden":
        params = B.params_from_torch(state_dict, cfg)
    else:
        cfg, params = TINY_PRENORM, B.init_params(TINY_PRENORM, 3)
    rng = np.random.default_rng(11)
    wav = (0.3 * rng.standard_normal((2, 24000))).astype(np.float32)
    mask = np.zeros(wav.shape, bool)
    mask[1, 15000:] = True
    ours, ref = _flax_and_torch(params, cfg, wav, mask)
    np.testing.assert_array_equal(_np(ref.padding_mask), np.asarray(ours.padding_mask))
    np.testing.assert_allclose(_np(ref.fbank), np.asarray(ours.fbank), atol=5e-4, rtol=0)
    assert len(ref.hidden_states) == len(ours.hidden_states)
    for i, (a, b) in enumerate(zip(ref.hidden_states, ours.hidden_states)):
        np.testing.assert_allclose(_np(a), np.asarray(b), err_msg=f"layer {i}", **TOL)
    np.testing.assert_allclose(_np(ref.features), np.asarray(ours.features), **TOL)


@pytest.mark.torch
def test_from_folder_loads_what_save_beats_wrote(tmp_path):
    params = B.init_params(TINY_PRENORM, 4)
    B.save_beats(tmp_path, TINY_PRENORM, params)
    loaded, direct = TB.from_folder(tmp_path), TB.from_flax(params, TINY_PRENORM)
    assert not loaded.training and loaded.config == B.beats_config(TINY_PRENORM)
    assert loaded.post_extract_proj is None
    for (k, a), (k2, b) in zip(loaded.state_dict().items(), direct.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


@pytest.mark.torch
def test_backward_matches_flax_gradients(state_dict, cfg, golden):
    """d(Σ features²)/d params through every layer (GradMultiply 0.6 at each layer input), against jax.grad."""
    params = B.params_from_torch(state_dict, cfg)
    fbank = golden["b_3p3s/fbank"]
    model = B.BEATs(cfg)

    def loss(p):
        out = model.apply({"params": p}, fbank, method=B.BEATs.from_fbank)
        return jnp.sum(out.features ** 2)

    flax_grads = jax.jit(jax.grad(loss))(params)
    ref = TB.from_flax(params, cfg)
    (ref.from_fbank(torch.from_numpy(fbank)).features ** 2).sum().backward()
    pairs = {"encoder.layers.0.fc1.weight": flax_grads["encoder"]["layers_0"]["fc1"]["kernel"].T,
             "encoder.layers.5.self_attn.q_proj.weight": flax_grads["encoder"]["layers_5"]["self_attn"]["q_proj"][
                 "kernel"].T,
             "encoder.layers.0.self_attn.relative_attention_bias.weight":
                 flax_grads["encoder"]["relative_attention_bias"],
             "post_extract_proj.weight": flax_grads["post_extract_proj"]["kernel"].T,
             "patch_embedding.weight": flax_grads["patch_embedding"]["kernel"].transpose(3, 2, 0, 1)}
    named = dict(ref.named_parameters())
    for name, expected in pairs.items():
        expected = np.asarray(expected)
        np.testing.assert_allclose(_np(named[name].grad), expected, atol=2e-3 * np.abs(expected).max(), rtol=2e-3,
                                   err_msg=name)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in ref.parameters())


# ----------------------------------------------------------------------------------------------------
# Embedder


def _check_stages(embedder_golden, case, variant, stages):
    g = lambda k: embedder_golden[f"{case}/{k}"]               # noqa: E731
    np.testing.assert_allclose(_np(stages.fc2_out), g("fc2_out"), **EMBED_TOL)
    for name in ("unary", "self_pairwise", "logits", "attn_weights", "output"):
        np.testing.assert_allclose(_np(getattr(stages, name)), g(f"{variant}/{name}"), err_msg=name, **EMBED_TOL)


@pytest.mark.torch
@pytest.mark.parametrize("case", EMBED_CASES)
def test_embedder_reproduces_golden(embedder_golden, embedder_sd, case):
    module = TE.from_state_dict(embedder_sd)
    assert set(module.state_dict()) == set(embedder_sd) and not module.training
    x = torch.from_numpy(embedder_golden[f"{case}/input"])
    with torch.inference_mode():
        _check_stages(embedder_golden, case, "nodrop", module.stages(x))
        np.testing.assert_allclose(_np(module(x)), embedder_golden[f"{case}/nodrop/output"], **EMBED_TOL)
        keep = torch.from_numpy(embedder_golden[f"{case}/refdrop/unary_dropout_keep"]).transpose(1, 2)   # [B, T, D]
        _check_stages(embedder_golden, case, "refdrop", module.stages(x, unary_dropout_mask=keep))


@pytest.mark.torch
def test_embedder_from_flax_and_dropout(embedder_golden, embedder_sd):
    flax_params = E.params_from_torch(embedder_sd)
    x = embedder_golden["rand/input"]
    module = TE.from_flax(flax_params)
    flax_out = E.AudioTokenEmbedder(32, unary_dropout_at_inference=False).apply({"params": flax_params}, x)
    with torch.inference_mode():
        xt = torch.from_numpy(x)
        np.testing.assert_allclose(_np(module(xt)), np.asarray(flax_out), **EMBED_TOL)
        np.testing.assert_allclose(_np(module(xt)), embedder_golden["rand/nodrop/output"], **EMBED_TOL)
        torch.manual_seed(0)
        a, b = module(xt, train=True), module(xt, train=True)
        assert (a - b).abs().max() > 1e-3 and (a - module(xt)).abs().max() > 1e-3
        always = TE.from_flax(flax_params, unary_dropout_at_inference=True)
        assert (always(xt) - always(xt)).abs().max() > 1e-3                 # the reference's quirk, when asked for
