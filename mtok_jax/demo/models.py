"""Tiny random demo models written in the formats of the real weights (DESIGN §2.5, issue 4 item 3).

``write_demo_models(root)`` creates, once:
  root/sd/      a Stable Diffusion folder like the SD v1.4 ``flax`` revision: model_index.json,
                text_encoder/ (FlaxCLIPTextModel msgpack), tokenizer/ (CLIP BPE files covering the demo
                prompts and labels), unet/ + vae/ (diffusers Flax msgpack), scheduler/ (SD v1.4 PNDM config)
  root/beats/   a converted-BEATs params_io folder (tiny iter3-style cfg)
Everything is loaded back through the loaders used for real weights (``diffusion.load_unet`` …).

Sizes: CLIP text hidden D = 32 (2 layers, 4 heads, 77 positions); UNet block_out_channels (32, 64) with
32-group norms, cross-attention D, latents 4×16×16; VAE with one downsample (32 px images ↔ 16 px latents);
BEATs embed 32, 4 layers, of which ``DEMO_BEATS_LAYERS`` feed the embedder.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax
import numpy as np
from flax import traverse_util

DEMO_TEXT_HIDDEN = 32
DEMO_IMAGE_SIZE = 32
DEMO_BEATS_CFG: dict[str, Any] = dict(
    encoder_layers=4, encoder_embed_dim=32, encoder_ffn_embed_dim=64, encoder_attention_heads=4,
    embed_dim=32, input_patch_size=16, conv_bias=False, activation_fn="gelu",
    layer_norm_first=False, deep_norm=True, layer_wise_gradient_decay_ratio=0.6,
    conv_pos=16, conv_pos_groups=16,
    relative_position_embedding=True, num_buckets=32, max_distance=100, gru_rel_pos=True,
    dropout=0.0, attention_dropout=0.0, activation_dropout=0.0, dropout_input=0.0, encoder_layerdrop=0.0,
    finetuned_model=False, predictor_dropout=0.0, predictor_class=527,
)
DEMO_BEATS_LAYERS = (1, 2, 3)  # 0-based blocks concatenated for the embedder (real: (3, 7, 11) of 12)

DEMO_TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=DEMO_TEXT_HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=DEMO_TEXT_HIDDEN,
    attention_dropout=0.0, dropout=0.0, initializer_range=0.02, initializer_factor=1.0,
)
DEMO_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=DEMO_IMAGE_SIZE // 2, in_channels=4, out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=8,
    cross_attention_dim=DEMO_TEXT_HIDDEN, flip_sin_to_cos=True, freq_shift=0,
)
DEMO_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
    latent_channels=4, norm_num_groups=32, sample_size=DEMO_IMAGE_SIZE, scaling_factor=0.18215,
)
DEMO_MODEL_INDEX: dict[str, Any] = {
    "_class_name": "FlaxStableDiffusionPipeline", "_diffusers_version": "0.39.0",
    "feature_extractor": [None, None], "safety_checker": [None, None],
    "scheduler": ["diffusers", "FlaxPNDMScheduler"], "text_encoder": ["transformers", "FlaxCLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "FlaxUNet2DConditionModel"],
    "vae": ["diffusers", "FlaxAutoencoderKL"],
}
DEMO_PROMPTS = ("an art image of <*>", "an art image of <*>, 4k, high resolution")


def random_params(shapes: Mapping[str, Any], seed: int) -> dict[str, Any]:
    """Fill a ``ShapeDtypeStruct`` tree with float32 randoms at the scale of the usual initialisers.

    kernel → N(0, 1/fan_in) (LeCun normal, fan_in = all but the last axis); scale → 1; bias → 0;
    embedding / other → N(0, 0.02²). Fast (no XLA init compile), deterministic in ``seed``.
    """
    rs = np.random.RandomState(seed)
    out = {}
    for path, s in sorted(traverse_util.flatten_dict(dict(shapes)).items()):
        name, shape = path[-1], tuple(s.shape)
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1])) or 1
            v = rs.normal(0.0, fan_in ** -0.5, shape)
        elif name == "scale":
            v = np.ones(shape)
        elif name == "bias":
            v = np.zeros(shape)
        else:
            v = rs.normal(0.0, 0.02, shape)
        out[path] = v.astype(np.float32)
    return traverse_util.unflatten_dict(out)


def demo_labels() -> list[str]:
    """The 18 label names of the dataset (from the data package)."""
    from mtok_jax.data.sources import DEFAULT_LABELS

    return list(DEFAULT_LABELS)


# ----------------------------------------------------------------------------------- the parts
def _write_tokenizer(directory: str) -> int:
    from mtok_jax.demo.tokenizer import write_clip_tokenizer

    return write_clip_tokenizer(directory, [*DEMO_PROMPTS, *demo_labels()])


def _write_text_encoder(directory: str, tokenizer_dir: str, seed: int) -> None:
    from transformers import CLIPTextConfig, CLIPTokenizer, FlaxCLIPTextModel

    tok = CLIPTokenizer.from_pretrained(tokenizer_dir)
    config = CLIPTextConfig(**DEMO_TEXT_CONFIG, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = FlaxCLIPTextModel(config, _do_init=False)
    shapes = jax.eval_shape(lambda r: model.init_weights(r, (1, 77)), jax.random.PRNGKey(0))
    params = random_params(shapes, seed)
    emb = params["text_model"]["embeddings"]
    emb["position_embedding"]["embedding"] *= 0.5  # CLIP: positions N(0, 0.01²), tokens N(0, 0.02²)
    model.save_pretrained(directory, params=params)


def _write_diffusers(directory: str, module, seed: int) -> None:
    from mtok_jax.models.diffusion import param_shapes

    module.save_pretrained(directory, params=random_params(param_shapes(module), seed))


def _write_scheduler(directory: str) -> None:
    from mtok_jax.models.diffusion import SD14_SCHEDULER_CONFIG

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "scheduler_config.json"), "w") as f:
        json.dump({**SD14_SCHEDULER_CONFIG, "_diffusers_version": "0.39.0"}, f, indent=2)


def write_demo_sd(directory: str, seed: int = 0) -> None:
    """The tiny Stable Diffusion folder (``directory`` must not exist)."""
    from mtok_jax.models import diffusion  # first: it guards the diffusers import

    os.makedirs(directory)
    with open(os.path.join(directory, "model_index.json"), "w") as f:
        json.dump(DEMO_MODEL_INDEX, f, indent=2)
    _write_tokenizer(os.path.join(directory, "tokenizer"))
    _write_text_encoder(os.path.join(directory, "text_encoder"), os.path.join(directory, "tokenizer"), seed + 1)
    _write_diffusers(os.path.join(directory, "unet"), diffusion.unet_from_config(DEMO_UNET_CONFIG), seed + 2)
    _write_diffusers(os.path.join(directory, "vae"), diffusion.vae_from_config(DEMO_VAE_CONFIG), seed + 3)
    _write_scheduler(os.path.join(directory, "scheduler"))


def write_demo_beats(directory: str, seed: int = 0) -> None:
    """The tiny BEATs params_io folder (its modules' own initialisers)."""
    from mtok_jax.models import beats

    beats.save_beats(directory, DEMO_BEATS_CFG, beats.init_params(DEMO_BEATS_CFG, jax.random.PRNGKey(seed)))


def _complete(path: str, files: tuple[str, ...]) -> bool:
    return all(os.path.isfile(os.path.join(path, f)) for f in files)


_SD_FILES = ("model_index.json", "tokenizer/vocab.json", "text_encoder/flax_model.msgpack",
             "unet/diffusion_flax_model.msgpack", "vae/diffusion_flax_model.msgpack",
             "scheduler/scheduler_config.json")
_BEATS_FILES = ("params.safetensors", "config.json")


def write_demo_models(root: str | os.PathLike = "demo_assets", seed: int = 0) -> dict[str, str]:
    """Write ``root/sd`` and ``root/beats`` unless already complete → ``{'sd': path, 'beats': path}``.

    Each part is built in a temporary sibling folder and renamed into place, so an interrupted run
    leaves no half-written part behind.
    """
    root = os.fspath(root)
    paths = {"sd": os.path.join(root, "sd"), "beats": os.path.join(root, "beats")}
    writers = {"sd": (write_demo_sd, _SD_FILES), "beats": (write_demo_beats, _BEATS_FILES)}
    for part, (writer, files) in writers.items():
        if _complete(paths[part], files):
            continue
        tmp = paths[part] + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(paths[part], ignore_errors=True)
        os.makedirs(root, exist_ok=True)
        writer(tmp, seed)
        os.replace(tmp, paths[part])
    return paths
