"""Wav2CLIP audio encoder (descriptinc/lyrebird-wav2clip, PyPI ``wav2clip==0.1.0``) in Flax.

waveform [B, N] 16 kHz → power STFT (n_fft 512, hop 353, periodic Hann, centre reflect pad, 257 bins)
→ log(· + 1e-7) → (x − mean)/(std_unbiased + 1e-9) over the whole batch → 1-channel ResNet-18 (BatchNorm
running stats) → average pool [B, 8·width] → MLP 512→512→ReLU→512 → embedding [B, 512] in CLIP image space
(no L2 normalisation). Frame mode cuts each clip into windows first and normalises all frames together.
Parameters: ``{'params': ..., 'batch_stats': ...}``; converted from the official ``Wav2CLIP.pt``
(``state_dict`` keys ``audio_encoder.*`` / ``audio_transform.*``) by :func:`convert_checkpoint`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from mtok_jax import params_io, pt_checkpoint

_HIGHEST = jax.lax.Precision.HIGHEST
_STAGES = (1, 2, 3, 4)

DEFAULT_CONFIG = {
    "width": 64,  # ResNet stem width (layers: w, 2w, 4w, 8w); encoder output 8·width
    "mlp_units": [512, 512, 512],  # MLP head: Linear(u0,u1) → ReLU → Linear(u1,u2)
    "n_fft": 512,
    "hop_length": 353,
    "sample_rate": 16000,
}


# ------------------------------------------------------------------------------------------ front end
def power_spectrogram(waveforms: jax.Array, n_fft: int = 512, hop_length: int = 353) -> jax.Array:
    """``torchaudio.transforms.Spectrogram(n_fft, hop_length)``: |STFT|² with a periodic Hann window of
    n_fft samples, centre reflect padding of n_fft//2. waveforms [B, N] → [B, n_fft//2 + 1, 1 + N//hop]
    (frequency × time, as torch)."""
    x = jnp.asarray(waveforms, jnp.float32)
    pad = n_fft // 2
    x = jnp.pad(x, ((0, 0), (pad, pad)), mode="reflect")
    n_frames = 1 + (x.shape[1] - n_fft) // hop_length
    idx = jnp.arange(n_frames)[:, None] * hop_length + jnp.arange(n_fft)[None, :]
    window = 0.5 - 0.5 * jnp.cos(2.0 * jnp.pi * jnp.arange(n_fft, dtype=jnp.float32) / n_fft)
    spec = jnp.fft.rfft(x[:, idx] * window, axis=-1)  # [B, F, bins]
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    return jnp.swapaxes(power, 1, 2)


def normalized_log_spectrogram(power: jax.Array, group_size: int | None = None, log_offset: float = 1e-7,
                               eps: float = 1e-9) -> jax.Array:
    """``s = log(power + 1e-7)``; ``(s − mean(s)) / (std(s, unbiased) + 1e-9)``.

    power [B, ...]. group_size None: statistics over the whole tensor, batch included (the package's
    behaviour). group_size g: over each run of g consecutive batch items (g = 1 → per clip, as the thesis
    embeds one file at a time; g = frames per clip in frame mode).
    """
    s = jnp.log(power + log_offset)
    b = s.shape[0]
    g = b if group_size is None else group_size
    grouped = s.reshape(b // g, -1)
    mean = jnp.mean(grouped, axis=1, keepdims=True)
    std = jnp.std(grouped, axis=1, keepdims=True, ddof=1)
    return ((grouped - mean) / (std + eps)).reshape(s.shape)


# ------------------------------------------------------------------------------------------ network
def _bn(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, momentum=0.9, epsilon=1e-5, name=name)


class BasicBlock(nn.Module):
    """ResNet BasicBlock: conv3×3(stride) → BN → ReLU → conv3×3 → BN, + shortcut (conv1×1+BN when the shape
    changes), ReLU. NHWC."""

    features: int
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        conv = functools.partial(nn.Conv, use_bias=False, precision=_HIGHEST)
        y = conv(self.features, (3, 3), strides=self.strides, padding=((1, 1), (1, 1)), name="conv1")(x)
        y = nn.relu(_bn("bn1")(y))
        y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
        y = _bn("bn2")(y)
        if self.strides != 1 or x.shape[-1] != self.features:
            x = conv(self.features, (1, 1), strides=self.strides, padding="VALID", name="downsample_conv")(x)
            x = _bn("downsample_bn")(x)
        return nn.relu(y + x)


class ResNet18(nn.Module):
    """1-channel ResNet-18 (BasicBlock ×[2, 2, 2, 2]) with global average pooling. x [B, H, W, 1] → [B, 8·width].
    Stage outputs are sown as ``intermediates/layer{1..4}``."""

    width: int = 64

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.Conv(self.width, (7, 7), strides=2, padding=((3, 3), (3, 3)), use_bias=False, precision=_HIGHEST,
                    name="conv1")(x)
        x = nn.relu(_bn("bn1")(x))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        for stage in _STAGES:
            features = self.width * 2 ** (stage - 1)
            for block in range(2):
                strides = 2 if (stage > 1 and block == 0) else 1
                x = BasicBlock(features, strides, name=f"layer{stage}_{block}")(x)
            self.sow("intermediates", f"layer{stage}", x)
        return jnp.mean(x, axis=(1, 2))


class MLPHead(nn.Module):
    """``MLPLayers(units)`` in eval mode: Linear → ReLU (→ Dropout = identity) → ... → Linear (no last ReLU)."""

    units: tuple[int, ...] = (512, 512, 512)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, u in enumerate(self.units[1:]):
            if i:
                x = nn.relu(x)
            x = nn.Dense(u, precision=_HIGHEST, name=f"dense{i}")(x)
        return x


class Wav2CLIP(nn.Module):
    """Normalised log spectrogram [B, bins, frames] → embedding [B, mlp_units[-1]].

    ``encoder_out`` (the ResNet output before the head) is sown as ``intermediates/encoder_out``."""

    width: int = 64
    mlp_units: tuple[int, ...] = (512, 512, 512)

    @nn.compact
    def __call__(self, log_spec: jax.Array) -> jax.Array:
        feats = ResNet18(self.width, name="encoder")(log_spec[..., None])
        self.sow("intermediates", "encoder_out", feats)
        return MLPHead(tuple(self.mlp_units), name="transform")(feats)


def model_from_config(config: Mapping[str, Any]) -> Wav2CLIP:
    return Wav2CLIP(width=int(config["width"]), mlp_units=tuple(int(u) for u in config["mlp_units"]))


# ------------------------------------------------------------------------------------------ embedding
def frame_waveforms(waveforms: jax.Array, frame_length: int, hop_length: int) -> jax.Array:
    """``librosa.util.frame`` along time: [B, N] → [B, n, frame_length], n = 1 + (N − frame_length)//hop,
    frame j = x[j·hop : j·hop + frame_length] (no padding; the tail is dropped)."""
    n = 1 + (waveforms.shape[1] - frame_length) // hop_length
    if n < 1:
        raise ValueError(f"clips of {waveforms.shape[1]} samples are shorter than one frame ({frame_length})")
    idx = jnp.arange(n)[:, None] * hop_length + jnp.arange(frame_length)[None, :]
    return waveforms[:, idx]


@functools.partial(jax.jit, static_argnames=("model", "n_fft", "hop_length", "normalization", "frame_length",
                                             "frame_hop"))
def _embed(model, variables, waveforms, n_fft, hop_length, normalization, frame_length, frame_hop):
    b = waveforms.shape[0]
    n = 1
    if frame_length is not None:
        frames = frame_waveforms(waveforms, frame_length, frame_hop)
        n = frames.shape[1]
        waveforms = frames.reshape(b * n, frame_length)
    power = power_spectrogram(waveforms, n_fft, hop_length)
    group = None if normalization == "batch" else n
    spec = normalized_log_spectrogram(power, group)
    emb = model.apply(variables, spec)
    return emb if frame_length is None else emb.reshape(b, n, -1)


def embed_audio(model: Wav2CLIP, params: Mapping[str, Any], waveforms, *, normalization: str = "batch",
                frame_length: int | None = None, hop_length: int | None = None,
                config: Mapping[str, Any] | None = None) -> jax.Array:
    """Wav2CLIP embeddings of 16 kHz waveforms [B, N] (float, [−1, 1]) → [B, 512] (jitted, float32).

    normalization: ``"batch"`` — spectrogram statistics over the whole batch, as ``wav2clip.embed_audio`` on a
    batch (results depend on the other clips); ``"item"`` — per clip, identical to embedding each clip alone
    (what the thesis's AIS script did). Frame mode (``frame_length`` and ``hop_length`` in samples, as
    ``wav2clip.get_model(frame_length=, hop_length=)``): returns [B, n_frames, 512] (the package returns
    [B, 512, n]); "batch" shares statistics over all frames of all clips, "item" over the frames of a clip.
    params: ``{'params', 'batch_stats'}`` as returned by :func:`load_wav2clip`; config: its n_fft/hop_length.
    """
    if normalization not in ("batch", "item"):
        raise ValueError(f"normalization must be 'batch' or 'item', got {normalization!r}")
    if (frame_length is None) != (hop_length is None):
        raise ValueError("frame mode needs both frame_length and hop_length")
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    x = jnp.asarray(waveforms, jnp.float32)
    if x.ndim == 1:
        x = x[None]
    variables = {"params": params["params"], "batch_stats": params["batch_stats"]}
    return _embed(model, variables, x, int(cfg["n_fft"]), int(cfg["hop_length"]), normalization,
                  frame_length, hop_length)


# ------------------------------------------------------------------------------------------ conversion
_IGNORED = ("spectrogram.window", "num_batches_tracked", "fc.", "fc_.")
_PREFIXES = {"audio_encoder.": "encoder", "encoder.": "encoder", "audio_transform.": "transform",
             "transform.": "transform"}


def _to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):
        v = v.detach().cpu().float().numpy() if v.is_floating_point() else v.detach().cpu().numpy()
    return np.asarray(v)


def params_from_torch(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Official Wav2CLIP weights → (``{'params', 'batch_stats'}`` float32 numpy tree, config).

    Accepts the checkpoint's ``state_dict`` (keys ``audio_encoder.<resnet key>``, ``audio_transform.sequential.
    {0,3}.*``; other modules' keys are ignored) or the ``ResNetExtractor`` module's own (``encoder.*``,
    ``transform.*``). The unused ResNet ``fc`` and the spectrogram window are dropped. Conv weights
    [out, in, kh, kw] → kernels [kh, kw, in, out]; Linear [out, in] → [in, out].
    """
    params: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    dense_index: dict[int, int] = {}
    transform_keys = sorted({int(k.split(".")[-2]) for k in state_dict
                             if k.startswith(("audio_transform.sequential.", "transform.sequential."))})
    for i, seq in enumerate(transform_keys):
        dense_index[seq] = i
    seen = set()
    for key, value in state_dict.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            continue
        rest = key[len(prefix):]
        if any(rest == ig or rest.startswith(ig) or rest.endswith(ig) for ig in _IGNORED):
            continue
        arr = _to_numpy(value).astype(np.float32)
        parts = rest.split(".")
        if _PREFIXES[prefix] == "transform":
            if parts[0] != "sequential" or len(parts) != 3:
                raise KeyError(f"unexpected Wav2CLIP head key {key!r}")
            node = params.setdefault("transform", {}).setdefault(f"dense{dense_index[int(parts[1])]}", {})
            node["kernel" if parts[2] == "weight" else "bias"] = arr.T if parts[2] == "weight" else arr
            seen.add(key)
            continue
        # encoder: conv1.*, bn1.*, layerS.B.{conv1,bn1,conv2,bn2}.*, layerS.B.downsample.{0,1}.*
        if parts[0].startswith("layer"):
            module = [f"{parts[0]}_{parts[1]}"]
            leaf = parts[2:]
            if leaf[0] == "downsample":
                leaf = ["downsample_conv" if leaf[1] == "0" else "downsample_bn"] + leaf[2:]
            module += leaf[:-1]
        else:
            module, leaf = parts[:-1], parts
        name = leaf[-1]
        is_conv = module[-1].startswith("conv") or module[-1] == "downsample_conv"
        if is_conv:
            if name != "weight":
                raise KeyError(f"unexpected Wav2CLIP conv key {key!r}")
            tree, leaf_name, arr = params, "kernel", arr.transpose(2, 3, 1, 0)
        elif name in ("weight", "bias"):
            tree, leaf_name = params, ("scale" if name == "weight" else "bias")
        elif name in ("running_mean", "running_var"):
            tree, leaf_name = stats, ("mean" if name == "running_mean" else "var")
        else:
            raise KeyError(f"unexpected Wav2CLIP encoder key {key!r}")
        node = tree.setdefault("encoder", {})
        for m in module:
            node = node.setdefault(m, {})
        node[leaf_name] = arr
        seen.add(key)
    if "encoder" not in params or "transform" not in params:
        raise KeyError("no audio_encoder.* / audio_transform.* weights found: not a Wav2CLIP checkpoint")
    width = int(params["encoder"]["conv1"]["kernel"].shape[-1])
    dense = [params["transform"][f"dense{i}"]["kernel"] for i in range(len(dense_index))]
    units = [int(dense[0].shape[0])] + [int(k.shape[1]) for k in dense]
    config = {**DEFAULT_CONFIG, "width": width, "mlp_units": units}
    _check_tree({"params": params, "batch_stats": stats}, config)
    return {"params": params, "batch_stats": stats}, config


