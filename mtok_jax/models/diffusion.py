"""Stable Diffusion parts on diffusers 0.39 Flax classes: configs, loading, noising, sampling steps.

Layout conventions (docs/design.md §2.5):
  images   [B, H, W, 3] float in [-1, 1] (NHWC, what the data pipeline and PIL use)
  latents  [B, C, h, w] (NCHW, what the Flax UNet takes), already × the VAE ``scaling_factor``
The NHWC→NCHW transpose happens in :func:`encode_latents` only (and back in :func:`decode_images`).

Loading (``load_unet`` / ``load_vae``) reads a diffusers model folder (or an SD root with ``unet/`` /
``vae/`` sub-folders, or a hub id: cached, or fetched with ``allow_download``; ``mtok_jax.models.hub``) holding either ``diffusion_flax_model.msgpack`` (the SD v1.4 ``flax``
revision) or PyTorch-layout ``diffusion_pytorch_model*.safetensors`` — the latter without torch, with
diffusers' own PyTorch→Flax key renaming applied to ``safetensors.numpy`` arrays against an
``eval_shape`` of the Flax module (no weight init).

Samplers: ``pndm`` (SD v1.x default, PLMS with ``skip_prk_steps``), ``ddim``, ``dpm`` (DPM-Solver++
2M) and ``euler``. The Flax DPM-Solver++ differs from PyTorch's default in its LAST step only: PyTorch
(``final_sigmas_type="zero"``) steps to σ = 0, i.e. returns the data prediction x̂₀, while the Flax
class steps to timestep 0 (σ ≈ 0.029) and leaves that much noise in; :func:`sampler_step` returns x̂₀ on
the last step, which makes ``dpm`` match PyTorch. Flax LMS returns NaN and is not offered.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import inspect
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mtok_jax.constants import SAMPLERS
from mtok_jax.models import attention as attention_lib
from mtok_jax.models import conv as conv_lib
from mtok_jax.models import hub



# --- Released SD v1.4 configs (CompVis/stable-diffusion-v1-4), so full-size shapes resolve without weights.
SD14_UNET_CONFIG: dict[str, Any] = {
    "_class_name": "UNet2DConditionModel",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD14_VAE_CONFIG: dict[str, Any] = {
    "_class_name": "AutoencoderKL",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "scaling_factor": 0.18215,
}
SD14_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}

FLAX_WEIGHTS = "diffusion_flax_model.msgpack"
PT_SAFETENSORS = "diffusion_pytorch_model.safetensors"
PT_BIN = "diffusion_pytorch_model.bin"
CONFIG_FILE = hub.CONFIG_FILE


# --------------------------------------------------------------------------------------- modules
def unet_from_config(config: Mapping[str, Any], dtype=jnp.float32):
    """``FlaxUNet2DConditionModel`` from a (PyTorch or Flax) diffusers config; rejects ≠32 GroupNorm groups."""
    from diffusers import FlaxUNet2DConditionModel

    groups = config.get("norm_num_groups", 32)
    if groups != 32:
        raise ValueError(
            f"UNet config has norm_num_groups={groups}: diffusers' FlaxUNet2DConditionModel always uses 32 "
            "GroupNorm groups, so these weights would load silently and compute something else. Use a UNet "
            "with norm_num_groups=32 (channels multiples of 32).")
    return FlaxUNet2DConditionModel.from_config(_fields_of(FlaxUNet2DConditionModel, config), dtype=dtype)


def vae_from_config(config: Mapping[str, Any], dtype=jnp.float32):
    """``FlaxAutoencoderKL`` from a diffusers config (it honours ``norm_num_groups``)."""
    from diffusers import FlaxAutoencoderKL

    return FlaxAutoencoderKL.from_config(_fields_of(FlaxAutoencoderKL, config), dtype=dtype)


def _fields_of(cls, config: Mapping[str, Any]) -> dict[str, Any]:
    """The config keys that the Flax module class takes (PyTorch-only keys such as ``act_fn`` dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in config.items() if k in names and k not in ("parent", "name")}


