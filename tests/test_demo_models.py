"""mtok_jax.demo.models: the tiny demo models are real SD / BEATs folders, loadable by the loaders
used for real weights and by diffusers/transformers themselves, with finite non-trivial outputs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mtok_jax import config_utils
from mtok_jax.demo import models as demo
from mtok_jax.models import diffusion


@pytest.fixture(scope="module")
def paths(demo_models):
    return demo_models


def test_idempotent(paths):
    root = os.path.dirname(paths["sd"])
    files = {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}
    stamps = {f: os.stat(f).st_mtime_ns for f in files}
    assert demo.write_demo_models(root) == paths
    assert {f: os.stat(f).st_mtime_ns for f in files} == stamps
    assert not any(name.endswith(".tmp") for name in os.listdir(root))


def test_sd_folder_is_a_diffusers_flax_pipeline(paths):
    """diffusers' own FlaxStableDiffusionPipeline reads the folder (the SD v1.4 `flax` layout)."""
    from diffusers import FlaxPNDMScheduler, FlaxStableDiffusionPipeline

    pipe, params = FlaxStableDiffusionPipeline.from_pretrained(paths["sd"], safety_checker=None,
                                                             feature_extractor=None)
    assert isinstance(pipe.scheduler, FlaxPNDMScheduler) and pipe.scheduler.config.skip_prk_steps
    unet, unet_params = diffusion.load_unet(paths["sd"])
    ours = jax.tree_util.tree_leaves_with_path(unet_params)
    theirs = dict(jax.tree_util.tree_leaves_with_path(params["unet"]))
    assert len(ours) == len(theirs) and all(np.array_equal(v, theirs[k]) for k, v in ours)
    assert pipe.unet.cross_attention_dim == pipe.text_encoder.config.hidden_size == demo.DEMO_TEXT_HIDDEN
    assert pipe.vae.config.norm_num_groups == demo.DEMO_VAE_CONFIG["norm_num_groups"]
    assert tuple(unet.block_out_channels) == demo.DEMO_UNET_CONFIG["block_out_channels"]
    assert diffusion.read_scheduler_config(paths["sd"])["beta_schedule"] == "scaled_linear"


def test_parts_load_and_give_finite_nontrivial_outputs(paths):
    from mtok_jax.models import beats, text

    rs = np.random.RandomState(0)
    # VAE: 32 px images ↔ 4×4×4 latents (SD's factor 8)
    vae, vae_params = diffusion.load_vae(paths["sd"])
    images = jnp.asarray(rs.uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)
    latents = jax.jit(lambda p, x: diffusion.encode_latents(vae, p, x, jax.random.PRNGKey(0)))(vae_params, images)
    decoded = jax.jit(lambda p, z: diffusion.decode_images(vae, p, z))(vae_params, latents)
    assert latents.shape == (2, 4, 4, 4) and decoded.shape == (2, 32, 32, 3)
    # tokenizer + text encoder: every prompt and label word is one known token
    from mtok_jax.demo.tokenizer import pretokens

    tok = text.load_tokenizer(os.path.join(paths["sd"], "tokenizer"))
    for label in demo.demo_labels():
        ids = tok(label)["input_ids"][1:-1]
        assert len(ids) == len(pretokens(label)) and tok.eos_token_id not in ids, label
    ids, pos = text.tokenize_prompts(tok, list(demo.DEMO_PROMPTS))
    text_module, text_params = text.load_text_encoder(os.path.join(paths["sd"], "text_encoder"))
    states = text.text_states(text_module, text_params, ids, pos, jnp.ones((2, demo.DEMO_TEXT_HIDDEN)))
    assert states.shape == (2, 77, demo.DEMO_TEXT_HIDDEN)
    # UNet on those states
    unet, unet_params = diffusion.load_unet(paths["sd"])
    out = jax.jit(lambda p, x, t, c: unet.apply({"params": p}, x, t, c).sample)(
        unet_params, latents, jnp.array([10, 900]), states)
    # BEATs: the layers the demo config concatenates exist; the config trains at the models' image size
    config = config_utils.load_config("configs/demo.py", [])
    layers = tuple(config.model.beats_layers)
    assert config.data.image_size == demo.DEMO_IMAGE_SIZE
    model, beats_params = beats.load_beats(paths["beats"])
    assert max(layers) < model.cfg["encoder_layers"]
    wave = jnp.asarray(rs.uniform(-0.5, 0.5, (1, 16000)), jnp.float32)
    feats = beats.audiotoken_features(jax.jit(model.apply)({"params": beats_params}, wave), layers)
    assert feats.shape[-1] == len(layers) * demo.DEMO_BEATS_CFG["encoder_embed_dim"]
    for x in (latents, decoded, states, out, feats):
        x = np.asarray(x)
        assert np.isfinite(x).all() and 0.05 < x.std() < 50, x.std()


def test_vae_is_fitted_autoencoder_of_demo_images(paths):
    """The written VAE reconstructs held-out demo images (drawn here at 32 px, no resize, other seed) far
    better than a random-init VAE of the same config and than each image's own mean colour; its
    scaling_factor brings the latents to about unit std."""
    from mtok_jax.demo.data import demo_image

    rng = np.random.default_rng(1234)
    images = np.stack([demo_image(i % 18, rng, side=32) for i in range(36)]).astype(np.float32) / 127.5 - 1.0
    fitted, fitted_params = diffusion.load_vae(paths["sd"])
    scale = json.load(open(os.path.join(paths["sd"], "vae", "config.json")))["scaling_factor"]
    assert fitted.scaling_factor == scale
    random_vae = diffusion.vae_from_config(demo.DEMO_VAE_CONFIG)
    random_params = demo.random_params(diffusion.param_shapes(random_vae), 7)

    def reconstruct(vae, params):
        z = diffusion.encode_latents(vae, params, jnp.asarray(images), jax.random.PRNGKey(0))
        return z, diffusion.decode_images(vae, params, z)

    latents, recon = map(np.asarray, jax.jit(lambda p: reconstruct(fitted, p))(fitted_params))
    recon_random = np.asarray(jax.jit(lambda p: reconstruct(random_vae, p))(random_params)[1])
    mse = float(np.mean((recon - images) ** 2))
    mse_random = float(np.mean((recon_random - images) ** 2))
    mse_mean_colour = float(np.mean((images - images.mean(axis=(1, 2), keepdims=True)) ** 2))
    assert mse < 0.1 * mse_random and mse < 0.5 * mse_mean_colour, (mse, mse_random, mse_mean_colour)
    # per-image mean colours (what tells the labels apart) survive the round trip
    colour, colour_in = recon.mean(axis=(1, 2)), images.mean(axis=(1, 2))
    corr = np.corrcoef(colour.ravel(), colour_in.ravel())[0, 1]
    err = np.abs(colour - colour_in).mean()
    assert corr > 0.9 and err < 0.4 * colour_in.std(axis=0).mean(), (corr, err, colour_in.std(axis=0))
    assert 0.5 < latents.std() < 2.0, latents.std()
