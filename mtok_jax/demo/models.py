"""Tiny demo models written in the formats of the real weights.

``write_demo_models(root)`` creates, once:
  root/sd/      a Stable Diffusion folder like the SD v1.4 ``flax`` revision: model_index.json,
                text_encoder/ (FlaxCLIPTextModel msgpack), tokenizer/ (CLIP BPE files covering the demo
                prompts and labels), unet/ + vae/ (diffusers Flax msgpack), scheduler/ (SD v1.4 PNDM config)
  root/beats/   a converted-BEATs params_io folder (tiny iter3-style cfg)
Everything is loaded back through the loaders used for real weights (``diffusion.load_unet`` …).

The VAE is *fitted*: a short seeded Adam fit (``fit_demo_vae``: reconstruction MSE + a small KL, ≈80 s
on 2 CPU cores) on synthetic demo images (``demo.data.demo_image``),
so it is a working autoencoder of the demo image distribution and decoded latents look like images
(a random VAE decodes any latent to the same noise-like texture, hiding whatever the UNet learns); its
``scaling_factor`` is 1/std of its latents, as SD's 0.18215 was chosen. Everything else (text encoder,
UNet, BEATs) is random-init; the text encoder's attention q/k at a larger gain (``TEXT_QK_GAIN``) so the
audio token reaches the text states after the placeholder.

Sizes: CLIP text hidden D = 32 (2 layers, 4 heads, 77 positions); VAE (32, 64, 64, 64) with 8-group
norms and SD's downsampling factor 8 (32 px images ↔ 4×4×4 latents); UNet block_out_channels (64, 64),
cross-attention D; BEATs embed 32, 4 layers, of which configs/demo.py's ``model.beats_layers`` feed the embedder.

Why these widths: diffusers' Flax UNet hard-codes 32-group GroupNorms, so with 32 channels every
channel is normalised alone and a per-channel constant (the timestep embedding, an image's mean colour
carried by the label) is erased before ``conv_out``; 64 channels give 2 channels per group. The
4×4 latents and 64 channels keep the UNet cheap enough for 720 CPU steps in ≈ 5 minutes, enough for it
to follow the audio token when trained with classifier-free-guidance dropout (configs/demo.py;
measured: 128 channels follow the labels a little better at twice the step time).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mtok_jax.data.sources import DEFAULT_LABELS
from mtok_jax.demo.data import demo_image
from mtok_jax.demo.tokenizer import write_clip_tokenizer
from mtok_jax.models import beats, diffusion, hub
from mtok_jax.models.beats import BEATS_ITER3_PLUS_AS2M_CFG
from mtok_jax.models.diffusion import SD14_SCHEDULER_CONFIG, param_shapes
from mtok_jax.models.text import SD14_TEXT_CONFIG

DEMO_TEXT_HIDDEN = 32
DEMO_IMAGE_SIZE = 32
DEMO_BEATS_CFG: dict[str, Any] = {  # BEATs_iter3+ (AS2M) with only the sizes shrunk
    **BEATS_ITER3_PLUS_AS2M_CFG, "encoder_layers": 4, "encoder_embed_dim": 32, "encoder_ffn_embed_dim": 64,
    "encoder_attention_heads": 4, "embed_dim": 32, "conv_pos": 16, "num_buckets": 32, "max_distance": 100,
    "encoder_layerdrop": 0.0,
}

DEMO_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=DEMO_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=DEMO_TEXT_HIDDEN,
    attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
)
DEMO_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 64, 64, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=8, sample_size=DEMO_IMAGE_SIZE, scaling_factor=0.18215,
)
DEMO_VAE_FACTOR = 2 ** (len(DEMO_VAE_CONFIG["block_out_channels"]) - 1)  # 8 as SD: 32 px ↔ 4×4 latents
DEMO_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=DEMO_IMAGE_SIZE // DEMO_VAE_FACTOR, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 64), layers_per_block=1, attention_head_dim=8,
    cross_attention_dim=DEMO_TEXT_HIDDEN, flip_sin_to_cos=True, freq_shift=0,
)
DEMO_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "FlaxStableDiffusionPipeline", "_diffusers_version": "0.39.0",
    "feature_extractor": [None, None], "safety_checker": [None, None],
    "scheduler": ["diffusers", "FlaxPNDMScheduler"], "text_encoder": ["transformers", "FlaxCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "FlaxUNet2DConditionModel"],
    "vae": ["diffusers", "FlaxAutoencoderKL"],
}
DEMO_PROMPTS = ("an art image of <*>", "an art image of <*>, 4k, high resolution")


def random_params(shapes: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Fill a ``ShapeDtypeStruct`` tree with float32 randoms at the scale of the usual initialisers.

    kernel → N(0, 1/fan_in) (LeCun normal, fan_in = all but the last axis); scale → 1; bias → 0;
    embedding / other → N(0, 0.02²). Fast (no XLA init compile), deterministic in ``seed``.
    """
    rs = np.random.RandomState(seed)
    out = {}
    for path, s in sorted(traverse_util.flatten_dict(dict(shapes)).items()):
        name, shape = path[-1], tuple(s.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) or 1
            v = rs.normal(0.0, fan_in ** -0.5, shape)
        elif name == "scale":
            v = np.ones(shape)
        elif name == "bias":
            v = np.zeros(shape)
        else:
            v = rs.normal(0.0, 0.02, shape)
        out[path] = v.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def demo_labels() -> list[str]:
    """The 18 label names of the dataset (from the data package)."""
    return list(DEFAULT_LABELS)


