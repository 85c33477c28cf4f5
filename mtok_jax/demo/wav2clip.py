"""Tiny random Wav2CLIP audio encoder in the converted on-disk format (``ROOT/metrics/wav2clip/``)."""

from __future__ import annotations

import os

import jax
import numpy as np

from metrics import wav2clip
from mtok_jax import params_io


def write_tiny_wav2clip(directory: str | os.PathLike, seed: int = 0, *, width: int = 8,
                        embed_dim: int = 32) -> str:
    """Write a random Wav2CLIP (same architecture, ResNet stem ``width``, MLP 8·width → embed_dim → embed_dim)
    as a params_io folder that :func:`metrics.wav2clip.load_wav2clip` reads. ``embed_dim`` must equal the
    CLIP image-feature size it is compared with: 32 = the demo's tiny CLIP
    (``mtok_jax.demo.metric_models.tiny_clip_config`` projection_dim), 512 for ViT-B/32. BatchNorm statistics are random
    (mean N(0, 0.1²), var U(0.5, 1.5)) so that eval-mode BN is not the identity."""
    config = {**wav2clip.DEFAULT_CONFIG, "width": int(width), "mlp_units": [8 * int(width), int(embed_dim), int(embed_dim)]}
    model = wav2clip.model_from_config(config)
    variables = jax.device_get(wav2clip.init_variables(model, jax.random.key(seed)))
    rng = np.random.default_rng(seed)
    stats = params_io.flatten(variables["batch_stats"])
    for k, v in stats.items():
        stats[k] = (rng.normal(0, 0.1, v.shape) if k.endswith("mean") else rng.uniform(0.5, 1.5, v.shape)).astype(np.float32)
    variables = {"params": variables["params"], "batch_stats": params_io.unflatten(stats)}
    params_io.save_params(directory, variables, config)
    return str(directory)
