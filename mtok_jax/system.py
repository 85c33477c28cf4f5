"""The one conditioning path that training, sampling and evaluation share (docs/design.md §1, §2.2–2.4).

  waveforms [B, N] 16 kHz ─► BEATs (config.model.beats_layers concatenated) [B, T, k·C]
    ─► embedder ─► audio token [B, D] ─► CLIP text with "<*>" replaced ─► text states [B, 77, D]

`load_system(config)` loads every part through the loaders used for real weights and returns a
`System` (modules, noise scheduler, tokenized prompts, label targets) plus
`params = {'beats', 'embedder', 'text', 'unet', 'vae'}`. `eval_shapes(config)` resolves every shape
of the same path at full size (SD v1.4 + BEATs iter3+) without any weights.

Randomness is per example: `audio_token` takes one key per example (or one key, from which example i
gets fold_in(key, i)), so an example's dropout never depends on its batch or device.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mtok_jax import config_utils
from mtok_jax import tree as tree_lib
from mtok_jax.constants import PROMPTS
from mtok_jax.models import attention as attention_lib
from mtok_jax.models import beats as beats_lib
from mtok_jax.models import conv as conv_lib
from mtok_jax.models import diffusion
from mtok_jax.models import embedder as embedder_lib
from mtok_jax.models import hub
from mtok_jax.models import text as text_lib



@dataclasses.dataclass(frozen=True, eq=False)
class System:
    """Everything but the parameters. Prompt ids: int32 [1, 77]; placeholder positions: int32 [1]."""

    beats: beats_lib.BEATs
    embedder: embedder_lib.AudioTokenEmbedder
    text: Any  # transformers FlaxCLIPTextModule
    unet: Any  # diffusers FlaxUNet2DConditionModel
    vae: Any  # diffusers FlaxAutoencoderKL
    noise_scheduler: Any  # diffusers FlaxDDPMScheduler (training noise)
    noise_state: Any
    tokenizer: Any  # transformers CLIPTokenizer with the placeholder added (None in eval_shapes)
    train_ids: jax.Array
    train_pos: jax.Array
    inference_ids: jax.Array
    inference_pos: jax.Array
    labels: tuple[str, ...]
    label_targets: jax.Array  # τ_label [L, D] float32
    config: ml_collections.ConfigDict

    @property
    def token_dim(self) -> int:
        return int(self.embedder.output_dim)

    @property
    def attention(self) -> str:
        """The UNet's attention (einsum | xla | cudnn | blocked): `model.attention` for this backend and dtype."""
        return unet_attention(self.config)

    @property
    def conv(self) -> str:
        """The UNet's stride-1 convolutions (xla | matmul): `model.conv` for this backend."""
        return conv_lib.resolve(self.config.model.conv)


def beats_blocked_attention(config) -> bool:
    """`model.beats_attention` resolved for this backend; BEATs counts as trained where `train.trainable`
    selects its leaves (gradients flow through its attention)."""
    trained = tree_lib.path_matcher(config.train.trainable)("beats/x")
    return beats_lib.resolve_attention(config.model.beats_attention, trained=trained)


def unet_attention(config) -> str:
    """`model.attention` resolved (mtok_jax.models.attention.resolve); ConfigError with the fix if unusable."""
    try:
        return attention_lib.resolve(config.model.attention, compute_dtype(config))
    except ValueError as e:
        raise config_utils.ConfigError(f"invalid config: {e}") from None


def compute_dtype(config) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]


# ---------------------------------------------------------------------------------------------------
# The path
# ---------------------------------------------------------------------------------------------------
def example_keys(key: jax.Array, num: int, offset: int = 0) -> jax.Array:
    """Keys [num] = fold_in(key, offset + i): example i's randomness never depends on how the batch is
    split (micro-batches, devices)."""
    idx = jnp.asarray(offset, jnp.uint32) + jnp.arange(num, dtype=jnp.uint32)
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)


