"""The benchmarked work in PyTorch (mtok_jax.bench --reference torch): what the AudioToken/thesis scripts run.

`python -m mtok_jax.bench.torch_work ...` is the child process of one PyTorch measurement (mtok_jax.bench
starts it; this module is imported only there, so that JAX-only installs never import torch).

`build(what, config, preset, compiled)` → Work, the PyTorch twin of `jax_work.build`: the same shapes,
weights, frozen/trainable split and loss. The models are diffusers' `UNet2DConditionModel` and
`AutoencoderKL` and transformers' `CLIPTextModel` (SDPA attention) built from the SD folder's configs and
filled with the JAX system's weights (diffusion.flax_to_pytorch, transformers' Flax→PyTorch loader), BEATs and the
embedder of mtok_jax.torch_ref converted from the same params, `torch.optim.AdamW`. The audio token
replaces the placeholder's token-embedding row before CLIP adds position embeddings (as
mtok_jax.models.text). `compiled`: `torch.compile` (inductor) of
the UNet, the VAE decoder, the text encoder and the embedder; its first call (the warm-up) compiles.
Randomness (noise, timesteps, dropout) is torch's own: the same distributions, not the same draws.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import re
from typing import Any, Callable

import jax
import numpy as np
import torch
import torch.nn.functional as F

from mtok_jax import bench, cli, environment
from mtok_jax import system as system_lib
from mtok_jax.bench.jax_work import Work, random_inputs
from mtok_jax.data import pipeline
from mtok_jax.models import diffusion
from mtok_jax.torch_ref import beats as torch_beats
from mtok_jax.torch_ref import embedder as torch_embedder



@dataclasses.dataclass
class TorchSystem:
    """The PyTorch models and the JAX system's fixed tensors (prompt ids, label targets)."""
    config: Any
    beats: torch.nn.Module
    embedder: torch.nn.Module
    text: torch.nn.Module
    vae: torch.nn.Module
    unet: torch.nn.Module
    noise: Any  # diffusers DDPMScheduler
    prompts: dict[str, tuple[torch.Tensor, torch.Tensor]]  # 'train' | 'inference' | 'uncond' → (ids [1, 77], pos [1])
    label_targets: torch.Tensor  # [L, D]
    device: torch.device
    autocast: Callable[[], Any]


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load(config) -> TorchSystem:
    """The JAX system's models and weights in PyTorch (module docstring); JAX's copies are released."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model as transformers_load

    torch.set_num_threads(os.cpu_count() or 1)
    system, params = system_lib.load_system(config, pipeline.configured_labels(config))
    params = jax.tree.map(np.asarray, params)
    sd, dev = config.model.sd_path, device()

    def diffusers_model(cls, part, weights):
        model = cls.from_config(cls.load_config(sd, subfolder=part))
        state = diffusion.flax_to_pytorch({k: v.shape for k, v in model.state_dict().items()}, weights)
        model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
        return model

    text = CLIPTextModel._from_config(CLIPTextConfig.from_pretrained(os.path.join(sd, "text_encoder")),
                                      attn_implementation="sdpa")
    prompts = {"train": (system.train_ids, system.train_pos), "inference": (system.inference_ids, system.inference_pos),
               "uncond": (system_lib.negative_prompt_ids(system), np.zeros((1,), np.int32))}
    out = TorchSystem(
        config=config, beats=torch_beats.from_flax(params["beats"], system.beats.cfg),
        embedder=torch_embedder.from_flax(params["embedder"], config.model.unary_dropout_at_inference),
        text=transformers_load(text, params["text"]), vae=diffusers_model(AutoencoderKL, "vae", params["vae"]),
        unet=diffusers_model(UNet2DConditionModel, "unet", params["unet"]),
        noise=DDPMScheduler.from_pretrained(sd, subfolder="scheduler"),
        prompts={k: (torch.as_tensor(np.asarray(i), dtype=torch.long, device=dev),
                     torch.as_tensor(np.asarray(p), dtype=torch.long, device=dev)) for k, (i, p) in prompts.items()},
        label_targets=torch.as_tensor(np.asarray(system.label_targets, np.float32), device=dev), device=dev,
        autocast=lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=config.model.dtype == "bfloat16"))
    del system, params
    gc.collect()
    environment.release_free_host_memory()  # the loading copies: the training state needs the room (exp2)
    for name in ("beats", "embedder", "text", "vae", "unet"):
        setattr(out, name, getattr(out, name).to(dev).eval().requires_grad_(False))
    return out


# ===================================================================================================
# The forward pieces (as mtok_jax.system)
# ===================================================================================================
def beats_features(ts: TorchSystem, waveforms: torch.Tensor) -> torch.Tensor:
    """[B, N] → BEATs layers concatenated [B, T, len(layers)·C] (dropout when model.beats_train_mode)."""
    ts.beats.train(bool(ts.config.model.beats_train_mode))
    return torch_beats.audiotoken_features(ts.beats(waveforms), tuple(ts.config.model.beats_layers))


def text_states(ts: TorchSystem, token: torch.Tensor, prompt: str) -> torch.Tensor:
    """audio token [B, D] → CLIP last_hidden_state [B, 77, D] of `prompt` with the placeholder's token
    embedding replaced by the token."""
    ids, pos = ts.prompts[prompt]
    b = token.shape[0]
    ids = ids.expand(b, -1)
    tm = ts.text.text_model
    hit = torch.arange(ids.shape[1], device=ids.device)[None] == pos.expand(b)[:, None]  # [B, 77]
    rows = tm.embeddings.token_embedding(torch.where(hit, 0, ids))  # the placeholder's id may lie past the table
    hidden = tm.embeddings(inputs_embeds=torch.where(hit[..., None], token[:, None, :].to(rows.dtype), rows))
    from transformers.modeling_attn_mask_utils import _create_4d_causal_attention_mask

    causal = _create_4d_causal_attention_mask(ids.shape, hidden.dtype, hidden.device)
    return tm.final_layer_norm(tm.encoder(inputs_embeds=hidden, causal_attention_mask=causal)[0])


def plain_states(ts: TorchSystem) -> torch.Tensor:
    """CLIP states [1, 77, D] of the empty prompt (classifier-free guidance)."""
    return ts.text(ts.prompts["uncond"][0])[0]


def latents_of(ts: TorchSystem, images_nhwc: torch.Tensor) -> torch.Tensor:
    """images [B, H, W, 3] in [-1, 1] → sampled posterior latents × scaling_factor [B, 4, H/8, W/8]."""
    dist = ts.vae.encode(images_nhwc.permute(0, 3, 1, 2)).latent_dist
    return dist.sample() * ts.vae.config.scaling_factor


def total_loss(ts: TorchSystem, pred, target, token, tau) -> torch.Tensor:
    """mtok_jax.losses.total_loss in PyTorch."""
    t = ts.config.train
    mse = F.mse_loss(pred.float(), target.float())
    token = token.float()
    cos = F.cosine_similarity(token, tau, dim=-1).mean()
    return (mse + t.lambda_l1 * token.abs().mean() + t.lambda_l2 * token.square().sum(-1).mean()
            + t.lambda_cl * (1 - cos) ** 2)


# ===================================================================================================
# Workloads
# ===================================================================================================
def _tensors(ts: TorchSystem, inputs: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.as_tensor(v, device=ts.device) for k, v in inputs.items()}


def _blocking(fn: Callable[[], Any]) -> Callable[[], Any]:
    def call():
        fn()
        synchronize()
    return call


def build(what: str, config, preset, compiled: bool = False) -> Work:
    """The PyTorch Work of `what` (one of jax_work's; 'input' has no PyTorch twin)."""
    if compiled and what not in bench.TORCH_COMPILED:
        raise NotImplementedError(f"torch.compile is timed for {', '.join(bench.TORCH_COMPILED)} only")
    ts = load(config)
    kind = torch.cuda.get_device_name() if ts.device.type == "cuda" else "cpu"
    inputs = _tensors(ts, random_inputs(config, preset.batch))
    if compiled:
        ts.unet = torch.compile(ts.unet)
        ts.vae.decoder = torch.compile(ts.vae.decoder)
        ts.text = torch.compile(ts.text)
        ts.embedder = torch.compile(ts.embedder)
    if what in ("exp1", "exp2"):
        return _train_work(ts, inputs, kind)
    if what == "sample":
        return _sample_work(ts, inputs, preset.sample_steps, kind)
    with torch.no_grad():
        feats = beats_features(ts, inputs["audio"])
    if what == "beats":
        fn = lambda: beats_features(ts, inputs["audio"])  # noqa: E731
    elif what == "embedder":
        fn = lambda: ts.embedder(feats, train=False)  # noqa: E731
    elif what == "unet":
        gen = np.random.default_rng(2)
        c = ts.unet.config.in_channels
        side = preset.image_size // 8
        x = torch.as_tensor(gen.normal(size=(preset.batch, c, side, side)), dtype=torch.float32, device=ts.device)
        t = torch.as_tensor(gen.integers(0, 1000, preset.batch), device=ts.device)
        s = torch.as_tensor(gen.normal(size=(preset.batch, 77, ts.text.config.hidden_size)), dtype=torch.float32,
                            device=ts.device)
        fn = lambda: ts.unet(x, t, s).sample  # noqa: E731
    else:
        raise ValueError(f"unknown benchmark {what!r}")

    def run():
        with torch.no_grad(), ts.autocast():
            fn()
    return Work(_blocking(run), None, 0.0, kind)


def trainable_parts(ts: TorchSystem) -> dict[str, torch.nn.Module]:
    """The parts whose name matches `train.trainable` (a regex on 'part/...' paths)."""
    parts = {"beats": ts.beats, "embedder": ts.embedder, "text": ts.text, "vae": ts.vae, "unet": ts.unet}
    pattern = re.compile(ts.config.train.trainable)
    return {name: m for name, m in parts.items() if pattern.search(name + "/")}


def _train_work(ts: TorchSystem, inputs: dict[str, torch.Tensor], kind: str) -> Work:
    """One training step: the loss of train.system_loss, backward, AdamW (frozen parts without gradients)."""
    t = ts.config.train
    parts = trainable_parts(ts)
    for module in parts.values():
        module.requires_grad_(True)
    if t.remat and "unet" in parts:  # train.remat's PyTorch counterpart: activation checkpointing of UNet blocks
        ts.unet.enable_gradient_checkpointing()
    params = [p for m in parts.values() for p in m.parameters()]
    optimizer = torch.optim.AdamW(params, lr=t.lr, betas=(t.b1, t.b2), eps=t.eps, weight_decay=t.weight_decay)
    num_t = ts.noise.config.num_train_timesteps
    audio, images, labels = inputs["audio"], inputs["image"], inputs["label"].long()
    with torch.no_grad():
        uncond = plain_states(ts) if t.uncond_prob > 0 else None

    def step():
        with ts.autocast():
            with torch.set_grad_enabled("beats" in parts):
                feats = beats_features(ts, audio)
            ts.embedder.train()
            token = ts.embedder(feats, train=True)
            states = text_states(ts, token, "train")
            if uncond is not None:
                drop = torch.rand(states.shape[0], device=ts.device) < t.uncond_prob
                states = torch.where(drop[:, None, None], uncond.to(states.dtype), states)
            with torch.set_grad_enabled("vae" in parts):
                latents = latents_of(ts, images)
            noise = torch.randn_like(latents)
            steps = torch.randint(0, num_t, (latents.shape[0],), device=ts.device)
            noisy = ts.noise.add_noise(latents, noise, steps)
            pred = ts.unet(noisy, steps, states).sample
            loss = total_loss(ts, pred, noise, token, ts.label_targets[labels])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    n = sum(p.numel() for p in params)
    return Work(_blocking(step), None, 0.0, kind, {"trainable_params": n})


def _sample_work(ts: TorchSystem, inputs: dict[str, torch.Tensor], steps: int, kind: str) -> Work:
    """audio → uint8 images: the token, PNDM with classifier-free guidance 7.5 (the two halves in one UNet
    batch), VAE decode — diffusers' StableDiffusionPipeline loop."""
    from diffusers import PNDMScheduler

    scheduler = PNDMScheduler.from_pretrained(ts.config.model.sd_path, subfolder="scheduler")
    guidance = 7.5
    audio = inputs["audio"]
    side = ts.config.data.image_size // 8
    with torch.no_grad():
        uncond = plain_states(ts)

    def run():
        with torch.no_grad(), ts.autocast():
            token = ts.embedder(beats_features(ts, audio), train=False)
            cond = text_states(ts, token, "inference")
            context = torch.cat([uncond.expand_as(cond), cond])
            x = torch.randn(audio.shape[0], ts.unet.config.in_channels, side, side, device=ts.device)
            scheduler.set_timesteps(steps)
            x = x * scheduler.init_noise_sigma
            for t in scheduler.timesteps:
                x_in = scheduler.scale_model_input(torch.cat([x, x]), t)
                u, c = ts.unet(x_in, t, context).sample.float().chunk(2)
                x = scheduler.step(u + guidance * (c - u), t, x).prev_sample
            images = ts.vae.decode(x / ts.vae.config.scaling_factor).sample
            return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    return Work(_blocking(run), None, 0.0, kind, {"steps": steps, "scheduler": "pndm", "guidance": guidance})


if __name__ == "__main__":
    cli.run(lambda argv=None: bench.main(argv, builder=build))