def param_shapes(module) -> dict[str, Any]:
    """Parameter tree of ``module`` as ``jax.ShapeDtypeStruct`` (no weights computed)."""
    return jax.eval_shape(module.init_weights, jax.random.PRNGKey(0))


def _remat_interceptor(next_fun, args, kwargs, context):
    from diffusers.models.attention_flax import FlaxTransformer2DModel
    from diffusers.models.resnet_flax import FlaxResnetBlock2D

    if context.method_name != "__call__" or not isinstance(context.module, (FlaxResnetBlock2D,
                                                                            FlaxTransformer2DModel)):
        return next_fun(*args, **kwargs)
    where = [i for i, a in enumerate(args) if isinstance(a, jax.Array)]  # the rest (flags) stays static

    def block(*arrays):
        full = list(args)
        for i, a in zip(where, arrays):
            full[i] = a
        return next_fun(*full, **kwargs)

    return jax.checkpoint(block)(*(args[i] for i in where))


@contextlib.contextmanager
def rematerialized_unet_blocks():
    """Inside: every ResNet block and spatial transformer of a diffusers Flax UNet/VAE applied while
    tracing keeps only its inputs for the backward pass and recomputes the rest there (`train.remat`;
    diffusers' Flax UNet has no remat option of its own). Same values and gradients; less memory for
    about one more forward pass of compute."""
    import flax.linen as nn

    with nn.intercept_methods(_remat_interceptor):
        yield


def _attention_interceptor(implementation: str):
    """A flax method interceptor that computes every diffusers ``FlaxAttention`` call with
    :func:`attention_lib.dot_product_attention` (its own q/k/v/out projections and dropout kept)."""
    from diffusers.models.attention_flax import FlaxAttention

    signature = inspect.signature(FlaxAttention.__call__)

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if context.method_name != "__call__" or not isinstance(module, FlaxAttention) or \
                module.use_memory_efficient_attention:
            return next_fun(*args, **kwargs)
        call = signature.bind(module, *args, **kwargs)
        call.apply_defaults()
        hidden, keys_from = call.arguments["hidden_states"], call.arguments["context"]
        keys_from = hidden if keys_from is None else keys_from
        b, heads, dim = hidden.shape[0], module.heads, module.dim_head
        q = module.query(hidden).reshape(b, -1, heads, dim)
        k = module.key(keys_from).reshape(b, -1, heads, dim)
        v = module.value(keys_from).reshape(b, -1, heads, dim)
        plan = attention_lib.site_plan(implementation, q.shape[1], k.shape[1])
        out = attention_lib.dot_product_attention(q, k, v, plan).reshape(b, -1, heads * dim)
        return module.dropout_layer(module.proj_attn(out), deterministic=call.arguments["deterministic"])

    return intercept


def _matmul_conv_interceptor(next_fun, args, kwargs, context):
    """A flax method interceptor that computes the stride-1 'same' convolutions :func:`conv_lib.as_matmul`
    selects with :func:`conv_lib.conv_as_matmul` (the module's own kernel, bias, dtype promotion)."""
    import flax.linen as nn
    from flax.linen.linear import canonicalize_padding

    module = context.module
    if context.method_name != "__call__" or type(module) is not nn.Conv or len(args) != 1 or kwargs:
        return next_fun(*args, **kwargs)
    x, k = args[0], tuple(module.kernel_size) if not isinstance(module.kernel_size, int) else (module.kernel_size,)
    same = {(1, 1): [(0, 0), (0, 0)], (3, 3): [(1, 1), (1, 1)]}.get(k)
    padding = canonicalize_padding(module.padding, len(k))
    padding = [(0, 0), (0, 0)] if padding == "VALID" else padding if isinstance(padding, str) else \
        [tuple(p) for p in padding]
    plain = all(v in (None, 1) or tuple(v) == (1, 1)
                for v in (module.strides, module.input_dilation, module.kernel_dilation))
    if (x.ndim != 4 or same is None or padding != same or not plain or module.feature_group_count != 1
            or not module.shared_weights or module.mask is not None or not module.has_variable("params", "kernel")
            or not conv_lib.as_matmul(k, x.shape[-1])):
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    bias = module.get_variable("params", "bias") if module.use_bias else None
    x, kernel, bias = module.promote_dtype(x, kernel, bias, dtype=module.dtype)
    y = conv_lib.conv_as_matmul(x, kernel, module.precision)
    return y if bias is None else y + bias