# ----------------------------------------------------------------------------------- the parts
def _write_tokenizer(directory: str) -> int:
    return write_clip_tokenizer(directory, [*DEMO_PROMPTS, *demo_labels()])


# q/k kernels × this gain (std 3/√fan_in, attention logits std ≈ 9): peaked attention, as in a trained CLIP.
# With unit-gain random q/k the causal attention is near-uniform, so every position after the placeholder
# averages it with up to ~70 identical EOS positions and the audio token barely reaches the states that the
# UNet's cross-attention reads (label spread of the states after the placeholder: 0.09 → 0.31 relative).
TEXT_QK_GAIN = 3.0


def _write_text_encoder(directory: str, tokenizer_dir: str, seed: int,
                        text_config: Mapping[str, Any] = DEMO_TEXT_CONFIG, vocab_size: int | None = None) -> None:
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    fields = {k: v for k, v in text_config.items() if k not in ("architectures", "model_type", "vocab_size",
                                                                "bos_token_id", "eos_token_id", "pad_token_id")}
    config = CLIPTextConfig(**fields, vocab_size=vocab_size or len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = FlaxCLIPTextModel(config, _do_init=False)
    shapes = jax.eval_shape(lambda r: model.init_weights(r, (1, 77)), jax.random.PRNGKey(0))
    params = random_params(shapes, seed)
    emb = params["text_model"]["embeddings"]
    emb["position_embedding"]["embedding"] *= 0.5  # CLIP: positions N(0, 0.01²), tokens N(0, 0.02²)
    for layer in params["text_model"]["encoder"]["layers"].values():
        for proj in ("q_proj", "k_proj"):
            layer["self_attn"][proj]["kernel"] *= TEXT_QK_GAIN
    model.save_pretrained(directory, params=params)


def _write_diffusers(directory: str, module, seed: int) -> None:
    module.save_pretrained(directory, params=random_params(param_shapes(module), seed))


# ------------------------------------------------------------------------------- the fitted VAE
VAE_FIT_STEPS = 240
VAE_FIT_BATCH = 8
VAE_FIT_LR = 1e-3  # peak of a 10-step warm-up + cosine decay to a tenth
VAE_FIT_KL_WEIGHT = 1e-6  # × KL summed over the latent elements (SD's VAE: 1e-6), next to the pixel MSE
VAE_INIT_LOGVAR = -6.0  # posterior log-variance bias at init: σ ≈ 0.05, so the sampled latents carry the image


def demo_vae_images(n: int, seed: int, size: int = DEMO_IMAGE_SIZE) -> np.ndarray:
    """float32 [n, size, size, 3] in [-1, 1]: synthetic demo images (``demo.data.demo_image``) of random
    labels, drawn at the written size and bicubic-resized as the dataset builder stores them."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = np.empty((n, size, size, 3), np.float32)
    for i, label in enumerate(rng.integers(0, len(demo_labels()), n)):
        img = Image.fromarray(demo_image(int(label), rng)).resize((size, size), Image.Resampling.BICUBIC)
        out[i] = np.asarray(img, np.float32) / 127.5 - 1.0
    return out


def vae_losses(vae, vae_params, images, rng):
    """images [B, H, W, 3] in [-1, 1] → (pixel MSE of the decoded posterior sample, KL(posterior ‖ N(0, I))
    summed over the latent elements and averaged over the batch). Unscaled latents (no scaling_factor)."""
    from diffusers.models.vae_flax import FlaxDiagonalGaussianDistribution

    def autoencode(m, x, key):
        posterior = FlaxDiagonalGaussianDistribution(m.quant_conv(m.encoder(x, deterministic=True)))
        decoded = m.decoder(m.post_quant_conv(posterior.sample(key)), deterministic=True)
        return decoded, posterior.kl()

    decoded, kl = vae.apply({"params": vae_params}, images, rng, method=autoencode)
    return jnp.mean((decoded - images) ** 2), jnp.mean(kl)


def fit_demo_vae(vae, vae_params, *, steps: int = VAE_FIT_STEPS, batch_size: int = VAE_FIT_BATCH,
                 lr: float = VAE_FIT_LR, kl_weight: float = VAE_FIT_KL_WEIGHT, seed: int = 0):
    """Fit the VAE to synthetic demo images: jitted Adam on MSE + ``kl_weight``·KL, fresh images every
    step, deterministic in ``seed`` → ``(params, [(step, mse, kl), ...])``."""
    import optax

    images = demo_vae_images(steps * batch_size, seed).reshape(steps, batch_size, *(DEMO_IMAGE_SIZE,) * 2, 3)
    opt = optax.adam(optax.warmup_cosine_decay_schedule(0.0, lr, min(10, steps - 1), steps, lr / 10))

    @jax.jit
    def step(params, opt_state, x, key):
        def loss(p):
            mse, kl = vae_losses(vae, p, x, key)
            return mse + kl_weight * kl, (mse, kl)

        grads, aux = jax.grad(loss, has_aux=True)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    params, opt_state, key, history = vae_params, opt.init(vae_params), jax.random.PRNGKey(seed), []
    for i in range(steps):
        params, opt_state, aux = step(params, opt_state, jnp.asarray(images[i]), jax.random.fold_in(key, i))
        history.append((i, *map(float, aux)))
    return params, history


def latent_scaling_factor(vae, vae_params, images) -> float:
    """1 / std of the posterior-mean latents of ``images`` (how SD chose 0.18215): scaled latents ≈ unit
    variance, the scale the noise schedule assumes. Rounded to 5 significant digits."""
    def latent_mean(m, x):
        return m.quant_conv(m.encoder(x, deterministic=True))[..., :m.latent_channels]

    z = jax.jit(lambda p, x: vae.apply({"params": p}, x, method=latent_mean))(vae_params, images)
    return float(f"{1.0 / float(jnp.std(z)):.5g}")


def _write_fitted_vae(directory: str, seed: int) -> None:
    """The demo VAE fitted on synthetic demo images (``fit_demo_vae``, ≈45 s on 2 CPU cores), its
    ``scaling_factor`` set from its latents; diffusers Flax ``save_pretrained``."""
    vae = diffusion.vae_from_config(DEMO_VAE_CONFIG)
    params = random_params(diffusion.param_shapes(vae), seed)
    params["quant_conv"]["bias"][DEMO_VAE_CONFIG["latent_channels"]:] = VAE_INIT_LOGVAR
    params, _ = fit_demo_vae(vae, params, seed=seed)
    scale = latent_scaling_factor(vae, params, demo_vae_images(64, seed + 1))
    diffusion.vae_from_config({**DEMO_VAE_CONFIG, "scaling_factor": scale}).save_pretrained(
        directory, params=jax.device_get(params))


def _write_scheduler(directory: str) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "scheduler_config.json"), "w") as f:
        json.dump({**SD14_SCHEDULER_CONFIG, "_diffusers_version": "0.39.0"}, f, indent=2)


def write_demo_sd(directory: str, seed: int = 0) -> None:
    """The tiny Stable Diffusion folder (``directory`` must not exist)."""
    os.makedirs(directory)
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump(DEMO_MODEL_INDEX, f, indent=2)
    _write_tokenizer(os.path.join(directory, "tokenizer"))
    _write_text_encoder(os.path.join(directory, "text_encoder"), os.path.join(directory, "tokenizer"), seed + 1)
    _write_diffusers(os.path.join(directory, "unet"), diffusion.unet_from_config(DEMO_UNET_CONFIG), seed + 2)
    _write_fitted_vae(os.path.join(directory, "vae"), seed + 3)
    _write_scheduler(os.path.join(directory, "scheduler"))


def write_full_size_sd(directory: str, seed: int = 0) -> None:
    """SD v1.4's UNet, VAE and text encoder shapes with random weights (``directory`` must not exist)."""
    os.makedirs(directory)
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump(DEMO_MODEL_INDEX, f, indent=2)
    tokenizer = os.path.join(directory, "tokenizer")
    _write_tokenizer(tokenizer)
    _write_text_encoder(os.path.join(directory, "text_encoder"), tokenizer, seed + 1,
                        SD14_TEXT_CONFIG, SD14_TEXT_CONFIG["vocab_size"])
    _write_diffusers(os.path.join(directory, "unet"), diffusion.unet_from_config(diffusion.SD14_UNET_CONFIG),
                     seed + 2)
    _write_diffusers(os.path.join(directory, "vae"), diffusion.vae_from_config(diffusion.SD14_VAE_CONFIG),
                     seed + 3)
    _write_scheduler(os.path.join(directory, "scheduler"))


def write_demo_beats(directory: str, seed: int = 0) -> None:
    """The tiny BEATs params_io folder (its modules' own initialisers)."""
    beats.save_beats(directory, DEMO_BEATS_CFG, beats.init_params(DEMO_BEATS_CFG, jax.random.PRNGKey(seed)))


def _complete(path: str, files: tuple[str, ...]) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in files)


