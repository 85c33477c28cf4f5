"""Flax BEATs against the PyTorch reference tensors in golden/beats_small.npz (docs/design.md §4.1)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtok_jax.models import beats as B

TOL = dict(atol=1e-3, rtol=1e-3)          # from the waveform (docs/design.md §4.0)
STAGE_TOL = dict(atol=1e-4, rtol=1e-4)    # from the stored fbank


@pytest.fixture(scope="module")
def golden(golden_dir):
    d = np.load(golden_dir / "beats_small.npz")
    return {k: d[k] for k in d.files}


@pytest.fixture(scope="module")
def cfg(golden):
    return json.loads(str(golden["config_json"]))


@pytest.fixture(scope="module")
def params(golden, cfg):
    sd = {k[3:]: v for k, v in golden.items() if k.startswith("sd/")}
    return B.params_from_torch(sd, cfg)


def _from_fbank(cfg, dtype=jnp.float32, split=True, deterministic=True):
    model = B.BEATs(cfg, dtype=dtype, split_conv_pos=split)

    def run(p, fbank, rng=None):
        rngs = None if rng is None else {"dropout": rng}
        return model.apply({"params": p}, fbank, None, deterministic, method=B.BEATs.from_fbank,
                           mutable=["intermediates"], rngs=rngs)
    return jax.jit(run)


@pytest.fixture(scope="module")
def case_b(cfg, params, golden):
    """Case b_3p3s from the stored fbank, with intermediates."""
    return _from_fbank(cfg)(params, golden["b_3p3s/fbank"])


@pytest.fixture(scope="module")
def pad_batch_wave(cfg, params, golden):
    """pad_batch waveforms through the full model (fbank inside), with and without the padding mask."""
    model = B.BEATs(cfg)
    wav = np.stack([golden["wav_10s"], np.pad(golden["wav_3p3s"], (0, 160000 - 52800))])
    fwd = jax.jit(lambda p, x, m: model.apply({"params": p}, x, m))
    return fwd(params, wav, None), fwd(params, wav, golden["pad_batch/padding_mask_samples"])


def test_relative_position_buckets_and_weight_norm(golden, params):
    b = B.relative_position_buckets_1d(1023, 320, 800)
    np.testing.assert_array_equal(b, golden["rel_bucket_1d"])
    kernel = params["encoder"]["pos_conv"]["kernel"]          # [K, C/g, C]
    np.testing.assert_allclose(kernel.transpose(2, 1, 0), golden["derived/pos_conv_weight_effective"],
                               atol=1e-7, rtol=1e-6)


def test_params_from_torch_rejects_mismatched_state_dicts(golden, cfg):
    sd = {k[3:]: v for k, v in golden.items() if k.startswith("sd/")}
    with pytest.raises(ValueError, match="no 'encoder.layers.11.fc1.weight'"):
        B.params_from_torch({k: v for k, v in sd.items() if k != "encoder.layers.11.fc1.weight"}, cfg)
    with pytest.raises(ValueError, match="unexpected BEATs state-dict keys"):
        B.params_from_torch(sd, dict(cfg, encoder_layers=11))
    B.params_from_torch(dict(sd, **{"predictor.weight": np.zeros((527, 64), np.float32)}), cfg)


def test_every_stage_from_fbank(case_b, golden):
    out, state = case_b
    it = state["intermediates"]
    enc = it["encoder"]
    attn = enc["layers_0"]["self_attn"]
    g = lambda k: golden["b_3p3s/" + k]                        # noqa: E731
    pairs = [(it["patch_embed"][0], g("patch_embed")), (it["patch_embed_ln"][0], g("patch_embed_ln")),
             (it["post_extract_proj_out"][0], g("post_extract_proj")), (enc["pos_conv_out"][0], g("pos_conv")),
             (enc["encoder_input"][0], g("encoder_input")),
             (attn["grep_linear_out"][0], g("layer1_grep_linear_out")),
             (attn["attn_probs"][0], g("layer1_attn_probs")), (attn["attn_out"][0], g("layer1_attn_out")),
             (np.stack(out.hidden_states), g("hidden_states")), (out.features, g("final"))]
    for ours, ref in pairs:
        assert ours.shape == ref.shape
        np.testing.assert_allclose(np.asarray(ours), ref, **STAGE_TOL)
    np.testing.assert_array_equal(np.asarray(enc["rel_pos_bias"][0]), g("rel_pos_bias_raw"))
    assert len(out.hidden_states) == 12 and out.padding_mask is None


def test_from_waveform_all_layers(pad_batch_wave, golden):
    out, _ = pad_batch_wave                                   # no mask: row 0 is case a_10s
    assert out.features.shape == (2, 496, 64) and out.padding_mask is None
    np.testing.assert_allclose(np.asarray(out.fbank[0]), golden["a_10s/fbank"][0], atol=5e-4, rtol=0)
    hs = np.stack([np.asarray(h[0]) for h in out.hidden_states])
    np.testing.assert_allclose(hs, golden["a_10s/hidden_states"][:, 0], **TOL)
    np.testing.assert_allclose(np.asarray(out.features[:1]), golden["a_10s/final"], **TOL)


def test_padded_batch_and_masks(pad_batch_wave, golden):
    _, out = pad_batch_wave
    mask_s = golden["pad_batch/padding_mask_samples"]
    np.testing.assert_array_equal(np.asarray(B.downsample_padding_mask(mask_s, 998)),
                                  golden["pad_batch/padding_mask_frames"])
    np.testing.assert_array_equal(np.asarray(out.padding_mask), golden["pad_batch/padding_mask_patches"])
    np.testing.assert_array_equal(np.asarray(out.padding_mask), golden["pad_batch/padding_mask_out"])
    assert not out.padding_mask[1, 164] and out.padding_mask[1, 165]      # the reference's crude rule
    np.testing.assert_allclose(np.asarray(out.fbank), golden["pad_batch/fbank"], atol=5e-4, rtol=0)
    np.testing.assert_allclose(np.stack([np.asarray(h) for h in out.hidden_states]),
                               golden["pad_batch/hidden_states"], **TOL)
    np.testing.assert_allclose(np.asarray(out.features), golden["pad_batch/final"], **TOL)


def test_audiotoken_concat(pad_batch_wave, golden_dir):
    out, _ = pad_batch_wave
    ref = np.load(golden_dir / "audiotoken_embedder.npz")["beats10s/input"]     # [1, 496, 192]
    feats = np.asarray(B.audiotoken_features(out))[:1]
    assert B.AUDIOTOKEN_LAYERS == (3, 7, 11)
    np.testing.assert_allclose(feats, ref, **TOL)
    short = B.BEATsOutput(fbank=out.fbank, hidden_states=out.hidden_states[:4], features=out.features)
    with pytest.raises(ValueError, match="only 4 layers"):
        B.audiotoken_features(short)
    assert B.audiotoken_features(short, layers=(1, 3)).shape == (2, 496, 128)


def test_split_and_grouped_conv_pos_agree(cfg, params, golden, case_b):
    grouped, state = _from_fbank(cfg, split=False)(params, golden["b_3p3s/fbank"])
    split_pos = case_b[1]["intermediates"]["encoder"]["pos_conv_out"][0]
    grouped_pos = state["intermediates"]["encoder"]["pos_conv_out"][0]
    np.testing.assert_allclose(np.asarray(grouped_pos), np.asarray(split_pos), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(grouped_pos), golden["b_3p3s/pos_conv"], **STAGE_TOL)
    np.testing.assert_allclose(np.asarray(grouped.features), golden["b_3p3s/final"], **STAGE_TOL)


def test_conv_pos_split_grouped_and_numpy_agree_with_gradients():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 20, 32)).astype(np.float32)
    kernel = rng.standard_normal((8, 8, 32)).astype(np.float32) * 0.2          # K=8, 4 groups of 8
    bias = rng.standard_normal(32).astype(np.float32) * 0.1
    p = {"params": {"kernel": kernel, "bias": bias}}
    xp = np.pad(x.astype(np.float64), ((0, 0), (4, 4), (0, 0)))
    ref = np.zeros((2, 21, 32))
    for o in range(32):
        g = o // 8
        for k in range(8):
            ref[:, :, o] += xp[:, k:k + 21, g * 8:(g + 1) * 8] @ kernel[k, :, o]
    ref = ref[:, :20] + bias                                                  # SamePad drops the last step
    ref = 0.5 * ref * (1 + np.vectorize(math.erf)(ref / math.sqrt(2)))
    outs, grads = [], []
    for split in (True, False):
        mod = B.ConvPositionalEmbedding(8, 4, split)
        outs.append(np.asarray(jax.jit(mod.apply)(p, x)))
        grads.append(jax.jit(jax.grad(lambda q, v: jnp.sum(mod.apply(q, v) ** 2), argnums=(0, 1)))(p, x))
        np.testing.assert_allclose(outs[-1], ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-6, rtol=0)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5),
                 grads[0], grads[1])


def test_dropout_only_when_not_deterministic(cfg, params, golden):
    drop_cfg = dict(cfg, dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, dropout_input=0.1,
                    encoder_layerdrop=0.0)
    fb, ref = golden["b_3p3s/fbank"], golden["b_3p3s/final"]
    det, _ = _from_fbank(drop_cfg)(params, fb)
    np.testing.assert_allclose(np.asarray(det.features), ref, **STAGE_TOL)
    train = _from_fbank(drop_cfg, deterministic=False)
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a, b, c = (np.asarray(train(params, fb, k)[0].features) for k in (k1, k1, k2))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - ref).mean() > 0.05 and np.abs(a - c).mean() > 0.05


def test_layer_drop_skips_layers_in_train_mode(cfg, params, golden):
    out, _ = _from_fbank(dict(cfg, encoder_layerdrop=1.0), deterministic=False)(
        params, golden["b_3p3s/fbank"], jax.random.PRNGKey(1))
    for h in out.hidden_states:                                 # every layer dropped: x passes through
        np.testing.assert_allclose(np.asarray(h), golden["b_3p3s/encoder_input"], **STAGE_TOL)


def test_bf16_close(cfg, params, golden):
    out, _ = _from_fbank(cfg, dtype=jnp.bfloat16)(params, golden["b_3p3s/fbank"])
    assert out.features.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out.features, np.float32) - golden["b_3p3s/final"])
    assert err.max() < 0.3 and err.mean() < 0.02


def test_grad_multiply():
    x = jnp.arange(3.0)
    np.testing.assert_allclose(np.asarray(B.grad_multiply(x, 0.6)), [0.0, 1.0, 2.0])
    g = jax.grad(lambda v: jnp.sum(B.grad_multiply(v, 0.6) * 2.0))(x)
    np.testing.assert_allclose(np.asarray(g), [1.2, 1.2, 1.2], rtol=1e-6)


def test_full_size_shapes_without_weights():
    shapes = B.param_shapes(B.BEATS_ITER3_PLUS_AS2M_CFG)
    n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
    c, f, L, h = 768, 3072, 12, 12
    per_layer = 4 * (c * c + c) + (64 * 8 + 8) + h + 4 * c + (c * f + f) + (f * c + c)
    # docs/design.md §4.1.6 torch shapes, minus weight_g (recomposed) and the 11 shared copies of the bias table
    expected = 512 * 256 + 2 * 512 + (512 * c + c) + (c * 48 * 128 + c) + 2 * c + 320 * h + L * per_layer
    assert n == expected and 90.0e6 < n < 90.5e6
    assert shapes["encoder"]["pos_conv"]["kernel"].shape == (128, 48, 768)


def test_tiny_random_model_and_save_load(tmp_path):
    tiny = dict(B.BEATS_ITER3_PLUS_AS2M_CFG, encoder_layers=2, encoder_embed_dim=32, encoder_ffn_embed_dim=64,
                encoder_attention_heads=4, embed_dim=32, conv_pos=16, conv_pos_groups=4, num_buckets=32,
                max_distance=64)
    params = B.init_params(tiny, jax.random.PRNGKey(0))
    assert "post_extract_proj" not in params                    # embed_dim == encoder_embed_dim
    B.save_beats(tmp_path, tiny, params)
    model, loaded = B.load_beats(tmp_path)
    assert model.cfg == B.beats_config(tiny)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, loaded)
    out = jax.jit(model.apply)({"params": loaded}, np.zeros((1, 16000), np.float32))
    assert out.features.shape == (1, 48, 32) and len(out.hidden_states) == 2     # 98 frames → 6·8 tokens
    assert np.isfinite(np.asarray(out.features)).all()
    with pytest.raises(ValueError, match="smaller than one"):
        jax.eval_shape(model.apply, {"params": loaded}, np.zeros((1, 2000), np.float32))


def test_blocked_attention_equals_batched_with_mask_and_gradients(cfg, params, golden, monkeypatch):
    """model.beats_attention=blocked (heads and blocks of queries one at a time; blocks of ≤ 128 of the
    496 queries here) = the batched attention and the golden tensors: forward on the padded batch (key
    padding mask, GRU-gated relative bias) and gradients w.r.t. every parameter and the waveform."""
    from mtok_jax.models import attention as attention_lib

    monkeypatch.setattr(attention_lib, "MIN_BLOCKED_SCORES", 0)
    monkeypatch.setattr(attention_lib, "MAX_BLOCK_QUERIES", 128)
    assert attention_lib.query_blocks(496, 496) == 4  # 124 queries a block
    wav = np.stack([golden["wav_10s"], np.pad(golden["wav_3p3s"], (0, 160000 - 52800))])
    mask = golden["pad_batch/padding_mask_samples"]
    weights = np.random.default_rng(0).normal(size=(2, 496, cfg["encoder_embed_dim"])).astype(np.float32)

    def run(blocked):
        model = B.BEATs(cfg, blocked_attention=blocked)

        def objective(p, x):
            out = model.apply({"params": p}, x, mask)
            return jnp.sum(jnp.where(out.padding_mask[..., None], 0.0, out.features) * weights), out.features
        fn = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))
        loops = fn.lower(params, wav).as_text(dialect="hlo").count(" while(")
        (_, feats), grads = fn(params, wav)
        return np.asarray(feats), jax.tree.map(np.asarray, grads), loops

    (batched, g_batched, loops_batched), (blocked, g_blocked, loops_blocked) = run(False), run(True)
    assert loops_blocked >= loops_batched + cfg["encoder_layers"]  # the heads' loops are there
    np.testing.assert_allclose(blocked, golden["pad_batch/final"], **TOL)
    np.testing.assert_allclose(blocked, batched, atol=1e-5, rtol=1e-5)
    leaves_b, leaves_p = jax.tree.leaves(g_batched), jax.tree.leaves(g_blocked)
    assert len(leaves_b) == len(leaves_p) > 10 and np.abs(leaves_b[-1]).max() > 0
    for a, b in zip(leaves_p, leaves_b):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(np.abs(b).max(), 1.0))
    assert B.resolve_attention("auto", "cpu") and not B.resolve_attention("auto", "gpu")
    assert not B.resolve_attention("auto", "cpu", trained=True)  # exp2: blocked's loops have no backward of their own
    assert B.resolve_attention("blocked", "gpu") and not B.resolve_attention("batched", "cpu")
    with pytest.raises(ValueError, match="model.beats_attention"):
        B.resolve_attention("flash")
