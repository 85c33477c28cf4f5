"""AudioTokenEmbedder vs the PyTorch reference golden tensors (docs/design.md §4.3)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import golden_arrays, golden_state_dict, torch_or_skip
from mtok_jax import convert
from mtok_jax.models.embedder import (
    AudioTokenEmbedder,
    convert_checkpoint,
    load_embedder,
    params_from_torch,
)
from mtok_jax.params_io import load_params

TOL = dict(atol=1e-5, rtol=1e-5)
CASES = ("beats10s", "rand")


@pytest.fixture(scope="module")
def golden(golden_dir):
    return golden_arrays(golden_dir, "audiotoken_embedder.npz")


@pytest.fixture(scope="module")
def state_dict(golden):
    return golden_state_dict(golden)


@pytest.fixture(scope="module")
def params(state_dict):
    return params_from_torch(state_dict)


def _keep_mask(golden, case):
    """Golden keep mask [B, D, T] (reference Unary layout) → ours [B, T, D]."""
    return np.transpose(golden[f"{case}/refdrop/unary_dropout_keep"], (0, 2, 1))


def _check(golden, case, variant, out, inter):
    np.testing.assert_allclose(inter["fc2_out"][0], golden[f"{case}/fc2_out"], **TOL)
    for name in ("unary", "self_pairwise", "logits", "attn_weights"):
        np.testing.assert_allclose(inter[name][0], golden[f"{case}/{variant}/{name}"], err_msg=name, **TOL)
    np.testing.assert_allclose(out, golden[f"{case}/{variant}/output"], **TOL)


@pytest.mark.parametrize("case", CASES)
def test_golden_dropout_off(golden, params, case):
    config = json.loads(str(golden["config_json"]))
    module = AudioTokenEmbedder(config["output_size"], unary_dropout_at_inference=False)
    out, state = module.apply({"params": params}, golden[f"{case}/input"], deterministic=True,
                              mutable=["intermediates"])
    _check(golden, case, "nodrop", out, state["intermediates"])


@pytest.mark.parametrize("case", CASES)
def test_golden_dropout_mask_replayed(golden, params, case):
    module = AudioTokenEmbedder(32)
    out, state = module.apply({"params": params}, golden[f"{case}/input"],
                              unary_dropout_mask=_keep_mask(golden, case), mutable=["intermediates"])
    _check(golden, case, "refdrop", out, state["intermediates"])
    assert not np.allclose(golden[f"{case}/refdrop/output"], golden[f"{case}/nodrop/output"], atol=1e-4)


def test_unary_dropout_flag(golden, params):
    x = golden["rand/input"]
    k1, k2 = jax.random.PRNGKey(0), jax.random.PRNGKey(1)
    on = AudioTokenEmbedder(32, unary_dropout_at_inference=True)
    a = on.apply({"params": params}, x, deterministic=True, rngs={"dropout": k1})
    b = on.apply({"params": params}, x, deterministic=True, rngs={"dropout": k2})
    a_again = on.apply({"params": params}, x, deterministic=True, rngs={"dropout": k1})
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3
    np.testing.assert_array_equal(a, a_again)
    with pytest.raises(Exception):  # the reference behaviour needs an rng at inference
        on.apply({"params": params}, x, deterministic=True)

    off = AudioTokenEmbedder(32, unary_dropout_at_inference=False)
    c = off.apply({"params": params}, x, deterministic=True, rngs={"dropout": k1})
    d = off.apply({"params": params}, x, deterministic=True, rngs={"dropout": k2})
    np.testing.assert_array_equal(c, d)
    np.testing.assert_allclose(c, golden["rand/nodrop/output"], **TOL)
    # Training mode still drops, flag or not.
    t1 = off.apply({"params": params}, x, deterministic=False, rngs={"dropout": k1})
    np.testing.assert_array_equal(t1, a)


def test_unary_dropout_is_p_half_and_unbiased(params, golden):
    """Over many dropout keys the unary potential averages to the no-dropout one (scale 1/(1-p)),
    and its per-key spread matches p = 0.5: u − u_nodrop = Σ_i w_i·r_i·(2·keep_i − 1)."""
    x = golden["rand/input"]
    module = AudioTokenEmbedder(32)
    n = 512

    def unary(key):
        _, st = module.apply({"params": params}, x, rngs={"dropout": key}, mutable=["intermediates"])
        return st["intermediates"]["unary"][0]

    u = jax.vmap(unary)(jax.random.split(jax.random.PRNGKey(5), n))         # [n, B, T]
    u0 = golden["rand/nodrop/unary"]
    # Var of Σ_i c_i·(2·Bernoulli(q) − 1) with c_i = w_i·r_i: 4·q·(1−q)·Σ c_i² (= Σ c_i² at q = 0.5).
    _, st = AudioTokenEmbedder(32, False).apply({"params": params}, x, mutable=["intermediates"])
    h = np.asarray(st["intermediates"]["fc2_out"][0])
    r = np.maximum(h @ np.asarray(params["unary_embed"]["kernel"]) + np.asarray(params["unary_embed"]["bias"]), 0)
    c2 = (r * np.asarray(params["unary_reduce"]["kernel"])[:, 0]) ** 2
    expected_std = np.sqrt(c2.sum(-1))
    err = (np.asarray(u).mean(0) - u0) / (expected_std / np.sqrt(n))
    assert np.abs(err).max() < 5.0
    np.testing.assert_allclose(np.asarray(u).std(0), expected_std, rtol=0.2)


def test_param_count_full_size():
    module = AudioTokenEmbedder(768)
    shapes = jax.eval_shape(lambda: module.init(
        {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}, jnp.zeros((1, 8, 2304))))
    n = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes["params"]))
    assert n == 8_853_507


def test_init_is_torch_uniform():
    c_in, d = 256, 64
    module = AudioTokenEmbedder(d)
    p = jax.jit(module.init)({"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)},
                             jnp.zeros((1, 4, c_in)))["params"]
    fan_in = {"fc1": c_in, "fc2": c_in, "unary_embed": d, "unary_reduce": d,
              "pairwise_embed_x": d, "pairwise_embed_y": d, "potential_mix": 2}
    assert set(p) == set(fan_in)
    for name, f in fan_in.items():
        bound = 1.0 / np.sqrt(f)
        for leaf_name, leaf in p[name].items():
            leaf = np.asarray(leaf)
            assert np.abs(leaf).max() <= bound, (name, leaf_name)
            if leaf.size >= 64:  # the spread fills the interval (uniform, not normal / zeros)
                assert np.abs(leaf).max() > 0.9 * bound, (name, leaf_name)
                np.testing.assert_allclose(leaf.std(), bound / np.sqrt(3), rtol=0.15)
    assert "bias" not in p["potential_mix"]
    assert np.abs(np.asarray(p["fc1"]["bias"])).max() > 0  # biases are not zero-initialised


def test_params_from_torch_rejects_other_keys(state_dict):
    bad = dict(state_dict)
    bad.pop("fc1.bias")
    with pytest.raises(KeyError, match="fc1.bias"):
        params_from_torch(bad)


@pytest.mark.torch
def test_convert_checkpoint_reproduces_golden(golden, state_dict, tmp_path):
    torch = torch_or_skip()
    path = tmp_path / "learned_embeds.bin"
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}, path)
    config = convert_checkpoint(path, tmp_path / "embedder")
    assert config == {"output_dim": 32, "input_dim": 192}
    module, p = load_embedder(tmp_path / "embedder", unary_dropout_at_inference=False)
    assert module.output_dim == 32
    for case in CASES:
        out = module.apply({"params": p}, golden[f"{case}/input"])
        np.testing.assert_allclose(out, golden[f"{case}/nodrop/output"], **TOL)
        out = module.apply({"params": p}, golden[f"{case}/input"], unary_dropout_mask=_keep_mask(golden, case))
        np.testing.assert_allclose(out, golden[f"{case}/refdrop/output"], **TOL)


@pytest.mark.torch
def test_thesis_wrapper_state_dict_converts_its_embedder_part(state_dict, tmp_path, capsys):
    """The thesis's best-epoch file (whole wrapper state dict) converts to the same embedder as its
    embedder.* part alone; the other trained parts are named on stderr."""
    torch = torch_or_skip()
    rng = np.random.default_rng(0)
    wrapper = {f"embedder.{k}": torch.from_numpy(v.copy()) for k, v in state_dict.items()}
    for key in ("unet.conv_in.weight", "aud_encoder.patch_embedding.weight", "text_encoder.text_model.x",
                "vae.encoder.conv_in.weight"):
        wrapper[key] = torch.from_numpy(rng.normal(size=(4, 3)).astype(np.float32))
    torch.save(wrapper, tmp_path / "model_20240101-000000_21")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in state_dict.items()}, tmp_path / "learned_embeds.bin")
    convert.main(["embedder", str(tmp_path / "model_20240101-000000_21"), str(tmp_path / "from_wrapper")])
    assert "unet.*" in capsys.readouterr().err
    convert_checkpoint(tmp_path / "learned_embeds.bin", tmp_path / "plain")
    (a, ca), (b, cb) = load_params(tmp_path / "from_wrapper"), load_params(tmp_path / "plain")
    assert ca == cb
    jax.tree.map(np.testing.assert_array_equal, a, b)