def unet_noise(unet, unet_params, latents: jax.Array, timesteps: jax.Array, states: jax.Array, *,
               attention: str = "einsum", conv: str = "xla", remat: bool = False) -> jax.Array:
    """The UNet's prediction [B, C, h, w] for latents [B, C, h, w], timesteps [B] and text states
    [B, 77, D]. attention: a resolved ``model.attention`` (einsum | xla | cudnn,
    :func:`attention_lib.resolve`); conv: a resolved ``model.conv`` (xla | matmul, :mod:`conv_lib`);
    remat: :func:`rematerialized_unet_blocks` (training only)."""
    import flax.linen as nn

    with contextlib.ExitStack() as stack:
        if remat:
            stack.enter_context(rematerialized_unet_blocks())
        if attention != "einsum":
            stack.enter_context(nn.intercept_methods(_attention_interceptor(attention)))
        if conv == "matmul":
            stack.enter_context(nn.intercept_methods(_matmul_conv_interceptor))
        return unet.apply({"params": unet_params}, latents, timesteps, states, train=False).sample


# --------------------------------------------------------------------------------------- loading
def pytorch_to_flax(pt_state: Mapping[str, np.ndarray], shapes: Mapping[str, Any]) -> dict[str, Any]:
    """PyTorch diffusers state dict (numpy values) → Flax param tree matching ``shapes``.

    Uses diffusers' own key renaming / reshaping (``rename_key``, ``rename_key_and_reshape_tensor``, the
    body of ``convert_pytorch_state_dict_to_flax`` minus its torch ``.numpy()`` and its full weight init).
    Raises on any missing, unexpected or mis-shaped parameter.
    """
    expected = traverse_util.flatten_dict(dict(shapes))
    out: dict[tuple, np.ndarray] = {}
    unexpected = []
    for pt_key, tensor in pt_state.items():
        flax_key, value = _to_flax(pt_key, np.asarray(tensor), expected)
        if flax_key is None:
            unexpected.append(pt_key)
            continue
        out[flax_key] = value
    _check_complete(expected, out, unexpected)
    return traverse_util.unflatten_dict(out)


