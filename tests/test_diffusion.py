"""mtok_jax.models.diffusion: configs, torch-free loading of PyTorch-layout weights, VAE latents,
noising targets and the samplers, each against PyTorch diffusers or a numpy transcription."""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import torch_or_skip
from mtok_jax.models import diffusion

# A tiny UNet / VAE in the PyTorch diffusers layout (32-group norms, as the Flax UNet requires).
TINY_UNET = dict(sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                 layers_per_block=1, attention_head_dim=8, cross_attention_dim=32, norm_num_groups=32)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=32, sample_size=16)


def _betas_scaled_linear(start=0.00085, end=0.012, n=1000):
    return np.linspace(start ** 0.5, end ** 0.5, n, dtype=np.float64) ** 2


@pytest.fixture(scope="module")
def torch_sd(tmp_path_factory):
    """Tiny PyTorch UNet + VAE saved as safetensors in an SD-layout folder (torch modules kept)."""
    torch = torch_or_skip()
    import diffusers

    torch.set_num_threads(1)  # 2 OpenMP threads on a loaded 2-core machine: 0.5-3 s per tiny forward, 1: 15 ms
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd_pt")
    unet = diffusers.UNet2DConditionModel(**TINY_UNET).eval()
    vae = diffusers.AutoencoderKL(**TINY_VAE).eval()
    unet.save_pretrained(root / "unet", safe_serialization=True)
    vae.save_pretrained(root / "vae", safe_serialization=True)
    os.makedirs(root / "scheduler")
    with open(root / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({"_class_name": "PNDMScheduler", **diffusion.SD14_SCHEDULER_CONFIG}, f)
    assert not list(root.glob("*/*.msgpack")) and list(root.glob("unet/*.safetensors"))
    return torch, unet, vae, root


@pytest.fixture(scope="module")
def flax_unet(torch_sd):
    """The torch UNet's safetensors loaded through the SD root (→ unet/ sub-folder), torch-free."""
    return diffusion.load_unet(torch_sd[3])


def test_sd14_configs_resolve_full_size():
    """The released SD v1.4 shapes (859,520,964 UNet / 83,653,863 VAE parameters) with no weights."""
    count = lambda shapes: sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(shapes))
    assert count(diffusion.param_shapes(diffusion.unet_from_config(diffusion.SD14_UNET_CONFIG))) == 859_520_964
    assert count(diffusion.param_shapes(diffusion.vae_from_config(diffusion.SD14_VAE_CONFIG))) == 83_653_863


def test_unet_other_norm_groups_rejected(tmp_path):
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"_class_name": "UNet2DConditionModel", **TINY_UNET, "norm_num_groups": 16}, f)
    with pytest.raises(ValueError, match="norm_num_groups=16"):
        diffusion.load_unet(tmp_path)


def test_unknown_or_lms_sampler_rejected():
    with pytest.raises(ValueError, match="LMS"):
        diffusion.sampler_from_config(diffusion.SD14_SCHEDULER_CONFIG, "lms")


@pytest.mark.torch
def test_unet_from_pytorch_safetensors_matches_torch(torch_sd, flax_unet):
    torch, tunet, _, root = torch_sd
    unet, params = flax_unet
    rs = np.random.RandomState(1)
    x = rs.normal(size=(2, 4, 8, 8)).astype(np.float32)
    t = np.array([3, 981], np.int64)
    ctx = rs.normal(size=(2, 77, 32)).astype(np.float32)
    forward = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample)
    ours = np.asarray(forward(params, jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)))
    with torch.no_grad():
        ref = tunet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(ctx)).sample
    ref = ref.numpy()
    # float32 through ~40 layers: ~2e-5 of the output scale (docs/design.md §2.5 measured 1.8e-6 on 0.08)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-5 * np.abs(ref).max())


@pytest.mark.torch
def test_vae_from_pytorch_safetensors_matches_torch(torch_sd):
    torch, _, tvae, root = torch_sd
    vae, params = diffusion.load_vae(root / "vae")
    rs = np.random.RandomState(2)
    images = rs.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)  # NHWC
    rng = jax.random.PRNGKey(3)
    latents = np.asarray(jax.jit(lambda p, x, r: diffusion.encode_latents(vae, p, x, r))(params, images, rng))
    with torch.no_grad():
        post = tvae.encode(torch.from_numpy(images.transpose(0, 3, 1, 2))).latent_dist
        mean, std = post.mean.numpy(), post.std.numpy()
    assert latents.shape == (2, 4, 8, 8)
    # the posterior sample uses jax.random.normal(rng) in NHWC (diffusers' Flax Gaussian)
    eps = np.asarray(jax.random.normal(rng, (2, 8, 8, 4))).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(latents, (mean + std * eps) * 0.18215, rtol=0, atol=2e-5)

    z = rs.normal(size=(2, 4, 8, 8)).astype(np.float32)
    ours = np.asarray(jax.jit(lambda p, z: diffusion.decode_images(vae, p, z))(params, z))
    with torch.no_grad():
        ref = tvae.decode(torch.from_numpy(z / 0.18215)).sample.numpy().transpose(0, 2, 3, 1)
    assert ours.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=5e-5 * np.abs(ref).max())


@pytest.mark.torch
@pytest.mark.parametrize("kind, prediction_type", [(k, "epsilon") for k in diffusion.SAMPLERS]
                         + [("dpm", "v_prediction"), ("euler", "v_prediction")])
