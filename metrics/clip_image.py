"""CLIP ViT image features (``get_image_features``; 512-d for ViT-B/32) with CLIP preprocessing.

Weights come from a local Hugging Face CLIP folder (``config.json`` + ``flax_model.msgpack``, or the
PyTorch-format ``model.safetensors``, read without torch, or ``pytorch_model.bin`` with torch) through
transformers 4.57's Flax CLIP: only the vision tower (``FlaxCLIPVisionTransformer``) and
``visual_projection`` are kept and applied, exactly as ``FlaxCLIPModel.get_image_features`` does.

Preprocessing matches ``CLIPImageProcessor`` to float32 rounding: the resize (short side → 224,
bicubic) runs on the host through PIL on the uint8 image, as the processor does — PIL's antialiased
fixed-point resampler rounds to uint8 after each pass, which no float resize reproduces — followed by
the centre crop (slicing); the rescale (1/255) and the CLIP mean/std normalisation run jitted on the
device together with the model. Sizes, mean/std and filter come from the folder's
``preprocessor_config.json`` (defaults: the processor's, i.e. OpenAI CLIP's).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from PIL import Image

import mtok_jax  # noqa: F401  (USE_TF=0 before transformers)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
    """What ``CLIPImageProcessor`` does to an RGB uint8 image, as plain values."""

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)  # (height, width)
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    resample: int = PIL_BICUBIC  # PIL filter code
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    do_normalize: bool = True

    @classmethod
    def from_processor_dict(cls, d: dict[str, Any], image_size: int = 224) -> "ClipPreprocess":
        """From a ``preprocessor_config.json`` dict (missing keys take the processor's defaults)."""
        size = d.get("size", {"shortest_edge": image_size})
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if "shortest_edge" not in size:
            raise NotImplementedError(f"only size={{'shortest_edge': n}} is supported, got {size}")
        crop = d.get("crop_size", {"height": image_size, "width": image_size})
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        return cls(
            shortest_edge=int(size["shortest_edge"]),
            crop_size=(int(crop["height"]), int(crop["width"])),
            image_mean=tuple(float(v) for v in d.get("image_mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(float(v) for v in d.get("image_std", OPENAI_CLIP_STD)),
            resample=int(d.get("resample", PIL_BICUBIC)),
            rescale_factor=float(d.get("rescale_factor", 1 / 255)),
            do_resize=bool(d.get("do_resize", True)),
            do_center_crop=bool(d.get("do_center_crop", True)),
            do_rescale=bool(d.get("do_rescale", True)),
            do_normalize=bool(d.get("do_normalize", True)),
        )


def resized_size(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(h, w) after scaling the short side to ``shortest_edge`` (long side truncated, as transformers)."""
    if width <= height:
        return int(shortest_edge * height / width), shortest_edge
    return shortest_edge, int(shortest_edge * width / height)


def resize_and_crop(image: np.ndarray, pp: ClipPreprocess) -> np.ndarray:
    """Host part: uint8 [H, W, 3] → PIL resize (short side) → centre crop → uint8 [ch, cw, 3]."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if pp.do_resize:
        h, w = resized_size(image.shape[0], image.shape[1], pp.shortest_edge)
        if (h, w) != image.shape[:2]:
            image = np.asarray(Image.fromarray(image).resize((w, h), resample=pp.resample))
    if pp.do_center_crop:
        ch, cw = pp.crop_size
        h, w = image.shape[:2]
        if ch > h or cw > w:
            raise NotImplementedError(f"crop {pp.crop_size} larger than the resized image {(h, w)}")
        top, left = (h - ch) // 2, (w - cw) // 2
        image = image[top:top + ch, left:left + cw]
    return image


def normalize(pixels: jax.Array, pp: ClipPreprocess) -> jax.Array:
    """Device part: uint8 [B, H, W, 3] → float32 (x·rescale − mean)/std, NHWC (jittable)."""
    x = pixels.astype(jnp.float32)
    if pp.do_rescale:
        x = x * jnp.float32(pp.rescale_factor)
    if pp.do_normalize:
        x = (x - jnp.asarray(pp.image_mean, jnp.float32)) / jnp.asarray(pp.image_std, jnp.float32)
    return x


def pixel_values(images: Sequence[np.ndarray] | np.ndarray, pp: ClipPreprocess) -> np.ndarray:
    """Full preprocessing, NHWC float32: what ``CLIPImageProcessor`` returns, transposed to NHWC."""
    cropped = np.stack([resize_and_crop(im, pp) for im in images])
    return np.asarray(_normalize_jit(cropped, pp))


_normalize_jit = jax.jit(normalize, static_argnums=1)


class ClipImageFeatures(nn.Module):
    """transformers' CLIP vision tower + ``visual_projection``: pixels NHWC → [B, projection_dim]."""

    vision_config: Any  # transformers CLIPVisionConfig
    projection_dim: int
    dtype: Any = jnp.float32

    def setup(self):
        from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer

        self.vision_model = FlaxCLIPVisionTransformer(self.vision_config, dtype=self.dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, pixel_values):
        pooled = self.vision_model(pixel_values=pixel_values, deterministic=True)[1]
        return self.visual_projection(pooled)


class ClipImageModel:
    """Loaded CLIP image embedder: ``.params`` (vision_model + visual_projection), ``.pp``, ``.dim``."""

    def __init__(self, clip_config, params: dict[str, Any], pp: ClipPreprocess, dtype=jnp.float32):
        self.config = clip_config
        self.pp = pp
        self.dim = int(clip_config.projection_dim)
        self.module = ClipImageFeatures(clip_config.vision_config, self.dim, dtype)
        self.params = jax.tree_util.tree_map(jnp.asarray, {k: params[k] for k in ("vision_model", "visual_projection")})
        module = self.module

        def features(params, pixels_uint8):
            return module.apply({"params": params}, normalize(pixels_uint8, pp)).astype(jnp.float32)

        self.features = jax.jit(features)  # (params, uint8 [B, ch, cw, 3]) → [B, dim]


def clip_param_shapes(clip_config) -> dict[str, Any]:
    """``FlaxCLIPModel`` parameter tree as ``jax.ShapeDtypeStruct`` (traced, nothing computed)."""
    from transformers import FlaxCLIPModel

    model = FlaxCLIPModel(clip_config, _do_init=False)
    return jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))


def _params_from_pytorch_folder(path: str, clip_config) -> dict[str, Any]:
    """PyTorch-layout ``model.safetensors`` (no torch needed) or ``pytorch_model.bin`` → Flax params.

    transformers' own PyTorch→Flax key/layout conversion, fed with traced shapes instead of a random
    init (its ``from_pretrained(from_pt=True, _do_init=False)`` path needs initialised params).
    """
    import types

    from transformers.modeling_flax_pytorch_utils import convert_pytorch_state_dict_to_flax

    safe = os.path.join(path, "model.safetensors")
    if os.path.isfile(safe):
        from safetensors.numpy import load_file

        state = load_file(safe)
    else:
        import torch

        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        state = {k: v.float().numpy() for k, v in state.items()}
    shim = types.SimpleNamespace(params=clip_param_shapes(clip_config), base_model_prefix="clip")
    return convert_pytorch_state_dict_to_flax(state, shim)


def load_clip_image(path: str | os.PathLike, dtype=jnp.float32) -> ClipImageModel:
    """Local HF CLIP folder (CLIPModel weights: flax msgpack, or pt-format safetensors/bin) → model.
    Never a hub id: a path that is not a folder raises FileNotFoundError (nothing is downloaded)."""
    from transformers import CLIPConfig, FlaxCLIPModel

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not found: {path} (a local CLIP folder, e.g. a copy of "
                                "openai/clip-vit-base-patch32; metric models are never downloaded)")
    config = CLIPConfig.from_pretrained(path, local_files_only=True)
    if os.path.isfile(os.path.join(path, "flax_model.msgpack")):
        _, params = FlaxCLIPModel.from_pretrained(path, _do_init=False, local_files_only=True)
    else:
        params = _params_from_pytorch_folder(path, config)
    image_size = config.vision_config.image_size
    pp_file = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pp_file):
        import json

        with open(pp_file) as f:
            pp = ClipPreprocess.from_processor_dict(json.load(f), image_size)
    else:
        pp = ClipPreprocess.from_processor_dict({}, image_size)
    return ClipImageModel(config, params, pp, dtype)


def embed_images(model: ClipImageModel, images: Sequence[np.ndarray] | np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 images [B, H, W, 3] (or a list of differently sized [H, W, 3]) → float32 [B, D].

    Host: PIL resize + crop per image; device: one jitted normalise + ViT + projection per fixed-size
    batch (the last one zero-padded, so one compile serves any B). Features are not L2-normalised.
    """
    n = len(images)
    if n == 0:
        return np.zeros((0, model.dim), np.float32)
    bs = max(1, min(batch_size, n))
    out = []
    for start in range(0, n, bs):
        chunk = np.stack([resize_and_crop(im, model.pp) for im in images[start:start + bs]])
        m = chunk.shape[0]
        if m < bs:
            chunk = np.concatenate([chunk, np.zeros((bs - m,) + chunk.shape[1:], np.uint8)])
        out.append(np.asarray(model.features(model.params, jnp.asarray(chunk)))[:m])
    return np.concatenate(out)


__all__ = [
    "ClipPreprocess", "ClipImageFeatures", "ClipImageModel", "resized_size", "resize_and_crop", "normalize",
    "pixel_values", "clip_param_shapes", "load_clip_image", "embed_images",
]
