"""AudioToken embedder: BEATs features [B, T, C_in] → one audio token [B, D] (docs/design.md §2.3).

Port of the reference ``FGAEmbedder`` (guyyariv/AudioToken ``modules/AudioToken/embedder.py`` +
``modules/FGA/atten.py``, one utility, self-pairwise only):

  H   = fc2(GELU_erf(fc1(x)))                                   [B, T, D]
  u_t = w·Dropout_0.5(ReLU(W_e h_t + b_e)) + b                  unary potential      [B, T]
  p_t = mean_s cos(W_X h_t + b_X, W_Y h_s + b_Y)                self-pairwise        [B, T]
  z_t = r0·u_t + r1·p_t  (bias-free 2→1 mix),  α = softmax_t z,  e = Σ_t α_t h_t     [B, D]

Reference quirk kept behind ``unary_dropout_at_inference`` (default True = reference): the unary
dropout calls ``F.dropout`` with its default ``training=True``, so it is active at inference too.
With the flag on it draws from the ``'dropout'`` rng even when ``deterministic=True``; with it off
the dropout is active only when ``deterministic=False``.

Init matches PyTorch's Linear/Conv1d defaults: U(±1/√fan_in) for weights and biases.
Intermediates (``fc2_out``, ``unary``, ``self_pairwise``, ``logits``, ``attn_weights``) are sown into
the ``'intermediates'`` collection for debugging/parity tests.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from mtok_jax import pt_checkpoint
from mtok_jax.params_io import load_params, save_params

UNARY_DROPOUT_RATE = 0.5
L2_EPS = 1e-12  # F.normalize eps


def torch_uniform_init(fan_in: int):
    """PyTorch default Linear/Conv init: U(-1/√fan_in, +1/√fan_in) (kaiming_uniform a=√5 == this bound)."""
    bound = 1.0 / np.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def _dense(features: int, fan_in: int, name: str, dtype, use_bias: bool = True) -> nn.Dense:
    init = torch_uniform_init(fan_in)
    return nn.Dense(features, use_bias=use_bias, kernel_init=init, bias_init=init, dtype=dtype,
                    param_dtype=jnp.float32, name=name)


def _l2_normalize(x: jax.Array) -> jax.Array:
    """x / max(‖x‖₂, 1e-12) over the last axis (torch ``F.normalize``)."""
    norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
    return x / jnp.maximum(norm, L2_EPS)


class AudioTokenEmbedder(nn.Module):
    """MLP + factor-graph attentive pooling; ``x [B, T, C_in] → audio token [B, output_dim]``."""

    output_dim: int
    unary_dropout_at_inference: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True,
                 unary_dropout_mask: jax.Array | None = None) -> jax.Array:
        """``x`` [B, T, C_in] → [B, output_dim] float32.

        ``unary_dropout_mask`` (optional, [B, T, output_dim], 1 = kept) replays a recorded dropout
        mask instead of drawing one (kept values are scaled by 1/(1-p) = 2); it is applied whenever
        given. Otherwise the dropout is active iff ``not deterministic or unary_dropout_at_inference``
        and then needs ``rngs={'dropout': key}``.
        """
        c_in, d = x.shape[-1], self.output_dim
        x = x.astype(self.dtype)
        h = _dense(c_in, c_in, "fc1", self.dtype)(x)
        h = nn.gelu(h, approximate=False)
        h = _dense(d, c_in, "fc2", self.dtype)(h)                          # H [B, T, D]
        self.sow("intermediates", "fc2_out", h)

        # Unary potential.
        r = nn.relu(_dense(d, d, "unary_embed", self.dtype)(h))
        keep_scale = 1.0 / (1.0 - UNARY_DROPOUT_RATE)
        if unary_dropout_mask is not None:
            r = r * (unary_dropout_mask.astype(r.dtype) * keep_scale)
        elif (not deterministic) or self.unary_dropout_at_inference:
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - UNARY_DROPOUT_RATE, r.shape)
            r = jnp.where(keep, r * keep_scale, jnp.zeros_like(r))
        unary = _dense(1, d, "unary_reduce", self.dtype)(r)[..., 0].astype(jnp.float32)   # [B, T]

        # Self-pairwise potential: mean over keys of the cosine matrix.
        a = _l2_normalize(_dense(d, d, "pairwise_embed_x", self.dtype)(h).astype(jnp.float32))
        b = _l2_normalize(_dense(d, d, "pairwise_embed_y", self.dtype)(h).astype(jnp.float32))
        pairwise = jnp.mean(jnp.einsum("btc,bsc->bts", a, b), axis=-1)     # [B, T]

        potentials = jnp.stack([unary, pairwise], axis=-1)                 # [B, T, 2] order [unary, self]
        logits = _dense(1, 2, "potential_mix", jnp.float32, use_bias=False)(potentials)[..., 0]
        attn = jax.nn.softmax(logits, axis=-1)                             # [B, T]
        for name, v in (("unary", unary), ("self_pairwise", pairwise), ("logits", logits),
                        ("attn_weights", attn)):
            self.sow("intermediates", name, v)
        return jnp.einsum("bt,btd->bd", attn, h.astype(jnp.float32))


# Key prefixes of the reference wrapper's state dict (AudioToken.py / MusicToken_no_accel.py attributes).
WRAPPER_PARTS = {"embedder": "embedder.", "beats": "aud_encoder.", "unet": "unet.", "text": "text_encoder.",
                 "vae": "vae."}


def wrapper_part(state_dict: Mapping[str, Any], part: str) -> dict[str, Any]:
    """The keys of one part (a key of WRAPPER_PARTS) of a wrapper state dict, prefix stripped; {} if absent."""
    prefix = WRAPPER_PARTS[part]
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


# Flax module name → (reference FGAEmbedder state-dict prefix, layer kind): the one key map both
# directions use. 'linear': weight [out, in] ↔ kernel [in, out]; 'conv1x1': Conv1d k=1 weight [out, in, 1]
# ↔ kernel [in, out]; 'conv1x1_nobias': the same without a bias.
TORCH_KEYS = {
    "fc1": ("fc1", "linear"),
    "fc2": ("fc2", "linear"),
    "unary_embed": ("fga.un_models.0.embed", "conv1x1"),
    "unary_reduce": ("fga.un_models.0.feature_reduce", "conv1x1"),
    "pairwise_embed_x": ("fga.pp_models.0.embed_X", "conv1x1"),
    "pairwise_embed_y": ("fga.pp_models.0.embed_Y", "conv1x1"),
    "potential_mix": ("fga.reduce_potentials.0", "conv1x1_nobias"),
}


def _torch_key_set() -> set[str]:
    return {f"{prefix}.{leaf}" for prefix, kind in TORCH_KEYS.values()
            for leaf in (("weight",) if kind.endswith("nobias") else ("weight", "bias"))}


def params_from_torch(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Reference ``FGAEmbedder`` state dict (key names of the AudioToken repo) → Flax params.

    Accepts numpy arrays or torch tensors, and the thesis's whole-wrapper state dict
    (``model_<timestamp>_<epoch>``: ``embedder.*`` among ``unet.*``, ``aud_encoder.*``, …), of which only
    the ``embedder.*`` keys are read (:func:`wrapper_part`). Inverse: :func:`params_to_torch`.
    """
    sd = {k: np.asarray(v.detach().cpu().numpy() if hasattr(v, "detach") else v, np.float32)
          for k, v in (wrapper_part(state_dict, "embedder") or state_dict).items()}
    expected = _torch_key_set()
    missing, extra = expected - set(sd), set(sd) - expected
    if missing or extra:
        raise KeyError(f"not an AudioToken FGAEmbedder state dict: missing {sorted(missing)}, "
                       f"unexpected {sorted(extra)}")
    params = {}
    for name, (prefix, kind) in TORCH_KEYS.items():
        w = sd[prefix + ".weight"]
        params[name] = {"kernel": np.ascontiguousarray((w.T if kind == "linear" else w[:, :, 0].T))}
        if not kind.endswith("nobias"):
            params[name]["bias"] = sd[prefix + ".bias"]
    return params


