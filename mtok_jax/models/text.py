"""Audio-token injection into the frozen CLIP text encoder (docs/design.md §2.4).

Choice: we **drive the submodules of transformers 4.57's Flax CLIP text model** instead of owning a
tower. ``FlaxCLIPTextModule`` is applied with ``method=`` a function of ours that does the embedding
step itself (token rows, the ``<*>`` row replaced by the audio token, + position rows) and then calls
the model's own ``encoder`` and ``final_layer_norm``. Why: the parameter tree, the attention/causal
mask, the activation and the LayerNorm epsilon are transformers' code, so any CLIP checkpoint that
``FlaxCLIPTextModel`` loads (Flax ``flax_model.msgpack`` or PyTorch ``model.safetensors``) works
unchanged and there is no second implementation to keep in sync. Nothing here resizes or trains the
49k-row token table: the audio token enters by a ``where`` on the looked-up rows, so gradients flow
only into the audio token.

Loading: ``flax_model.msgpack`` through transformers; a PyTorch ``model.safetensors`` / ``pytorch_model.bin``
through transformers' PyTorch→Flax conversion fed traced shapes (:func:`mtok_jax.models.hub.flax_params_from_pt`:
no random init — transformers 4.57's ``from_pt`` path needs an eager random init of the whole model first).
Prompts without a placeholder (the CFG negative prompt): :func:`tokenize_plain` + :func:`plain_text_states`.

Params for this module are ``{'text_model': ...}`` (exactly ``FlaxCLIPTextModel.params``).
``text_states`` / ``pooled_output`` are pure functions of (module, params, arrays); jit them with
``functools.partial(text_states, module)`` (the module holds a non-hashable transformers config).

EOS pooling: CLIP pools at the EOS position. Legacy configs (SD-1.x ``eos_token_id == 2``) use
``argmax(input_ids)``, which would pick the placeholder (its id is the largest); like the reference
(which rewrites the placeholder id to 5 first) we drop the placeholder id before the argmax.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze
from transformers import CLIPTextConfig, CLIPTokenizer
from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextModel, FlaxCLIPTextModule

from mtok_jax.models import hub

MAX_LENGTH = 77
PLACEHOLDER = "<*>"
LEGACY_EOS_ID = 2  # transformers' marker for configs saved before the EOS fix (pool at argmax(ids))

# CLIP ViT-L/14 text tower: CompVis/stable-diffusion-v1-4 text_encoder/config.json.
SD14_TEXT_CONFIG: dict[str, Any] = {
    "architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
    "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05, "max_position_embeddings": 77,
    "model_type": "clip_text_model", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 1,
    "projection_dim": 768, "vocab_size": 49408,
}


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

def load_tokenizer(path: str | os.PathLike, placeholder: str = PLACEHOLDER) -> CLIPTokenizer:
    """CLIP tokenizer folder → tokenizer with ``placeholder`` as one added token (id = BPE vocab size)."""
    tokenizer = CLIPTokenizer.from_pretrained(str(path))
    base_size = len(tokenizer.encoder)
    if placeholder in tokenizer.encoder:
        raise ValueError(f"placeholder {placeholder!r} is already an ordinary BPE token of {path}")
    tokenizer.add_tokens([placeholder])
    pid = tokenizer.convert_tokens_to_ids(placeholder)
    if pid != base_size:
        raise ValueError(f"placeholder {placeholder!r} got id {pid}, expected {base_size} (vocab size)")
    return tokenizer


def tokenize_plain(tokenizer: CLIPTokenizer, prompts: Sequence[str], max_length: int = MAX_LENGTH) -> np.ndarray:
    """Prompts without a placeholder (e.g. the empty CFG negative prompt) → input_ids int32 [B, 77]."""
    enc = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True,
                    return_tensors="np")
    return enc["input_ids"].astype(np.int32)


def tokenize_prompts(tokenizer: CLIPTokenizer, prompts: Sequence[str], placeholder: str = PLACEHOLDER,
                     max_length: int = MAX_LENGTH) -> tuple[np.ndarray, np.ndarray]:
    """Prompts with exactly one ``placeholder`` → (input_ids int32 [B, 77], placeholder_pos int32 [B]).

    Padded to ``max_length`` with the tokenizer's pad token (EOS for SD-1.x), truncated beyond it.
    """
    prompts = list(prompts)
    if placeholder not in tokenizer.get_vocab():
        raise ValueError(f"tokenizer has no {placeholder!r} token: load it with load_tokenizer()")
    pid = tokenizer.convert_tokens_to_ids(placeholder)
    input_ids = tokenize_plain(tokenizer, prompts, max_length)
    counts = (input_ids == pid).sum(axis=1)
    for prompt, count in zip(prompts, counts):
        if count != 1:
            raise ValueError(f"prompt {prompt!r} has {int(count)} {placeholder!r} placeholders "
                             f"(after truncation to {max_length} tokens); exactly one is required")
    return input_ids, (input_ids == pid).argmax(axis=1).astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Model, params
# ----------------------------------------------------------------------------------------------

def clip_text_config_from(path_or_dict: str | os.PathLike | Mapping[str, Any] | CLIPTextConfig) -> CLIPTextConfig:
    """CLIPTextConfig from a config object, a dict, or an HF folder / config.json path."""
    if isinstance(path_or_dict, CLIPTextConfig):
        return path_or_dict
    if isinstance(path_or_dict, Mapping):
        return CLIPTextConfig.from_dict(dict(path_or_dict))
    return CLIPTextConfig.from_pretrained(str(path_or_dict))


def text_encoder_module(config: Any, dtype=jnp.float32) -> FlaxCLIPTextModule:
    """The Flax module (params ``{'text_model': ...}``) for a config (anything clip_text_config_from takes)."""
    return FlaxCLIPTextModule(config=clip_text_config_from(config), dtype=dtype)


def init_text_params(module: FlaxCLIPTextModule, rng: jax.Array) -> dict[str, Any]:
    """Random params (transformers' init). ``jax.eval_shape(partial(init_text_params, module), key)``
    resolves a full-size config without allocating weights."""
    ids = jnp.zeros((1, module.config.max_position_embeddings), jnp.int32)
    pos = jnp.arange(ids.shape[1], dtype=jnp.int32)[None]
    return module.init(rng, ids, jnp.ones_like(ids), pos)["params"]


def load_text_encoder(path: str | os.PathLike, dtype=jnp.float32) -> tuple[FlaxCLIPTextModule, dict[str, Any]]:
    """HF CLIP text folder → (module, params float32 whatever the file's dtype).

    Floating leaves are cast to float32 like the UNet/VAE loaders do: a bf16 ``flax_model.msgpack`` would
    otherwise keep the token table in bf16 and round the audio token where it replaces the placeholder row.
    ``flax_model.msgpack`` is read by transformers; else the PyTorch ``model.safetensors`` (without torch)
    or ``pytorch_model.bin`` goes through transformers' PyTorch→Flax conversion (:func:`hub.flax_params_from_pt`).
    """
    path = str(path)
    module = text_encoder_module(path, dtype)
    if os.path.exists(os.path.join(path, "flax_model.msgpack")):
        _, params = FlaxCLIPTextModel.from_pretrained(path, _do_init=False, dtype=dtype)
    elif (state := hub.pt_state_dict(path)) is not None:
        shapes = jax.eval_shape(lambda k: init_text_params(module, k), jax.random.PRNGKey(0))
        params = hub.flax_params_from_pt(state, shapes, path)
    else:
        raise FileNotFoundError(f"{path}: no flax_model.msgpack, {hub.PT_SAFETENSORS} or {hub.PT_BIN}")
    return module, jax.tree_util.tree_map(_as_float32, unfreeze(params))


def _as_float32(x) -> jax.Array:
    x = jnp.asarray(x)
    return x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------

def _placeholder_mask(input_ids: jax.Array, placeholder_pos: jax.Array) -> jax.Array:
    """[B, L] bool, True at each row's placeholder position."""
    return jnp.arange(input_ids.shape[1])[None, :] == jnp.asarray(placeholder_pos)[:, None]


def _injected_forward(module: FlaxCLIPTextModule, input_ids, placeholder_pos, audio_token, deterministic):
    text = module.text_model
    is_placeholder = _placeholder_mask(input_ids, placeholder_pos)
    safe_ids = jnp.where(is_placeholder, 0, input_ids).astype(jnp.int32)   # placeholder id is out of the table
    tokens = text.embeddings.token_embedding(safe_ids)                    # [B, L, D]
    tokens = jnp.where(is_placeholder[..., None], audio_token[:, None, :].astype(tokens.dtype), tokens)
    positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None, :]
    hidden = tokens + text.embeddings.position_embedding(positions)
    hidden = text.encoder(hidden, attention_mask=jnp.ones_like(input_ids), deterministic=deterministic)[0]
    return text.final_layer_norm(hidden)


def text_states(module: FlaxCLIPTextModule, params: Mapping[str, Any], input_ids: jax.Array,
                placeholder_pos: jax.Array, audio_token: jax.Array, deterministic: bool = True) -> jax.Array:
    """CLIP last_hidden_state [B, L, D] (after the final LayerNorm) with the token-embedding row at
    ``placeholder_pos`` [B] replaced by ``audio_token`` [B, D] before position embeddings are added."""
    return module.apply({"params": params}, jnp.asarray(input_ids), jnp.asarray(placeholder_pos),
                        jnp.asarray(audio_token), deterministic, method=_injected_forward)


def plain_text_states(module: FlaxCLIPTextModule, params: Mapping[str, Any], input_ids: jax.Array) -> jax.Array:
    """CLIP last_hidden_state [B, L, D] of ordinary prompts (no audio token), e.g. the CFG negative prompt."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
    return module.apply({"params": params}, input_ids, jnp.ones_like(input_ids), positions)[0]


def eos_positions(config: CLIPTextConfig, input_ids: jax.Array, placeholder_pos: jax.Array) -> jax.Array:
    """[B] index of the EOS token used by CLIP pooling, ignoring the placeholder id."""
    ids = jnp.where(_placeholder_mask(input_ids, placeholder_pos), 0, jnp.asarray(input_ids))
    if config.eos_token_id == LEGACY_EOS_ID:
        return ids.argmax(axis=-1)
    return (ids == config.eos_token_id).argmax(axis=-1)


def pooled_output(module: FlaxCLIPTextModule, last_hidden_state: jax.Array, input_ids: jax.Array,
                  placeholder_pos: jax.Array) -> jax.Array:
    """CLIP pooled output [B, D]: ``last_hidden_state`` at the EOS position."""
    idx = eos_positions(module.config, input_ids, placeholder_pos)
    return last_hidden_state[jnp.arange(last_hidden_state.shape[0]), idx]


def label_targets(tokenizer: CLIPTokenizer, params: Mapping[str, Any], labels: Sequence[str]) -> jax.Array:
    """τ_label [L, D] float32: mean of the raw token-embedding rows of each label's BPE tokens
    (no BOS/EOS, no position embeddings, no transformer), as the reference's cosine loss."""
    table = params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    targets = []
    for label in labels:
        ids = tokenizer(label)["input_ids"][1:-1]
        if not ids:
            raise ValueError(f"label {label!r} has no tokens")
        targets.append(jnp.mean(jnp.take(table, jnp.asarray(ids), axis=0).astype(jnp.float32), axis=0))
    return jnp.stack(targets) if targets else jnp.zeros((0, table.shape[-1]), jnp.float32)
