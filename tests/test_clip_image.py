"""CLIP image features: preprocessing vs CLIPImageProcessor, features vs transformers Flax / PyTorch CLIP."""

import numpy as np
import pytest

from conftest import torch_or_skip
from metrics import clip_image as ci
from metrics.demo_models import tiny_clip_config, write_tiny_clip

SIZES = [(224, 224), (256, 320), (375, 500), (60, 100), (300, 37), (225, 224), (32, 32)]


def _images(rng, sizes):
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.fixture(scope="module")
def processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor()  # OpenAI CLIP defaults (224, bicubic, CLIP mean/std)


@pytest.fixture(scope="module")
def flax_clip_dir(tmp_path_factory):
    return write_tiny_clip(tmp_path_factory.mktemp("clip_flax"), seed=3)


def _processor_pixels(processor, images):
    out = processor(images=list(images), return_tensors="np")["pixel_values"]  # [B, 3, H, W]
    return out.transpose(0, 2, 3, 1)


def test_default_processor_is_openai_clip(processor):
    """A CLIP folder without preprocessor_config.json gets the processor's defaults (OpenAI CLIP)."""
    assert ci.default_processor().to_dict() == processor.to_dict()
    assert ci.default_processor(64).size == {"shortest_edge": 64}


def test_preprocess_matches_clip_image_processor(processor):
    rng = np.random.default_rng(0)
    for im in _images(rng, SIZES):
        ours = ci.pixel_values([im], processor)
        ref = _processor_pixels(processor, [im])
        assert ours.shape == ref.shape == (1, 224, 224, 3)
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0, err_msg=str(im.shape))


def test_preprocess_other_sizes_match_processor():
    from transformers import CLIPImageProcessor

    rng = np.random.default_rng(1)
    for proc in (CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 32},
                                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.4]),
                 CLIPImageProcessor(size={"height": 30, "width": 44}, do_center_crop=False, resample=2)):
        for im in _images(rng, [(64, 48), (41, 97), (40, 40)]):
            np.testing.assert_allclose(ci.pixel_values([im], proc), _processor_pixels(proc, [im]), atol=1e-5, rtol=0)


def test_features_match_flax_clip_get_image_features(flax_clip_dir):
    from transformers import CLIPImageProcessor, FlaxCLIPModel

    model = ci.load_clip_image(flax_clip_dir)
    rng = np.random.default_rng(2)
    images = _images(rng, [(224, 224), (100, 160), (300, 250)])
    ours = ci.embed_images(model, images, batch_size=2)  # two batches, the last one padded

    ref_model, ref_params = FlaxCLIPModel.from_pretrained(flax_clip_dir, _do_init=False)
    pix = CLIPImageProcessor.from_pretrained(flax_clip_dir)(images=images, return_tensors="np")["pixel_values"]
    ref = np.asarray(ref_model.get_image_features(pix, params=ref_params))
    assert ours.shape == ref.shape == (3, tiny_clip_config().projection_dim)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.torch
def test_features_match_pytorch_clip_from_safetensors(tmp_path):
    torch = torch_or_skip()
    from transformers import CLIPImageProcessor, CLIPModel

    torch.manual_seed(0)
    ref_model = CLIPModel(tiny_clip_config()).eval()
    ref_model.save_pretrained(tmp_path, safe_serialization=True)  # model.safetensors, PyTorch layout
    proc = CLIPImageProcessor()
    proc.save_pretrained(tmp_path)

    model = ci.load_clip_image(tmp_path)
    images = _images(np.random.default_rng(4), [(180, 240), (180, 240)])
    ours = ci.embed_images(model, np.stack(images))
    with torch.no_grad():
        ref = ref_model.get_image_features(**proc(images=images, return_tensors="pt")).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
