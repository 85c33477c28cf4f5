"""The demo's metric models in the real on-disk formats (no pretrained weights exist here): tiny CLIP and
Wav2CLIP fitted contrastively on demo pairs, a random Inception.

``write_demo_metric_models(root)`` writes
  root/clip/       transformers CLIP folder: tiny ViT (224 px, patch 32) + text tower, Flax msgpack,
                   ``preprocessor_config.json`` for ``CLIPImageProcessor`` (the real 224 px pipeline)
  root/inception/  full-size FID Inception-V3, random init, in the converted params_io format
  root/wav2clip/   tiny Wav2CLIP (:func:`write_tiny_wav2clip`)
"""

from __future__ import annotations

import json
import os
import shutil

import mtok_jax  # noqa: F401  (first: USE_TF=0)

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util
from PIL import Image
from transformers import CLIPConfig, CLIPImageProcessor, FlaxCLIPModel

from metrics import clip_image, inception, wav2clip
from mtok_jax import params_io
from mtok_jax.demo.data import demo_audio, demo_image
from mtok_jax.demo.models import demo_labels


def tiny_clip_config(image_size: int = 224, patch_size: int = 32, hidden: int = 32, projection_dim: int = 32):
    """A small ``CLIPConfig`` (2 layers, 4 heads per tower) with the real preprocessing size."""
    text = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, vocab_size=1000)
    vision = dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                  image_size=image_size, patch_size=patch_size)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def write_tiny_clip(directory: str | os.PathLike, seed: int = 0, image_size: int = 224) -> str:
    """Random tiny ``FlaxCLIPModel`` + ``CLIPImageProcessor`` config saved with ``save_pretrained``.

    Weights are numpy randoms on the traced parameter shapes (no init compile): kernels and embeddings
    ~ N(0, 0.02²), LayerNorm scales 1 + N(0, 0.02²), biases N(0, 0.02²), logit_scale log(1/0.07).
    """
    config = tiny_clip_config(image_size=image_size)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, sd in traverse_util.flatten_dict(clip_image.clip_param_shapes(config)).items():
        v = rng.standard_normal(sd.shape) * 0.02
        if path[-1] == "scale":
            v = v + 1.0
        elif path[-1] == "logit_scale":
            v = np.full(sd.shape, np.log(1 / 0.07))
        flat[path] = v.astype(np.float32)
    params = jax.tree_util.tree_map(np.asarray, traverse_util.unflatten_dict(flat))
    FlaxCLIPModel(config, _do_init=False).save_pretrained(directory, params=params)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(directory)
    return os.fspath(directory)


FIT_STEPS = 80  # the InfoNCE loss plateaus by ~70 steps (2.94 → 0.92)
FIT_PER_LABEL = 6  # demo clips and images per label in the fit pool
FIT_LR = 1e-3
FIT_TEMPERATURE = 0.1
FIT_CLIP_SECONDS = 4.0  # configs/demo.py data.clip_seconds