def test_sampler_matches_pytorch_scheduler(torch_sd, flax_unet, kind, prediction_type):
    """Same tiny UNet in both, same initial latents, 10 steps, guidance 7.5 (docs/design.md §2.5).

    Measured max |Δ| / max |ref|: ~1e-5 for all four (pndm 2.7e-4 on 29, ddim 2.9e-4 on 28,
    dpm 4.7e-4 on 49, euler 5.8e-4 on 49; v-prediction dpm / euler ~1.2e-4 on ~4). Without our last-step fix
    the Flax DPM-Solver++ is off by 3.8e-2 (ε) / 3.4e-2 (v) here (docs/design.md §2.5 saw 2.5e-2 on 57).
    """
    torch, tunet, _, root = torch_sd
    import diffusers

    unet, params = flax_unet
    config = {**diffusion.read_scheduler_config(root), "prediction_type": prediction_type}  # SD-2: v_prediction
    if prediction_type == "epsilon":
        scheduler, state = diffusion.sampler_from_config(diffusion.read_scheduler_config(root), kind)
    else:
        scheduler, state = diffusion.sampler_from_config(config, kind)
    assert scheduler.config.prediction_type == prediction_type
    rs = np.random.RandomState(4)
    lat0 = rs.normal(size=(2, 4, 8, 8)).astype(np.float32)
    cond = rs.normal(size=(2, 77, 32)).astype(np.float32)
    uncond = rs.normal(size=(2, 77, 32)).astype(np.float32)
    run = jax.jit(lambda p, st, c, u, x: diffusion.denoise_latents(unet, p, scheduler, st, c, u, x,
                                                                   num_steps=10, guidance=7.5))
    ours = np.asarray(run(params, state, cond, uncond, lat0))

    twin = {"pndm": diffusers.PNDMScheduler, "ddim": diffusers.DDIMScheduler,
            "dpm": diffusers.DPMSolverMultistepScheduler, "euler": diffusers.EulerDiscreteScheduler}[kind]
    ts = twin.from_config(config)
    ts.set_timesteps(10)
    x = torch.from_numpy(lat0) * ts.init_noise_sigma
    context = torch.from_numpy(np.concatenate([uncond, cond]))
    with torch.no_grad():
        for t in ts.timesteps:
            out = tunet(ts.scale_model_input(torch.cat([x, x]), t), t, encoder_hidden_states=context).sample
            u, c = out.chunk(2)
            x = ts.step(u + 7.5 * (c - u), t, x).prev_sample
    ref = x.numpy()
    assert np.isfinite(ours).all() and np.abs(ref).max() > 1.0, np.abs(ref).max()
    # float32 UNet error (~4e-5 per call) × guidance 7.5 sets a floor; the rest scales with the latents
    np.testing.assert_allclose(ours, ref, rtol=0, atol=3e-5 * np.abs(ref).max() + 3e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_noisy_latents_and_target(tmp_path, prediction_type):
    """DDPM forward noising and the ε / v target (SD-2 style config) against the numpy formulas."""
    os.makedirs(tmp_path / "scheduler")
    with open(tmp_path / "scheduler" / "scheduler_config.json", "w") as f:
        json.dump({**diffusion.SD14_SCHEDULER_CONFIG, "prediction_type": prediction_type}, f)
    scheduler, state = diffusion.load_noise_scheduler(tmp_path)
    rs = np.random.RandomState(5)
    x0 = rs.normal(size=(3, 4, 8, 8)).astype(np.float32)
    eps = rs.normal(size=(3, 4, 8, 8)).astype(np.float32)
    t = np.array([0, 500, 999])
    noisy, target = diffusion.noisy_latents_and_target(scheduler, state, jnp.asarray(x0), jnp.asarray(eps),
                                                       jnp.asarray(t))
    abar = np.cumprod(1.0 - _betas_scaled_linear())[t][:, None, None, None]
    np.testing.assert_allclose(noisy, np.sqrt(abar) * x0 + np.sqrt(1 - abar) * eps, atol=1e-5)
    expected = eps if prediction_type == "epsilon" else np.sqrt(abar) * eps - np.sqrt(1 - abar) * x0
    np.testing.assert_allclose(target, expected, atol=1e-5)


@pytest.mark.torch
def test_sharded_and_fp16_variant_safetensors_load(torch_sd, flax_unet, tmp_path):
    """Sharded weights (index json) and an fp16 variant load to the single-file params (fp16: rounded)."""
    _, tunet, _, _ = torch_sd
    tunet.save_pretrained(tmp_path / "sharded", safe_serialization=True, max_shard_size="300KB")
    assert (tmp_path / "sharded" / "diffusion_pytorch_model.safetensors.index.json").exists()
    copy.deepcopy(tunet).half().save_pretrained(tmp_path / "fp16", safe_serialization=True, variant="fp16")
    ref = jax.tree_util.tree_leaves_with_path(flax_unet[1])
    for folder, atol in (("sharded", 0.0), ("fp16", 1e-3)):
        _, params = diffusion.load_unet(tmp_path / folder)
        got = dict(jax.tree_util.tree_leaves_with_path(params))
        assert len(got) == len(ref)
        for path, value in ref:
            np.testing.assert_allclose(got[path], value, rtol=1e-3 if atol else 0, atol=atol)