def split_example_keys(keys: jax.Array) -> dict[str, jax.Array]:
    """Example keys [B] → {'token', 'vae', 'noise', 'timestep'}: [B] keys each (split(key, 4) in that
    order), the one split that the loss and the accumulation pre-pass share; CFG dropout draws from
    fold_in(key, 4)."""
    k = jax.vmap(lambda key: jax.random.split(key, 4))(keys)
    return {name: k[:, i] for i, name in enumerate(("token", "vae", "noise", "timestep"))}


def per_example_keys(rng: jax.Array, batch: int) -> jax.Array:
    """One key per example: `rng` if it already holds [batch] keys, else :func:`example_keys` of it."""
    if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):  # raw uint32 keys [2] / [B, 2]
        rng = jax.random.wrap_key_data(jnp.asarray(rng, jnp.uint32))
    if rng.ndim == 1:
        if rng.shape[0] != batch:
            raise ValueError(f"got {rng.shape[0]} keys for {batch} examples")
        return rng
    return example_keys(rng, batch)


def beats_features(system: System, params: Mapping[str, Any], waveforms: jax.Array, *, rng: jax.Array,
                   train: bool) -> jax.Array:
    """waveforms [B, N] → concatenated BEATs layer outputs [B, T, len(layers)·C] (per-example dropout
    when training with `model.beats_train_mode`)."""
    deterministic = not (train and system.config.model.beats_train_mode)
    layers = tuple(system.config.model.beats_layers)

    def one(w, key):
        out = system.beats.apply({"params": params["beats"]}, w[None], deterministic=deterministic,
                                 rngs={"dropout": key})
        return beats_lib.audiotoken_features(out, layers)[0]

    return jax.vmap(one)(waveforms, per_example_keys(rng, waveforms.shape[0]))


def audio_token(system: System, params: Mapping[str, Any], waveforms: jax.Array, *, rng: jax.Array,
                train: bool) -> jax.Array:
    """waveforms [B, N] float32 16 kHz in [-1, 1] → audio token e [B, D] float32.

    rng: one key, or [B] keys (one per example). `train` turns on the embedder's unary dropout (on
    at inference too unless `model.unary_dropout_at_inference` is off) and BEATs' dropout/layer drop
    when `model.beats_train_mode`.
    """
    beats_keys, embedder_keys = _token_keys(rng, waveforms.shape[0])
    feats = beats_features(system, params, waveforms, rng=beats_keys, train=train)
    return embed_features(system, params, feats, keys=embedder_keys, train=train)


def cached_audio_token(system: System, params: Mapping[str, Any], features: jax.Array, *, rng: jax.Array,
                       train: bool) -> jax.Array:
    """audio_token from cached BEATs features [B, T, C] (mtok_jax.data.features; BEATs in eval mode): the
    same token for the same rng as audio_token of the clips they came from."""
    _, embedder_keys = _token_keys(rng, features.shape[0])
    return embed_features(system, params, features.astype(jnp.float32), keys=embedder_keys, train=train)


def batch_audio_token(system: System, params: Mapping[str, Any], batch: Mapping[str, jax.Array], *,
                      rng: jax.Array, train: bool) -> jax.Array:
    """The audio token of a batch holding 'audio' clips or cached 'features' (mtok_jax.data.pipeline)."""
    if "features" in batch:
        return cached_audio_token(system, params, batch["features"], rng=rng, train=train)
    return audio_token(system, params, batch["audio"], rng=rng, train=train)


def embed_features(system: System, params: Mapping[str, Any], features: jax.Array, *, keys: jax.Array,
                   train: bool) -> jax.Array:
    """BEATs features [B, T, C] → audio token [B, D] float32; keys [B]: the embedder's dropout per example."""
    def one(f, key):
        return system.embedder.apply({"params": params["embedder"]}, f[None], deterministic=not train,
                                     rngs={"dropout": key})[0]

    return jax.vmap(one)(features, keys)


def _token_keys(rng: jax.Array, batch: int) -> tuple[jax.Array, jax.Array]:
    """(BEATs keys [B], embedder keys [B]) of audio_token's `rng`."""
    k = jax.vmap(jax.random.split)(per_example_keys(rng, batch))  # [B, 2]: BEATs, embedder
    return k[:, 0], k[:, 1]


