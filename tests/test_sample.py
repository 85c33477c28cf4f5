"""mtok_jax.sample: determinism per seed, batch/device independence, and the files it writes."""

import json

import numpy as np
import pytest
from PIL import Image

from mtok_jax import conditioning, config_utils, sample


@pytest.fixture(scope="module")
def pipe(demo_models):
    """The demo config on the tiny demo models (shared session-wide folder), untrained, 8-device mesh."""
    paths = demo_models
    config = config_utils.load_config("configs/demo.py", [f"model.sd_path={paths['sd']}",
                                                          f"model.beats_path={paths['beats']}"])
    return sample.load_pipeline(config, None, checkpoint=None, max_batch=8)


@pytest.fixture(scope="module")
def waves():
    return np.random.RandomState(0).uniform(-0.5, 0.5, (2, 64000)).astype(np.float32)


SETTINGS = dict(num_images=2, steps=3, guidance=7.5, scheduler="pndm")


def test_same_seed_same_images_other_seed_differs(pipe, waves):
    a = pipe.generate(waves, [0, 1], **SETTINGS)
    assert a.shape == (2, 2, 32, 32, 3) and a.dtype == np.uint8 and a.std() > 5
    b = pipe.generate(waves, [0, 1], **SETTINGS)
    np.testing.assert_array_equal(a, b)
    c = pipe.generate(waves, [7, 1], **SETTINGS)
    assert (a[0] != c[0]).mean() > 0.5  # new seed for audio 0: new images
    np.testing.assert_array_equal(a[1], c[1])  # audio 1 keeps its seed: unchanged by its batch-mate
    assert (a[0, 0] != a[0, 1]).mean() > 0.5  # the images of one audio differ from each other
    alone = pipe.generate(waves[1:], [1], **SETTINGS)  # other batch size / padding
    np.testing.assert_array_equal(alone[0], a[1])


def test_sample_files_writes_pngs_grid_and_manifest(pipe, waves, tmp_path):
    import soundfile as sf

    label = pipe.system.labels[3]
    paths = []
    for i, w in enumerate(waves):
        folder = tmp_path / "audio" / (label if i == 0 else "somewhere")
        folder.mkdir(parents=True)
        paths.append(str(folder / f"clip{i}.flac"))
        sf.write(paths[-1], w, 16000)
    found = sample.find_audio(tmp_path / "audio")
    assert sorted(found) == sorted(paths)
    out = tmp_path / "out"
    records = sample.sample_files(pipe, paths, out, seed=10, **SETTINGS)
    lines = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert lines == records and len(lines) == 4
    assert [r["label"] for r in lines] == [label, label, None, None]
    assert [(r["seed"], r["index"]) for r in lines] == [(10, 0), (10, 1), (11, 0), (11, 1)]
    assert all(r["scheduler"] == "pndm" and r["steps"] == 3 and r["guidance"] == 7.5 for r in lines)
    # the PNGs are the generated images (flac is lossless up to 16-bit quantisation of the audio)
    from mtok_jax.audio.io import load_audio

    ref = pipe.generate(np.stack([load_audio(p, 16000, 4.0) for p in paths]), [10, 11], **SETTINGS)
    for r in lines:
        b = 0 if r["audio"].endswith("clip0.flac") else 1
        np.testing.assert_array_equal(np.asarray(Image.open(out / r["image"])), ref[b, r["index"]])
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 2 * 128 and grid.size[1] >= 2 * 128


def test_reference_512x320_samples_square(demo_models, waves):
    """data.reference_512x320 trains on W×H = 512×320 images but samples square data.image_size images,
    as the reference pipeline samples at 512×512."""
    config = config_utils.load_config("configs/demo.py", [f"model.sd_path={demo_models['sd']}",
                                                          f"model.beats_path={demo_models['beats']}",
                                                          "data.reference_512x320=True"])
    assert conditioning.image_hw(config) == (320, 512)
    p = sample.load_pipeline(config, None, checkpoint=None, max_batch=8)
    assert p.generate(waves[:1], [0], num_images=1, steps=1, guidance=7.5).shape == (1, 1, 32, 32, 3)
