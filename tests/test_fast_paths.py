"""The UNet's fast paths equal its plain path (forward and gradients):

- model.attention: jax.nn.dot_product_attention routed per call site of diffusers' Flax UNet = diffusers' own
  einsum attention (CPU XLA path); the cuDNN routing (which sites, the 77 → 80 key padding with
  key_value_seq_lengths) checked on CPU with XLA standing in for the cuDNN kernel; `auto`.
- model.conv: the im2col / 1×1 matrix products = XLA's convolutions, and which convolutions take them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtok_jax import config_utils
from mtok_jax import system as system_lib
from mtok_jax.demo.models import DEMO_TEXT_HIDDEN, DEMO_UNET_CONFIG, random_params
from mtok_jax.models import attention as attention_lib
from mtok_jax.models import conv as conv_lib
from mtok_jax.models import diffusion


@pytest.fixture(scope="module")
def unet_case():
    """Demo-architecture UNet, random params, 16×16 latents (its attention at 16×16 and 8×8), 77 keys."""
    unet = diffusion.unet_from_config(DEMO_UNET_CONFIG)
    params = random_params(diffusion.param_shapes(unet), seed=3)
    rs = np.random.RandomState(0)
    latents = jnp.asarray(rs.normal(size=(2, 4, 16, 16)), jnp.float32)
    t = jnp.asarray([10, 700], jnp.int32)
    states = jnp.asarray(rs.normal(size=(2, 77, DEMO_TEXT_HIDDEN)), jnp.float32)
    return unet, params, latents, t, states


def forward_and_grads(unet, params, latents, t, states, attention="einsum", conv="xla"):
    """UNet output and the gradients of a weighted sum of it w.r.t. the text states and every parameter."""
    weights = jnp.asarray(np.random.RandomState(1).normal(size=latents.shape), jnp.float32)

    def objective(p, s):
        out = diffusion.unet_noise(unet, p, latents, t, s, attention=attention, conv=conv)
        return jnp.sum(out.astype(jnp.float32) * weights), out

    (_, out), (g_params, g_states) = jax.jit(jax.value_and_grad(objective, argnums=(0, 1), has_aux=True))(params,
                                                                                                         states)
    return np.asarray(out, np.float32), np.asarray(g_states, np.float32), jax.tree.map(np.asarray, g_params)


def assert_close_trees(a, b, rtol, atol):
    """Leaf by leaf; atol relative to the leaf's largest value (float32 sums of many products)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(x, y, rtol=rtol, atol=atol * max(np.abs(y).max(), 1.0))


def test_xla_attention_equals_einsum_forward_and_gradients(unet_case):
    ref = forward_and_grads(*unet_case, attention="einsum")
    ours = forward_and_grads(*unet_case, attention="xla")
    assert np.abs(ref[0]).max() > 0.1 and np.abs(ref[1]).max() > 0  # the outputs and gradients are not trivial
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-6)
    assert_close_trees(ours[2], ref[2], rtol=1e-4, atol=1e-5)


def test_xla_attention_in_bfloat16_is_close_to_einsum(unet_case):
    _, params, latents, t, states = unet_case
    unet = diffusion.unet_from_config(DEMO_UNET_CONFIG, dtype=jnp.bfloat16)
    run = jax.jit(lambda a: diffusion.unet_noise(unet, params, latents, t, states.astype(jnp.bfloat16),
                                                 attention=a).astype(jnp.float32), static_argnums=0)
    ref, ours, exact = run("einsum"), run("xla"), forward_and_grads(*unet_case, attention="einsum")[0]
    # XLA's softmax runs in float32, diffusers' in bfloat16: ours is no further from the float32 result
    assert np.abs(ours - exact).mean() <= 1.05 * np.abs(ref - exact).mean()
    np.testing.assert_allclose(ours, ref, atol=0.1)