def _current_sd(path: str) -> bool:
    """False when `path`'s UNet has other channels than DEMO_UNET_CONFIG (written by an older version)."""
    channels = tuple(hub.read_json(os.path.join(path, "unet", hub.CONFIG_FILE))["block_out_channels"])
    if channels != tuple(DEMO_UNET_CONFIG["block_out_channels"]):
        print(f"{path}: written by an older version (UNet channels {channels}); writing it again "
              f"(a run trained on it needs `make clean-demo`)")
        return False
    return True


SD_FILES = ("model_index.json", "tokenizer/vocab.json", "text_encoder/flax_model.msgpack",
            "unet/diffusion_flax_model.msgpack", "vae/diffusion_flax_model.msgpack",
            "scheduler/scheduler_config.json")
BEATS_FILES = ("params.safetensors", "config.json")


def write_parts(root: str, parts: dict[str, tuple[Callable[[str], None], tuple[str, ...]]],
                is_current: Callable[[str, str], bool] = lambda part, path: True) -> dict[str, str]:
    """Write each ``root/<part>`` with ``writer(directory)`` unless its ``files`` are all there (and
    ``is_current(part, path)``) → {part: path}.

    Each part is built in a temporary sibling folder and renamed into place, so an interrupted run
    leaves no half-written part behind.
    """
    paths = {part: os.path.join(root, part) for part in parts}
    for part, (writer, files) in parts.items():
        if _complete(paths[part], files) and is_current(part, paths[part]):
            continue
        tmp = paths[part] + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(paths[part], ignore_errors=True)
        os.makedirs(root, exist_ok=True)
        print(f"writing {paths[part]} …", file=sys.stderr, flush=True)
        writer(tmp)
        os.replace(tmp, paths[part])
    return paths


def write_demo_models(root: str | os.PathLike = "demo_assets", seed: int = 0) -> dict[str, str]:
    """Write ``root/sd`` and ``root/beats`` unless already complete (``write_parts``) →
    ``{'sd': path, 'beats': path}``."""
    parts = {"sd": (lambda d: write_demo_sd(d, seed), SD_FILES),
             "beats": (lambda d: write_demo_beats(d, seed), BEATS_FILES)}
    return write_parts(os.fspath(root), parts, lambda part, path: part != "sd" or _current_sd(path))
