"""Demo metric models in the real on-disk formats (random weights; no pretrained weights exist here).

``write_demo_metric_models(root)`` writes
  root/clip/       transformers CLIP folder: tiny ViT (224 px, patch 32) + text tower, Flax msgpack,
                   ``preprocessor_config.json`` for ``CLIPImageProcessor`` (the real 224 px pipeline)
  root/inception/  full-size FID Inception-V3, random init, in the converted params_io format
  root/wav2clip/   tiny Wav2CLIP (``mtok_jax.demo.wav2clip.write_tiny_wav2clip``)
"""

from __future__ import annotations

import os

import mtok_jax  # noqa: F401


def tiny_clip_config(image_size: int = 224, patch_size: int = 32, hidden: int = 32, projection_dim: int = 32):
    """A small ``CLIPConfig`` (2 layers, 4 heads per tower) with the real preprocessing size."""
    from transformers import CLIPConfig

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
    import jax
    import numpy as np
    from flax import traverse_util
    from transformers import CLIPImageProcessor, FlaxCLIPModel

    from metrics.clip_image import clip_param_shapes

    config = tiny_clip_config(image_size=image_size)
    rng = np.random.default_rng(seed)
    flat = {}
    for path, sd in traverse_util.flatten_dict(clip_param_shapes(config)).items():
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


def write_demo_metric_models(root: str | os.PathLike = "demo_assets/metrics", seed: int = 0) -> dict[str, str]:
    """Write the three metric models under ``root``; returns {'clip', 'inception', 'wav2clip': path}."""
    from metrics.inception import save_random_inception
    from mtok_jax.demo.wav2clip import write_tiny_wav2clip

    paths = {name: os.path.join(os.fspath(root), name) for name in ("clip", "inception", "wav2clip")}
    write_tiny_clip(paths["clip"], seed=seed)
    save_random_inception(paths["inception"], seed=seed)
    write_tiny_wav2clip(paths["wav2clip"], seed=seed)
    return paths


if __name__ == "__main__":
    import sys

    print(write_demo_metric_models(*(sys.argv[1:2] or ["demo_assets/metrics"])))