def text_states(system: System, params: Mapping[str, Any], token: jax.Array, prompt) -> jax.Array:
    """audio token [B, D] → CLIP last_hidden_state [B, 77, D] of prompt 'train' or 'inference' (or a
    tokenized prompt: (ids int32 [1, 77], placeholder position int32 [1])) with the placeholder's
    token embedding replaced by the audio token."""
    if isinstance(prompt, tuple):
        ids, pos = prompt
    elif prompt not in PROMPTS:
        raise ValueError(f"prompt {prompt!r}: expected one of {PROMPTS}")
    else:
        ids, pos = (system.train_ids, system.train_pos) if prompt == "train" else (system.inference_ids,
                                                                                      system.inference_pos)
    b = token.shape[0]
    ids = jnp.broadcast_to(ids, (b, ids.shape[-1]))
    pos = jnp.broadcast_to(pos, (b,))
    return text_lib.text_states(system.text, params["text"], ids, pos, token)


UNCONDITIONAL_PROMPT = ""  # the negative prompt of classifier-free guidance (and of CFG dropout)


def negative_prompt_ids(system: System, prompt: str = UNCONDITIONAL_PROMPT) -> np.ndarray:
    """int32 [1, 77] ids of a plain prompt (the negative prompt of classifier-free guidance); zeros of that
    shape for an :func:`abstract_system` (no tokenizer: shapes only)."""
    if system.tokenizer is None:
        return np.zeros(np.shape(system.inference_ids), np.int32)
    return text_lib.tokenize_plain(system.tokenizer, [prompt], max_length=system.inference_ids.shape[-1])


def unconditional_states(system: System, text_params: Mapping[str, Any],
                         ids: jax.Array | None = None) -> jax.Array:
    """CLIP last_hidden_state [1, 77, D] of the negative prompt `ids` [1, 77] (default: the empty
    prompt; plain CLIP, no audio token)."""
    ids = negative_prompt_ids(system) if ids is None else ids
    return text_lib.plain_text_states(system.text, text_params, ids).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
def _embedder_module(config, output_dim: int) -> embedder_lib.AudioTokenEmbedder:
    return embedder_lib.AudioTokenEmbedder(output_dim, config.model.unary_dropout_at_inference, compute_dtype(config))


def _embedder_input_dim(config, beats_cfg: Mapping[str, Any]) -> int:
    return len(config.model.beats_layers) * int(beats_lib.beats_config(beats_cfg)["encoder_embed_dim"])


def _check(config, beats_cfg: Mapping[str, Any], text_hidden: int, cross_dim: int,
           unet_cfg: Mapping[str, Any], vae_cfg: Mapping[str, Any]) -> None:
    factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1) * 2 ** (len(unet_cfg["block_out_channels"]) - 1)
    for hw in (config_utils.image_hw(config), config_utils.sample_hw(config)):
        if any(s % factor for s in hw):
            raise ValueError(f"image size {hw} must be a multiple of {factor} for this VAE + UNet (data.image_size)")
    n_layers = int(beats_lib.beats_config(beats_cfg)["encoder_layers"])
    if max(config.model.beats_layers) >= n_layers:
        raise ValueError(f"model.beats_layers={tuple(config.model.beats_layers)} but BEATs has {n_layers} layers")
    if text_hidden != cross_dim:
        raise ValueError(f"CLIP text width {text_hidden} != UNet cross_attention_dim {cross_dim}")