def test_cudnn_routing_pads_cross_attention_keys_and_keeps_the_result(unet_case, monkeypatch):
    """Under `cudnn`: sites with ≥ CUDNN_MIN_QUERIES queries call the cuDNN kernel, cross-attention's 77 keys
    padded to 80 and masked by key_value_seq_lengths; smaller sites use XLA. Here the threshold is lowered to
    the demo's 16×16 level and XLA runs in place of cuDNN (CPU): same output and gradients as einsum."""
    calls = []
    real = jax.nn.dot_product_attention

    def recording(q, k, v, *, key_value_seq_lengths=None, implementation=None, **kw):
        lengths = None if key_value_seq_lengths is None else tuple(np.asarray(key_value_seq_lengths).tolist())
        calls.append((q.shape[1], k.shape[1], implementation, lengths))
        return real(q, k, v, key_value_seq_lengths=key_value_seq_lengths, implementation="xla", **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", recording)
    monkeypatch.setattr(attention_lib, "CUDNN_MIN_QUERIES", 256)
    ref = forward_and_grads(*unet_case, attention="einsum")
    calls.clear()
    ours = forward_and_grads(*unet_case, attention="cudnn")
    # 16×16: 3 transformer blocks (down, 2 up) × (self, cross); 8×8: the mid block's (self, cross)
    assert sorted(set(calls)) == sorted({(256, 256, "cudnn", None), (256, 80, "cudnn", (77, 77)),
                                         (64, 64, "xla", None), (64, 77, "xla", None)}), calls
    assert calls.count((256, 80, "cudnn", (77, 77))) == 3
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-6)
    assert_close_trees(ours[2], ref[2], rtol=1e-4, atol=1e-5)


def test_blocked_attention_equals_einsum_forward_and_gradients(unet_case, monkeypatch):
    """`blocked` with its thresholds lowered to the demo UNet (every site looped over heads, 256 queries in
    4 blocks of 64): same output and gradients as diffusers' einsum; and the blocks at SD v1.4's sizes."""
    monkeypatch.setattr(attention_lib, "MIN_BLOCKED_SCORES", 0)
    monkeypatch.setattr(attention_lib, "MAX_BLOCK_QUERIES", 64)
    assert attention_lib.site_plan("blocked", 256, 77) == attention_lib.SitePlan("blocked", query_blocks=4)
    ref = forward_and_grads(*unet_case, attention="einsum")
    ours = forward_and_grads(*unet_case, attention="blocked")
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-6)
    assert_close_trees(ours[2], ref[2], rtol=1e-4, atol=1e-5)
    unet, params, latents, t, states = unet_case
    hlo = jax.jit(lambda p: diffusion.unet_noise(unet, p, latents, t, states, attention="blocked")).lower(
        params).as_text(dialect="hlo")
    # 16×16: 6 sites (3 blocks × self, cross) × (heads, query blocks); 8×8: 2 sites × heads (64 queries: 1 block)
    assert hlo.count(" while(") == 6 * 2 + 2 * 1
    monkeypatch.undo()
    blocks = {(q, k): attention_lib.query_blocks(q, k) for q, k in
              ((4096, 4096), (1496, 1496), (1024, 1024), (1024, 77), (256, 256), (4096, 77))}
    assert blocks == {(4096, 4096): 8, (1496, 1496): 2, (1024, 1024): 2, (1024, 77): 0, (256, 256): 0,
                      (4096, 77): 0}


def test_padding_without_lengths_would_change_the_result():
    """Why the lengths: a zero key gets weight exp(0) in the softmax (the routing test would catch a drop)."""
    rs = np.random.RandomState(2)
    q, k, v = (jnp.asarray(rs.normal(size=(1, 8, 2, 4)), jnp.float32) for _ in range(3))
    plain = attention_lib.dot_product_attention(q, k[:, :7], v[:, :7], attention_lib.SitePlan("xla"))
    padded = attention_lib.dot_product_attention(q, k[:, :7], v[:, :7], attention_lib.SitePlan("xla", 16))
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-6)
    unmasked = jax.nn.dot_product_attention(q, jnp.pad(k[:, :7], [(0, 0), (0, 9), (0, 0), (0, 0)]),
                                            jnp.pad(v[:, :7], [(0, 0), (0, 9), (0, 0), (0, 0)]))
    assert np.abs(np.asarray(unmasked) - np.asarray(plain)).max() > 1e-2