def _check_tree(variables: Mapping[str, Any], config: Mapping[str, Any]) -> None:
    """Raise if ``variables`` lacks or adds leaves / shapes relative to the model the config describes."""
    want = jax.eval_shape(model_from_config(config).init, jax.random.key(0), jnp.zeros((1, 257, 16), jnp.float32))
    want_flat = {k: tuple(v.shape) for k, v in
                 traverse_util.flatten_dict({c: want[c] for c in ("params", "batch_stats")}, sep="/").items()}
    got_flat = {k: tuple(v.shape) for k, v in params_io.flatten(variables).items()}
    missing, extra = sorted(set(want_flat) - set(got_flat)), sorted(set(got_flat) - set(want_flat))
    wrong = sorted(k for k in set(want_flat) & set(got_flat) if want_flat[k] != got_flat[k])
    if missing or extra or wrong:
        raise ValueError(f"Wav2CLIP weights do not match the model: missing {missing[:5]}, unexpected "
                         f"{extra[:5]}, wrong shapes {wrong[:5]}")


def convert_checkpoint(pt_path: str | os.PathLike, out_dir: str | os.PathLike, *, trusted: bool = False) -> str:
    """Official ``Wav2CLIP.pt`` (a Lightning checkpoint ``{'state_dict': {...}}``, or a bare state dict) →
    params_io folder ``out_dir`` (params.safetensors + config.json). ``trusted``: allow full unpickling
    (:func:`mtok_jax.pt_checkpoint.load`; only for a file you trust, if its extra entries need it)."""
    ckpt = pt_checkpoint.load(pt_path, trusted=trusted)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, Mapping) else ckpt
    variables, config = params_from_torch(state)
    params_io.save_params(out_dir, variables, config)
    return str(out_dir)


def load_wav2clip(directory: str | os.PathLike) -> tuple[Wav2CLIP, dict[str, Any], dict[str, Any]]:
    """params_io folder → (model, ``{'params', 'batch_stats'}`` as jnp arrays, config)."""
    variables, config = params_io.load_params(directory)
    config = {**DEFAULT_CONFIG, **config}
    _check_tree(variables, config)
    variables = jax.tree_util.tree_map(jnp.asarray, variables)
    return model_from_config(config), variables, config


def init_variables(model: Wav2CLIP, rng: jax.Array) -> dict[str, Any]:
    """Random ``{'params', 'batch_stats'}`` for ``model`` (Flax default init; running stats 0 / 1)."""
    v = jax.jit(model.init)(rng, jnp.zeros((1, 257, 16), jnp.float32))
    return {"params": v["params"], "batch_stats": v["batch_stats"]}