def flax_to_pytorch(pt_shapes: Mapping[str, Sequence[int]], params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax param tree → PyTorch diffusers state dict {key: array of pt_shapes[key]}: the exact inverse of
    :func:`pytorch_to_flax`. Each key's conversion (a rename plus a transpose) is read off by converting a
    probe holding its own element indices; raises as :func:`pytorch_to_flax` does."""
    expected = traverse_util.flatten_dict(dict(params))
    out, done, unexpected = {}, {}, []
    for pt_key, shape in pt_shapes.items():
        size = int(np.prod(shape))
        flax_key, where = _to_flax(pt_key, np.arange(size, dtype=np.float64).reshape(tuple(shape)), expected)
        if flax_key is None:
            unexpected.append(pt_key)
            continue
        source = np.asarray(expected[flax_key])
        value = np.empty(size, source.dtype)
        value[where.astype(np.int64).ravel()] = source.ravel()
        out[pt_key] = value.reshape(tuple(shape))
        done[flax_key] = source
    _check_complete(expected, done, unexpected)
    return out


def _to_flax(pt_key: str, tensor: np.ndarray, expected: Mapping[tuple, Any]) -> tuple[tuple | None, np.ndarray]:
    """One PyTorch weight → (its Flax key, its value in the Flax layout); (None, _) when the Flax model
    has no such weight."""
    from diffusers.models.modeling_flax_pytorch_utils import rename_key, rename_key_and_reshape_tensor

    flax_key, value = rename_key_and_reshape_tensor(tuple(rename_key(pt_key).split(".")), tensor, expected)
    if flax_key not in expected:
        return None, value
    if value.shape != expected[flax_key].shape:
        raise ValueError(f"{pt_key}: shape {value.shape} after conversion, expected {expected[flax_key].shape}")
    return flax_key, value


def _check_complete(expected: Mapping[tuple, Any], converted: Mapping[tuple, Any], unexpected: Sequence[str]) -> None:
    missing = sorted("/".join(k) for k in expected.keys() - converted.keys())
    if missing or unexpected:
        raise ValueError(f"PyTorch weights do not match the Flax model: missing {missing[:8]} "
                         f"({len(missing)}), unexpected {list(unexpected)[:8]} ({len(unexpected)})")


def _safetensors_files(folder: str) -> list[str]:
    """The weight files: the single file, else the shards of its index, else one variant (e.g. fp16)."""
    single = os.path.join(folder, PT_SAFETENSORS)
    if os.path.isfile(single):
        return [single]
    index = single + ".index.json"
    if os.path.isfile(index):
        return [os.path.join(folder, f) for f in sorted(set(hub.read_json(index)["weight_map"].values()))]
    variants = sorted(glob.glob(os.path.join(folder, "diffusion_pytorch_model.*.safetensors")))
    return variants[:1]


def _load_safetensors_folder(folder: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    state: dict[str, np.ndarray] = {}
    for f in _safetensors_files(folder):
        state.update({k: v.astype(np.float32) for k, v in load_file(f).items()})
    return state


def _has_pt_safetensors(folder: str) -> bool:
    return bool(_safetensors_files(folder))


def _load_model(folder: str, module) -> dict[str, Any]:
    """Params for ``module`` from ``folder``: Flax msgpack, else PyTorch safetensors, else PyTorch .bin (torch)."""
    if os.path.isfile(os.path.join(folder, FLAX_WEIGHTS)):
        from flax.serialization import msgpack_restore

        with open(os.path.join(folder, FLAX_WEIGHTS), "rb") as f:
            params = msgpack_restore(f.read())
        expected = traverse_util.flatten_dict(param_shapes(module))
        got = traverse_util.flatten_dict(params)
        bad = [k for k in expected if k not in got or got[k].shape != expected[k].shape]
        if bad or len(got) != len(expected):
            raise ValueError(f"{folder}/{FLAX_WEIGHTS} does not match its config: e.g. {['/'.join(k) for k in bad[:5]]}")
    elif _has_pt_safetensors(folder):
        params = pytorch_to_flax(_load_safetensors_folder(folder), param_shapes(module))
    elif os.path.isfile(os.path.join(folder, PT_BIN)):
        try:
            import torch
        except ImportError as e:
            raise ImportError(f"{folder} holds only {PT_BIN}; reading it needs torch (pip install '.[torch]'), "
                              "or convert it to safetensors") from e
        pt = torch.load(os.path.join(folder, PT_BIN), map_location="cpu", weights_only=True)
        params = pytorch_to_flax({k: v.float().numpy() for k, v in pt.items()}, param_shapes(module))
    else:
        raise FileNotFoundError(f"no {FLAX_WEIGHTS}, {PT_SAFETENSORS} or {PT_BIN} in {folder}")
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), params)


def load_unet(path: str | os.PathLike, dtype=jnp.float32, *, allow_download: bool = False):
    """UNet folder / SD root / hub id → ``(FlaxUNet2DConditionModel, params)``; params float32, compute ``dtype``."""
    folder = hub.resolve_folder(path, "unet", allow_download=allow_download)
    module = unet_from_config(hub.read_json(os.path.join(folder, CONFIG_FILE)), dtype=dtype)
    return module, _load_model(folder, module)


def load_vae(path: str | os.PathLike, dtype=jnp.float32, *, allow_download: bool = False):
    """VAE folder / SD root / hub id → ``(FlaxAutoencoderKL, params)``; params float32, compute ``dtype``."""
    folder = hub.resolve_folder(path, "vae", allow_download=allow_download)
    module = vae_from_config(hub.read_json(os.path.join(folder, CONFIG_FILE)), dtype=dtype)
    return module, _load_model(folder, module)


# ------------------------------------------------------------------------------------ schedulers
def read_scheduler_config(path: str | os.PathLike, *, allow_download: bool = False) -> dict[str, Any]:
    """The ``scheduler_config.json`` of an SD root / scheduler folder / hub id."""
    folder = hub.resolve_folder(path, "scheduler", "scheduler_config.json", allow_download=allow_download)
    return hub.read_json(os.path.join(folder, "scheduler_config.json"))


def _scheduler(cls, config: Mapping[str, Any]):
    accepted = set(inspect.signature(cls.__init__).parameters)
    kwargs = {k: v for k, v in config.items() if k in accepted and k != "dtype"}
    scheduler = cls(**kwargs, dtype=jnp.float32)
    return scheduler, scheduler.create_state()


def noise_scheduler_from_config(config: Mapping[str, Any]):
    """Training scheduler: ``FlaxDDPMScheduler`` with the model's β schedule and prediction_type."""
    from diffusers import FlaxDDPMScheduler

    return _scheduler(FlaxDDPMScheduler, config)


def load_noise_scheduler(path: str | os.PathLike, *, allow_download: bool = False):
    """``(FlaxDDPMScheduler, state)`` built from the folder's scheduler config (training noise)."""
    return noise_scheduler_from_config(read_scheduler_config(path, allow_download=allow_download))


def sampler_from_config(config: Mapping[str, Any], kind: str = "pndm"):
    """``(scheduler, state)`` of sampler ``kind`` ∈ SAMPLERS on the model's β schedule / prediction_type."""
    import diffusers

    classes = {"pndm": diffusers.FlaxPNDMScheduler, "ddim": diffusers.FlaxDDIMScheduler,
               "dpm": diffusers.FlaxDPMSolverMultistepScheduler, "euler": diffusers.FlaxEulerDiscreteScheduler}
    if kind not in classes:
        raise ValueError(f"unknown scheduler {kind!r}: choose one of {SAMPLERS} (Flax LMS returns NaN: not offered)")
    config = dict(config)
    if kind == "pndm":
        config.setdefault("skip_prk_steps", True)
    return _scheduler(classes[kind], config)


def sampler_step(scheduler, state, model_output, index, sample):
    """One denoising step at ``state.timesteps[index]`` → ``(prev_sample, state)`` (jit-able, traced index).

    For DPM-Solver++ the last step returns the data prediction x̂₀ (σ_last = 0, PyTorch's default
    ``final_sigmas_type="zero"``) instead of the Flax class's step to timestep 0.
    """
    from diffusers import FlaxDPMSolverMultistepScheduler

    t = state.timesteps[index]
    prev, new_state = scheduler.step(state, model_output, t, sample, return_dict=False)
    if isinstance(scheduler, FlaxDPMSolverMultistepScheduler):
        x0 = scheduler.convert_model_output(state, model_output, t, sample)
        prev = jnp.where(index == len(state.timesteps) - 1, x0, prev)
    return prev, new_state


def denoise_latents(unet, unet_params, scheduler, state, text_states, uncond_states, latents, *,
                    num_steps: int, guidance: float | jax.Array, on_step=None, attention: str = "einsum",
                    conv: str = "xla"):
    """Classifier-free-guided denoising loop (one ``lax.fori_loop``; call it inside ``jax.jit``).

    text_states, uncond_states: [B, 77, D] conditional / unconditional CLIP states.
    latents: [B, C, h, w] initial standard-normal noise (scaled here by ``init_noise_sigma``).
    on_step: optional host function ``on_step(i, n)`` of the loop index i of n iterations (PNDM runs
    num_steps + 1) through ``jax.debug.callback``; it reads no value of the loop, so the images are
    the same with or without it.
    attention, conv: the resolved ``model.attention`` and ``model.conv`` (:func:`unet_noise`).
    Returns the final latents [B, C, h, w] (still × scaling_factor).
    """
    state = scheduler.set_timesteps(state, num_steps, latents.shape)  # PNDM: num_steps + 1 UNet calls
    context = jnp.concatenate([uncond_states, text_states], axis=0)
    guidance = jnp.asarray(guidance, jnp.float32)
    latents = latents * state.init_noise_sigma

    def body(i, carry):
        x, st = carry
        t = st.timesteps[i]
        x_in = scheduler.scale_model_input(st, jnp.concatenate([x, x], axis=0), t)
        t_in = jnp.broadcast_to(t, (x_in.shape[0],))
        out = unet_noise(unet, unet_params, x_in, t_in, context, attention=attention, conv=conv)
        uncond, cond = jnp.split(out.astype(jnp.float32), 2, axis=0)
        guided = uncond + guidance * (cond - uncond)
        if on_step is not None:
            jax.debug.callback(on_step, i, len(state.timesteps))
        return sampler_step(scheduler, st, guided, i, x)

    latents, _ = jax.lax.fori_loop(0, len(state.timesteps), body, (latents, state))
    return latents


# ------------------------------------------------------------------------------ VAE and noising
def encode_latents(vae, vae_params, images, rng):
    """images [B, H, W, 3] in [-1, 1] → sampled posterior latents [B, C, H/f, W/f] × scaling_factor."""
    return latents_from_moments(vae, posterior_moments(vae, vae_params, images), rng)


def posterior_moments(vae, vae_params, images):
    """images [B, H, W, 3] in [-1, 1] → the VAE posterior's (mean, log-variance) float32 [B, H/f, W/f, 2C]
    (what the exp1 feature cache stores)."""
    def moments(m, x):
        return m.quant_conv(m.encoder(x, deterministic=True))

    return vae.apply({"params": vae_params}, images.astype(vae.dtype), method=moments).astype(jnp.float32)


def latents_from_moments(vae, moments, rng):
    """posterior_moments [B, h, w, 2C] → sampled latents [B, C, h, w] × scaling_factor."""
    from diffusers.models.vae_flax import FlaxDiagonalGaussianDistribution

    z = FlaxDiagonalGaussianDistribution(moments.astype(jnp.float32)).sample(rng)  # NHWC
    return jnp.transpose(z, (0, 3, 1, 2)) * vae.scaling_factor


def decode_images(vae, vae_params, latents):
    """latents [B, C, h, w] (× scaling_factor) → images [B, H, W, 3] (≈[-1, 1], not clipped)."""
    def decode(m, z):
        return m.decoder(m.post_quant_conv(z), deterministic=True)

    z = jnp.transpose(latents / vae.scaling_factor, (0, 2, 3, 1)).astype(vae.dtype)
    return vae.apply({"params": vae_params}, z, method=decode).astype(jnp.float32)


def noisy_latents_and_target(scheduler, state, latents, noise, timesteps):
    """DDPM forward noising → ``(noisy [B,C,h,w], target)``: target = ε, or v = √ᾱ·ε − √(1−ᾱ)·x₀ for
    ``prediction_type == 'v_prediction'`` (SD-2 family)."""
    noisy = scheduler.add_noise(state, latents, noise, timesteps)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noisy, noise
    if kind == "v_prediction":
        return noisy, scheduler.get_velocity(state, latents, noise, timesteps)
    raise ValueError(f"prediction_type {kind!r} is not supported for training (epsilon or v_prediction)")


def images_to_uint8(images: jax.Array) -> jax.Array:
    """[..., H, W, 3] float in [-1, 1] → uint8 [0, 255] (rounded, clipped); jit-able."""
    return jnp.clip(jnp.round((images + 1.0) * 127.5), 0, 255).astype(jnp.uint8)