def test_auto_and_the_refusals():
    bf16, f32 = jnp.bfloat16, jnp.float32
    assert attention_lib.resolve("auto", bf16, "gpu") == "cudnn"
    assert attention_lib.resolve("auto", f32, "gpu") == "einsum"
    assert attention_lib.resolve("auto", bf16, "tpu") == "einsum"
    assert attention_lib.resolve("auto", bf16, "cpu") == attention_lib.resolve("auto", f32, "cpu") == "blocked"
    assert attention_lib.resolve("xla", f32, "cpu") == "xla"
    with pytest.raises(ValueError, match="needs a GPU"):
        attention_lib.resolve("cudnn", bf16, "cpu")
    with pytest.raises(ValueError, match="model.dtype=bfloat16"):
        attention_lib.resolve("cudnn", f32, "gpu")
    assert attention_lib.site_plan("cudnn", 4096, 77) == attention_lib.SitePlan("cudnn", 80)
    assert attention_lib.site_plan("cudnn", 1024, 1024) == attention_lib.SitePlan("cudnn", None)
    assert attention_lib.site_plan("cudnn", 256, 256) == attention_lib.SitePlan("xla")
    config = config_utils.load_config("configs/demo.py", ["model.attention=cudnn"])
    with pytest.raises(config_utils.ConfigError, match="invalid config: model.attention=cudnn needs a GPU"):
        system_lib.unet_attention(config)
    with pytest.raises(config_utils.ConfigError, match="model.attention='flash' not in"):
        config_utils.validate(config_utils.load_config("configs/demo.py", ["model.attention=flash"]))


def test_matmul_convolutions_equal_xla_forward_and_gradients(unet_case, monkeypatch):
    """With the channel threshold lowered to the demo UNet's 64, every stride-1 3×3 and 1×1 convolution is
    a matrix product (counted), the strided downsampling stays a convolution; same output and gradients."""
    routed = []
    real = conv_lib.conv_as_matmul

    def counting(x, kernel, precision=None):
        routed.append((kernel.shape[0], x.shape[1]))
        return real(x, kernel, precision)

    monkeypatch.setattr(conv_lib, "conv_as_matmul", counting)
    monkeypatch.setattr(conv_lib, "MATMUL_MIN_CHANNELS", 64)
    ref = forward_and_grads(*unet_case)
    assert not routed
    ours = forward_and_grads(*unet_case, conv="matmul")
    unet, params = unet_case[:2]
    convs = [p for p in jax.tree_util.tree_flatten_with_path(params)[0] if jax.tree_util.keystr(p[0]).endswith(
        "['kernel']") and p[1].ndim == 4]
    strided = [c for c in convs if "downsamplers" in jax.tree_util.keystr(c[0])]
    three = {jax.tree_util.keystr(c[0]) for c in convs if c[1].shape[0] == 3 and c[1].shape[2] >= 64} - \
        {jax.tree_util.keystr(c[0]) for c in strided}
    assert strided and len({r for r in routed if r[0] == 3}) >= 1
    assert sum(r[0] == 3 for r in routed) == len(three) and any(r[0] == 1 for r in routed), routed
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-6)
    assert_close_trees(ours[2], ref[2], rtol=1e-4, atol=1e-5)


def test_conv_as_matmul_is_the_convolution():
    rs = np.random.RandomState(5)
    x = jnp.asarray(rs.normal(size=(2, 5, 7, 6)), jnp.float32)
    for k in (1, 3):
        kernel = jnp.asarray(rs.normal(size=(k, k, 6, 4)), jnp.float32)
        want = jax.lax.conv_general_dilated(x, kernel, (1, 1), [(k // 2, k // 2)] * 2,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        np.testing.assert_allclose(conv_lib.conv_as_matmul(x, kernel), want, rtol=1e-5, atol=1e-5)
    assert conv_lib.as_matmul((3, 3), 640) and not conv_lib.as_matmul((3, 3), 320) and conv_lib.as_matmul((1, 1), 4)
    assert conv_lib.resolve("auto", "cpu") == "matmul" and conv_lib.resolve("auto", "gpu") == "xla"
    with pytest.raises(config_utils.ConfigError, match="model.conv='im2col' not in"):
        config_utils.validate(config_utils.load_config("configs/demo.py", ["model.conv=im2col"]))
