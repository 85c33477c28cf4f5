"""Throughput of the metric models at full size (random weights) and time of the metric math.

  python scripts/bench_metrics.py [--image_size 512] [--clip_images 64] [--inception_images 16] ...

Prints images/s for CLIP ViT-B/32 image features (host PIL resize + jitted ViT) and FID Inception-V3
pool3, clips/s for Wav2CLIP (ResNet-18 width 64, MLP 512), and the AIS/IIS/GIILS/FID time for
``--metric_n`` (335, the thesis's test set) embeddings. Compile time is reported apart (first call).
"""

from __future__ import annotations

import argparse
import time

import mtok_jax  # noqa: F401  (environment setup first)

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util


def _random_like(shapes, rng, *, kernel_std=None):
    """numpy randoms on a ShapeDtypeStruct tree: kernels/embeddings N(0, σ²) (He for convs), norms 1, biases 0."""
    out = {}
    for path, sd in traverse_util.flatten_dict(shapes).items():
        name = path[-1]
        if name in ("scale", "var"):
            v = np.ones(sd.shape)
        elif name in ("bias", "mean"):
            v = np.zeros(sd.shape)
        else:
            fan_in = int(np.prod(sd.shape[:-1])) if len(sd.shape) > 1 else 1
            v = rng.standard_normal(sd.shape) * (kernel_std or np.sqrt(2.0 / max(fan_in, 1)))
        out[path] = v.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def _timed(fn, repeats: int = 1):
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / repeats, out


def bench_clip(args, rng):
    from transformers import CLIPConfig

    from metrics.clip_image import ClipImageFeatures, ClipImageModel, default_processor, embed_images, resize_and_crop

    config = CLIPConfig()  # defaults = ViT-B/32: 768 wide, 12 layers, patch 32, 224 px, projection 512
    module = ClipImageFeatures(config.vision_config, config.projection_dim)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))["params"]
    model = ClipImageModel(config, _random_like(shapes, rng, kernel_std=0.02), default_processor())
    n_params = sum(int(x.size) for x in jax.tree_util.tree_leaves(model.params))
    images = rng.integers(0, 256, (args.clip_images, args.image_size, args.image_size, 3), dtype=np.uint8)
    bs = args.clip_batch
    t_first, _ = _timed(lambda: embed_images(model, images[:bs], batch_size=bs))
    t_all, feats = _timed(lambda: embed_images(model, images, batch_size=bs))
    t_host, cropped = _timed(lambda: np.stack([resize_and_crop(im, model.pp) for im in images[:bs]]))
    t_dev, _ = _timed(lambda: model.features(model.params, jnp.asarray(cropped)), repeats=3)
    print(f"CLIP ViT-B/32 image features ({n_params / 1e6:.1f} M params, {args.image_size}px in, batch {bs}): "
          f"{len(images) / t_all:.1f} images/s end to end | device part {bs / t_dev:.1f} images/s, host PIL "
          f"resize+crop {bs / t_host:.1f} images/s | first batch incl. compile {t_first:.1f} s; out {feats.shape}")


def bench_inception(args, rng):
    from metrics.inception import InceptionV3Pool3, pool3_features, random_params

    model, params = InceptionV3Pool3(), jax.tree_util.tree_map(jnp.asarray, random_params(0))
    images = rng.integers(0, 256, (args.inception_images, args.image_size, args.image_size, 3), dtype=np.uint8)
    bs = args.inception_batch
    t_first, _ = _timed(lambda: pool3_features(model, params, images[:bs], batch_size=bs))
    t_all, feats = _timed(lambda: pool3_features(model, params, images, batch_size=bs))
    print(f"Inception-V3 pool3 (FID, {args.image_size}px → 299, batch {bs}): {len(images) / t_all:.2f} images/s "
          f"| first batch incl. compile {t_first:.1f} s; out {feats.shape}")


def bench_wav2clip(args, rng):
    from metrics import wav2clip

    config = dict(wav2clip.DEFAULT_CONFIG)
    model = wav2clip.model_from_config(config)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 257, 16), jnp.float32)))
    variables = jax.tree_util.tree_map(jnp.asarray, {k: _random_like(v, rng) for k, v in shapes.items()})
    n = int(args.clip_seconds * 16000)
    audio = (rng.standard_normal((args.wav2clip_clips, n)) * 0.1).astype(np.float32)
    bs = args.wav2clip_batch

    def run(a):
        outs = [np.asarray(wav2clip.embed_audio(model, variables, a[i:i + bs], config=config))
                for i in range(0, len(a), bs)]
        return np.concatenate(outs)

    t_first, _ = _timed(lambda: run(audio[:bs]))
    t_all, feats = _timed(lambda: run(audio))
    print(f"Wav2CLIP audio ({args.clip_seconds:g} s clips, batch {bs}): {len(audio) / t_all:.2f} clips/s "
          f"| first batch incl. compile {t_first:.1f} s; out {feats.shape}")


def bench_metric_math(args, rng):
    from metrics import ais, fid, giils, iis

    n = args.metric_n
    audio, gen, gt = (rng.standard_normal((n, 512)).astype(np.float32) for _ in range(3))
    labels = rng.integers(0, 10, n)
    inc_a, inc_b = rng.standard_normal((n, 2048)), rng.standard_normal((n, 2048)) + 0.1

    def all_metrics():
        return (float(ais(audio, gen).score), float(iis(gen, gt).score), len(giils(gen, labels)))

    t_first, _ = _timed(all_metrics)
    t_sim, _ = _timed(all_metrics, repeats=3)
    t_fid, value = _timed(lambda: fid(inc_a, inc_b))
    print(f"Metric math for {n} images: AIS+IIS+GIILS {t_sim * 1e3:.1f} ms (first call incl. compile "
          f"{t_first:.2f} s), FID (2048-d, float64 on host, metrics.fid default route) {t_fid:.2f} s (value {value:.1f})")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image_size", type=int, default=512, help="input image side (SD v1.4 generates 512)")
    p.add_argument("--clip_images", type=int, default=64)
    p.add_argument("--clip_batch", type=int, default=32)
    p.add_argument("--inception_images", type=int, default=16)
    p.add_argument("--inception_batch", type=int, default=8)
    p.add_argument("--wav2clip_clips", type=int, default=16)
    p.add_argument("--wav2clip_batch", type=int, default=8)
    p.add_argument("--clip_seconds", type=float, default=30.0)
    p.add_argument("--metric_n", type=int, default=335)
    p.add_argument("--only", choices=["clip", "inception", "wav2clip", "math"], action="append")
    args = p.parse_args()
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ×{jax.device_count()}")
    rng = np.random.default_rng(0)
    benches = {"clip": bench_clip, "inception": bench_inception, "wav2clip": bench_wav2clip, "math": bench_metric_math}
    for name in args.only or benches:
        benches[name](args, rng)


if __name__ == "__main__":
    main()
