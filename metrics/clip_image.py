"""CLIP ViT image features (``get_image_features``; 512-d for ViT-B/32) with CLIP preprocessing.

Weights come from a local Hugging Face CLIP folder (``config.json`` + ``flax_model.msgpack``, or the
PyTorch-format ``model.safetensors``, read without torch, or ``pytorch_model.bin`` with torch) through
transformers 4.57's Flax CLIP: only the vision tower (``FlaxCLIPVisionTransformer``) and
``visual_projection`` are kept and applied, exactly as ``FlaxCLIPModel.get_image_features`` does.

Preprocessing is the folder's ``CLIPImageProcessor`` (``preprocessor_config.json``; without one,
OpenAI CLIP's at the model's image size), split in two: its resize and centre crop run on the host on
the uint8 image (PIL's antialiased fixed-point resampler rounds to uint8 after each pass, which no
float resize reproduces); its rescale and mean/std normalisation run jitted on the device together
with the model. The result equals the processor's own output to float32 rounding.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

import mtok_jax  # noqa: F401  (USE_TF=0 before transformers)

from transformers import CLIPConfig, CLIPImageProcessor, FlaxCLIPModel
from transformers.models.clip.modeling_flax_clip import FlaxCLIPVisionTransformer

from mtok_jax.models import hub

def default_processor(image_size: int = 224) -> CLIPImageProcessor:
    """The processor of a CLIP folder without ``preprocessor_config.json``: OpenAI CLIP's (short side →
    ``image_size`` bicubic, centre crop ``image_size``², CLIP mean/std)."""
    return CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size})


def resize_and_crop(image: np.ndarray, processor: CLIPImageProcessor) -> np.ndarray:
    """Host part: uint8 [H, W, 3] → the processor's resize and centre crop (PIL, uint8 throughout) →
    uint8 [ch, cw, 3]. Every processor option is honoured (``size`` as shortest edge or height/width,
    ``resample``, ``do_resize``, ``do_center_crop``); rescale and normalisation are left to :func:`normalize`."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    out = processor.preprocess([image], do_rescale=False, do_normalize=False, return_tensors="np",
                               data_format="channels_last", input_data_format="channels_last")["pixel_values"][0]
    return out.astype(np.uint8)


def normalize(pixels: jax.Array, processor: CLIPImageProcessor) -> jax.Array:
    """Device part: uint8 [B, H, W, 3] → float32 (x·rescale_factor − mean)/std as the processor says,
    NHWC (jittable; the processor's values are constants of the trace)."""
    x = pixels.astype(jnp.float32)
    if processor.do_rescale:
        x = x * jnp.float32(processor.rescale_factor)
    if processor.do_normalize:
        x = (x - jnp.asarray(processor.image_mean, jnp.float32)) / jnp.asarray(processor.image_std, jnp.float32)
    return x


def pixel_values(images: Sequence[np.ndarray] | np.ndarray, processor: CLIPImageProcessor) -> np.ndarray:
    """Full preprocessing, NHWC float32: what ``CLIPImageProcessor`` returns, transposed to NHWC."""
    cropped = np.stack([resize_and_crop(im, processor) for im in images])
    return np.asarray(jax.jit(normalize, static_argnums=1)(cropped, _Hashable(processor)))


class _Hashable:
    """A processor as a static jit argument (hashed by its settings)."""

    def __init__(self, processor: CLIPImageProcessor):
        self.processor, self._key = processor, processor.to_json_string()

    def __getattr__(self, name):
        return getattr(self.processor, name)

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, _Hashable) and self._key == other._key


class ClipImageFeatures(nn.Module):
    """transformers' CLIP vision tower + ``visual_projection``: pixels NHWC → [B, projection_dim]."""

    vision_config: Any  # transformers CLIPVisionConfig
    projection_dim: int
    dtype: Any = jnp.float32

    def setup(self):
        self.vision_model = FlaxCLIPVisionTransformer(self.vision_config, dtype=self.dtype)
        self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, pixel_values):
        pooled = self.vision_model(pixel_values=pixel_values, deterministic=True)[1]
        return self.visual_projection(pooled)


class ClipImageModel:
    """Loaded CLIP image embedder: ``.params`` (vision_model + visual_projection), ``.pp`` (the folder's
    ``CLIPImageProcessor``), ``.dim``."""

    def __init__(self, clip_config, params: dict[str, Any], pp: CLIPImageProcessor, dtype=jnp.float32):
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
    model = FlaxCLIPModel(clip_config, _do_init=False)
    return jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))


def load_clip_image(path: str | os.PathLike, dtype=jnp.float32) -> ClipImageModel:
    """Local HF CLIP folder (CLIPModel weights: flax msgpack, or pt-format safetensors/bin) → model.
    Never a hub id: a path that is not a folder raises FileNotFoundError (nothing is downloaded)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"not found: {path} (a local CLIP folder, e.g. a copy of "
                                "openai/clip-vit-base-patch32; metric models are never downloaded)")
    config = CLIPConfig.from_pretrained(path, local_files_only=True)
    if os.path.isfile(os.path.join(path, "flax_model.msgpack")):
        _, params = FlaxCLIPModel.from_pretrained(path, _do_init=False, local_files_only=True)
    elif (state := hub.pt_state_dict(path)) is not None:
        params = hub.flax_params_from_pt(state, clip_param_shapes(config), path, base_model_prefix="clip")
    else:
        raise FileNotFoundError(f"{path}: no flax_model.msgpack, {hub.PT_SAFETENSORS} or {hub.PT_BIN}")
    if os.path.isfile(os.path.join(path, "preprocessor_config.json")):
        pp = CLIPImageProcessor.from_pretrained(path, local_files_only=True)
    else:
        pp = default_processor(config.vision_config.image_size)
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
    "default_processor", "ClipImageFeatures", "ClipImageModel", "resize_and_crop", "normalize",
    "pixel_values", "clip_param_shapes", "load_clip_image", "embed_images",
]