def load_system(config, labels: Sequence[str]) -> tuple[System, dict[str, Any]]:
    """Load every part named in `config.model` → (System, params {'beats','embedder','text','unet','vae'}).

    Params are float32 (the compute dtype is `config.model.dtype`). A missing `model.embedder_path`
    means a fresh PyTorch-style init from `config.seed`. `labels`: the label names of the training
    data (their CLIP text states are the targets τ of the label losses); the caller knows them (the
    dataset's metadata, or the run's checkpoint).
    """
    m = config.model
    dtype = compute_dtype(config)
    unet_attention(config)  # an unusable model.attention fails before any file is read
    beats, beats_params = beats_lib.load_beats(m.beats_path, dtype=dtype, split_conv_pos=m.split_conv_pos,
                                               remat=config.train.remat, blocked_attention=beats_blocked_attention(config))
    fetch = dict(allow_download=m.allow_download)
    unet, unet_params = diffusion.load_unet(m.sd_path, dtype=dtype, **fetch)
    vae, vae_params = diffusion.load_vae(m.sd_path, dtype=dtype, **fetch)
    noise_scheduler, noise_state = diffusion.load_noise_scheduler(m.sd_path, **fetch)
    text, text_params = text_lib.load_text_encoder(hub.resolve_folder(m.sd_path, "text_encoder", **fetch),
                                                   dtype=dtype)
    tokenizer = text_lib.load_tokenizer(hub.resolve_folder(m.sd_path, "tokenizer", "vocab.json", **fetch),
                                        config.prompt.placeholder)
    hidden = int(text.config.hidden_size)
    _check(config, beats.cfg, hidden, int(unet.cross_attention_dim), unet.config, vae.config)
    if m.embedder_path:
        embedder, embedder_params = embedder_lib.load_embedder(m.embedder_path, m.unary_dropout_at_inference, dtype)
        if embedder.output_dim != hidden:
            raise ValueError(f"embedder at {m.embedder_path} outputs {embedder.output_dim}, CLIP width is {hidden}")
    else:
        embedder = _embedder_module(config, hidden)
        dummy = jnp.zeros((1, 2, _embedder_input_dim(config, beats.cfg)), jnp.float32)
        init = jax.jit(lambda k: embedder.init({"params": k, "dropout": k}, dummy)["params"])
        embedder_params = init(jax.random.fold_in(jax.random.key(config.seed), 1))
    labels = tuple(labels)
    prompts = {}
    for name in PROMPTS:
        ids, pos = text_lib.tokenize_prompts(tokenizer, [config.prompt[name]], config.prompt.placeholder)
        prompts[name] = (jnp.asarray(ids), jnp.asarray(pos))
    system = System(beats=beats, embedder=embedder, text=text, unet=unet, vae=vae,
                    noise_scheduler=noise_scheduler, noise_state=noise_state, tokenizer=tokenizer,
                    train_ids=prompts["train"][0], train_pos=prompts["train"][1],
                    inference_ids=prompts["inference"][0], inference_pos=prompts["inference"][1],
                    labels=labels, label_targets=text_lib.label_targets(tokenizer, text_params, labels),
                    config=config)
    params = {"beats": beats_params, "embedder": embedder_params, "text": text_params, "unet": unet_params,
              "vae": vae_params}
    return system, params


# ---------------------------------------------------------------------------------------------------
# Shapes without weights
# ---------------------------------------------------------------------------------------------------
_SHAPES_CACHE: dict[tuple[str, str], Any] = {}


def _cached_shapes(part: str, arch: Mapping[str, Any], make) -> Any:
    """Parameter shapes of one architecture (float32 whatever the compute dtype), traced once per process."""
    key = (part, json.dumps(dict(arch), sort_keys=True, default=str))
    if key not in _SHAPES_CACHE:
        _SHAPES_CACHE[key] = make()
    return _SHAPES_CACHE[key]