def params_to_torch(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Flax params → the reference ``FGAEmbedder`` state dict (AudioToken's ``learned_embeds.bin``
    key names and layouts; float32 numpy, contiguous). Inverse of :func:`params_from_torch`."""
    sd = {}
    for name, (prefix, kind) in TORCH_KEYS.items():
        k = np.asarray(params[name]["kernel"], np.float32).T                 # [out, in]
        sd[prefix + ".weight"] = np.ascontiguousarray(k if kind == "linear" else k[:, :, None])
        if not kind.endswith("nobias"):
            sd[prefix + ".bias"] = np.ascontiguousarray(np.asarray(params[name]["bias"], np.float32))
    return sd


def embedder_config(params: Mapping[str, Any]) -> dict[str, int]:
    """{'output_dim': D, 'input_dim': C_in} read from the params' shapes."""
    c_in, d = np.shape(params["fc2"]["kernel"])
    return {"output_dim": int(d), "input_dim": int(c_in)}


def load_state_dict(path: str | os.PathLike, *, trusted: bool = False) -> dict[str, Any]:
    """A torch state dict file (``learned_embeds.bin`` or the thesis wrapper's ``model_<ts>_<epoch>``).
    ``trusted``: allow full unpickling (:func:`mtok_jax.pt_checkpoint.load`)."""
    return pt_checkpoint.load(path, trusted=trusted)


def convert_state_dict(state_dict: Mapping[str, Any], out_dir: str | os.PathLike) -> dict[str, int]:
    """Embedder state dict (or a wrapper's, see :func:`params_from_torch`) → params_io folder; returns its config."""
    params = params_from_torch(state_dict)
    config = embedder_config(params)
    save_params(out_dir, params, config)
    return config


def convert_checkpoint(learned_embeds_bin: str | os.PathLike, out_dir: str | os.PathLike, *,
                       trusted: bool = False) -> dict[str, int]:
    """Reference ``learned_embeds.bin`` or wrapper state dict file → params_io folder; returns its config."""
    return convert_state_dict(load_state_dict(learned_embeds_bin, trusted=trusted), out_dir)


def load_embedder(directory: str | os.PathLike, unary_dropout_at_inference: bool = True,
                  dtype=jnp.float32) -> tuple[AudioTokenEmbedder, dict[str, Any]]:
    """params_io folder (from :func:`convert_checkpoint`) → (module, params)."""
    params, config = load_params(directory)
    module = AudioTokenEmbedder(int(config["output_dim"]), unary_dropout_at_inference, dtype)
    return module, jax.tree_util.tree_map(jnp.asarray, params)