def demo_pairs(per_label: int, seed: int, side: int = 32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Synthetic demo data drawn as the dataset builder stores it → (labels int [L·per_label], audio float32
    [L·per_label, 4 s · 16 kHz], images uint8 [L·per_label, side, side, 3]); audio and image i share a label."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(len(demo_labels())), per_label)
    audio = np.stack([demo_audio(int(l), rng, FIT_CLIP_SECONDS) for l in labels])
    images = np.stack([np.asarray(Image.fromarray(demo_image(int(l), rng)).resize((side, side),
                                                                                    Image.Resampling.BICUBIC))
                       for l in labels])
    return labels, audio, images


def fit_metric_models(clip, w2c, *, steps: int = FIT_STEPS, per_label: int = FIT_PER_LABEL, lr: float = FIT_LR,
                      temperature: float = FIT_TEMPERATURE, seed: int = 0):
    """Contrastive fit (CLIP's symmetric InfoNCE, fixed temperature) of the tiny CLIP image tower and the
    tiny Wav2CLIP on demo (audio, image) pairs: every step one clip and one image per label (no
    same-label negatives), Adam. BatchNorm stays in eval mode (its running statistics are kept).
    clip: metrics.clip_image.ClipImageModel; w2c: (model, {'params', 'batch_stats'}, config) of
    metrics.wav2clip.load_wav2clip → (clip params, wav2clip variables, [(step, loss)])."""
    model, variables, config = w2c
    labels, audio, images = demo_pairs(per_label, seed)
    pixels = np.stack([clip_image.resize_and_crop(im, clip.pp) for im in images])  # uint8 [M, 224, 224, 3]
    spec = wav2clip.normalized_log_spectrogram(
        wav2clip.power_spectrogram(jnp.asarray(audio), int(config["n_fft"]), int(config["hop_length"])), 1)
    n_labels = int(labels.max()) + 1
    opt = optax.adam(lr)
    params = {"clip": clip.params, "w2c": variables["params"]}

    def loss_fn(p, px, sp):
        img = clip.module.apply({"params": p["clip"]}, clip_image.normalize(px, clip.pp))
        aud = model.apply({"params": p["w2c"], "batch_stats": variables["batch_stats"]}, sp)
        img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
        aud = aud / jnp.linalg.norm(aud, axis=-1, keepdims=True)
        logits = aud @ img.T / temperature
        target = jnp.arange(logits.shape[0])
        return 0.5 * (optax.softmax_cross_entropy_with_integer_labels(logits, target).mean()
                      + optax.softmax_cross_entropy_with_integer_labels(logits.T, target).mean())

    @jax.jit
    def step(p, state, px, sp):
        loss, grads = jax.value_and_grad(loss_fn)(p, px, sp)
        updates, state = opt.update(grads, state, p)
        return optax.apply_updates(p, updates), state, loss

    rng, state, history = np.random.default_rng(seed + 1), opt.init(params), []
    by_label = [np.flatnonzero(labels == l) for l in range(n_labels)]
    for i in range(steps):
        a = np.array([rng.choice(ix) for ix in by_label])
        b = np.array([rng.choice(ix) for ix in by_label])
        params, state, loss = step(params, state, jnp.asarray(pixels[b]), spec[a])
        history.append((i, float(loss)))
    return params["clip"], {"params": params["w2c"], "batch_stats": variables["batch_stats"]}, history


def _fit_and_save(paths: dict[str, str], seed: int) -> list[tuple[int, float]]:
    """Fit the written tiny CLIP / Wav2CLIP (``fit_metric_models``) and save them back in place."""
    clip, w2c = clip_image.load_clip_image(paths["clip"]), wav2clip.load_wav2clip(paths["wav2clip"])
    clip_params, w2c_vars, history = fit_metric_models(clip, w2c, seed=seed)
    model, full = FlaxCLIPModel.from_pretrained(paths["clip"], _do_init=False, local_files_only=True)
    full = {**full, **jax.device_get(clip_params)}
    model.save_pretrained(paths["clip"], params=full)
    params_io.save_params(paths["wav2clip"], jax.device_get(w2c_vars), w2c[2])
    return history


def write_demo_metric_models(root: str | os.PathLike = "demo_assets/metrics", seed: int = 0,
                             fit: bool = True) -> dict[str, str]:
    """Write the three metric models under ``root`` unless already there → {'clip', 'inception', 'wav2clip':
    path}. With ``fit`` the tiny CLIP image tower and Wav2CLIP are then fitted contrastively on demo pairs
    (``fit_metric_models``, ≈1 min on 2 CPU cores), so AIS / IIS / GIILS can tell label-following images
    from label-blind ones (random towers give ≈ 50 for both); Inception stays random (FID is not
    meaningful in the demo). Built in ``root.tmp`` and renamed into place (an interrupted run leaves
    nothing half-written)."""
    root = os.fspath(root)
    done = os.path.join(root, "fitted.json" if fit else "random.json")
    paths = {name: os.path.join(root, name) for name in ("clip", "inception", "wav2clip")}
    if os.path.isfile(done):
        return paths
    tmp = root + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp_paths = {name: os.path.join(tmp, name) for name in paths}
    write_tiny_clip(tmp_paths["clip"], seed=seed)
    inception.save_random_inception(tmp_paths["inception"], seed=seed)
    write_tiny_wav2clip(tmp_paths["wav2clip"], seed=seed)
    history = _fit_and_save(tmp_paths, seed) if fit else []
    with open(os.path.join(tmp, os.path.basename(done)), "w") as f:
        json.dump({"seed": seed, "fit_steps": len(history), "loss": [h[1] for h in history[::10]]}, f)
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    return paths


def write_tiny_wav2clip(directory: str | os.PathLike, seed: int = 0, *, width: int = 8,
                        embed_dim: int = 32) -> str:
    """Write a random Wav2CLIP (same architecture, ResNet stem ``width``, MLP 8·width → embed_dim → embed_dim)
    as a params_io folder that :func:`metrics.wav2clip.load_wav2clip` reads. ``embed_dim`` must equal the
    CLIP image-feature size it is compared with: 32 = the demo's tiny CLIP
    (:func:`tiny_clip_config` projection_dim), 512 for ViT-B/32. BatchNorm statistics are random
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