def abstract_system(config, *, full_size: bool = True, num_labels: int = 18) -> tuple[System, dict[str, Any]]:
    """A System and its parameter shapes (ShapeDtypeStructs) with no weights and no files read.

    full_size: the released architectures (SD v1.4 UNet/VAE/CLIP-L text, BEATs iter3+ AS2M);
    otherwise the architecture configs found at config.model.{sd_path, beats_path}. Prompt ids are
    placeholders of the right shape (no tokenizer); label targets are zeros [num_labels, D].
    """
    dtype = compute_dtype(config)
    m = config.model
    if full_size:
        beats_cfg, unet_cfg, vae_cfg = beats_lib.BEATS_ITER3_PLUS_AS2M_CFG, diffusion.SD14_UNET_CONFIG, \
            diffusion.SD14_VAE_CONFIG
        text_cfg, sched_cfg = text_lib.SD14_TEXT_CONFIG, diffusion.SD14_SCHEDULER_CONFIG
    else:
        beats_cfg = hub.read_json(os.path.join(m.beats_path, "config.json"))
        unet_cfg, vae_cfg, text_cfg = (
            hub.read_json(os.path.join(hub.resolve_folder(m.sd_path, part, allow_download=m.allow_download),
                                    hub.CONFIG_FILE)) for part in ("unet", "vae", "text_encoder"))
        sched_cfg = diffusion.read_scheduler_config(m.sd_path, allow_download=m.allow_download)
    beats = beats_lib.BEATs(dict(beats_cfg), dtype=dtype, split_conv_pos=m.split_conv_pos, remat=config.train.remat,
                            blocked_attention=beats_blocked_attention(config))
    unet = diffusion.unet_from_config(unet_cfg, dtype=dtype)
    vae = diffusion.vae_from_config(vae_cfg, dtype=dtype)
    text = text_lib.text_encoder_module(text_cfg, dtype)
    noise_scheduler, noise_state = diffusion.noise_scheduler_from_config(sched_cfg)
    hidden = int(text.config.hidden_size)
    _check(config, beats_cfg, hidden, int(unet.cross_attention_dim), unet_cfg, vae_cfg)
    embedder = _embedder_module(config, hidden)
    key = jax.random.key(0)
    emb_in = jax.ShapeDtypeStruct((1, 2, _embedder_input_dim(config, beats_cfg)), jnp.float32)
    shapes = {
        "beats": _cached_shapes("beats", beats_cfg, lambda: beats_lib.param_shapes(dict(beats_cfg))),
        "embedder": jax.eval_shape(lambda x: embedder.init({"params": key, "dropout": key}, x)["params"], emb_in),
        "text": _cached_shapes("text", text_cfg, lambda: jax.eval_shape(
            lambda k: text_lib.init_text_params(text, k), key)),
        "unet": _cached_shapes("unet", unet_cfg, lambda: diffusion.param_shapes(unet)),
        "vae": _cached_shapes("vae", vae_cfg, lambda: diffusion.param_shapes(vae)),
    }
    ids = jnp.zeros((1, text_lib.MAX_LENGTH), jnp.int32)
    pos = jnp.full((1,), 5, jnp.int32)
    system = System(beats=beats, embedder=embedder, text=text, unet=unet, vae=vae, noise_scheduler=noise_scheduler,
                    noise_state=noise_state, tokenizer=None, train_ids=ids, train_pos=pos, inference_ids=ids,
                    inference_pos=pos, labels=tuple(f"label {i}" for i in range(num_labels)),
                    label_targets=jnp.zeros((num_labels, hidden), jnp.float32), config=config)
    return system, shapes


def eval_shapes(config, *, full_size: bool = True, batch_size: int | None = None) -> dict[str, Any]:
    """Every shape of the conditioning + denoising path for one training micro-batch, no weights.

    → {'params': {part: ShapeDtypeStruct tree}, 'beats_features', 'audio_token', 'text_states',
       'latents', 'unet_out'} (ShapeDtypeStructs). Raises if any shape does not fit.
    """
    system, shapes = abstract_system(config, full_size=full_size)
    b = int(batch_size or config.train.batch_size)
    waves = jax.ShapeDtypeStruct((b, config_utils.clip_samples(config)), jnp.float32)
    images = jax.ShapeDtypeStruct((b, *config_utils.image_hw(config), 3), jnp.float32)
    key = jax.random.key(0)

    def forward(params, w, img):
        feats = beats_features(system, params, w, rng=key, train=True)
        token = audio_token(system, params, w, rng=key, train=True)
        states = text_states(system, params, token, "train")
        latents = diffusion.encode_latents(system.vae, params["vae"], img, key)
        t = jnp.zeros((b,), jnp.int32)
        out = diffusion.unet_noise(system.unet, params["unet"], latents, t, states, attention=system.attention,
                                   conv=system.conv)
        return feats, token, states, latents, out

    feats, token, states, latents, out = jax.eval_shape(forward, shapes, waves, images)
    return {"params": shapes, "beats_features": feats, "audio_token": token, "text_states": states,
            "latents": latents, "unet_out": out}
