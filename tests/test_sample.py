"""mtok_jax.sample: determinism per seed, batch/device independence, and the files it writes."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from PIL import Image

from mtok_jax import conditioning, config_utils, sample, sharding
from mtok_jax.audio.io import load_audio


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


def test_images_do_not_depend_on_max_batch_or_device_count(pipe):
    """Byte-identical images on one device with max_batch 1 and 8 (one jitted shape: an image per
    device), and on the 8-device mesh. A batched shape changes ~1e-4 of the values by one LSB."""
    mesh = sharding.make_mesh({"data": 1, "fsdp": 1})
    one = dataclasses.replace(pipe, mesh=mesh, params=jax.device_put(pipe.params, sharding.replicated(mesh)),
                              _uncond=None, _compiled={})
    waves = np.random.RandomState(1).uniform(-0.5, 0.5, (4, 64000)).astype(np.float32)
    seeds = [3, 4, 5, 6]
    by_batch = {}
    for b in (1, 8):
        one.max_batch = b
        by_batch[b] = one.generate(waves, seeds, **SETTINGS)
    np.testing.assert_array_equal(by_batch[1], by_batch[8])
    np.testing.assert_array_equal(pipe.generate(waves, seeds, **SETTINGS), by_batch[8])


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
    records, skipped = sample.sample_files(pipe, paths, out, seed=10, **SETTINGS)
    lines = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert lines == records and len(lines) == 4
    assert skipped == [] and (out / "skipped.jsonl").read_text() == ""
    assert [r["label"] for r in lines] == [label, label, None, None]
    assert [(r["seed"], r["index"]) for r in lines] == [(10, 0), (10, 1), (11, 0), (11, 1)]
    assert all(r["scheduler"] == "pndm" and r["steps"] == 3 and r["guidance"] == 7.5 for r in lines)
    # the PNGs are the generated images (flac is lossless up to 16-bit quantisation of the audio)
    ref = pipe.generate(np.stack([load_audio(p, 16000, 4.0) for p in paths]), [10, 11], **SETTINGS)
    for r in lines:
        b = 0 if r["audio"].endswith("clip0.flac") else 1
        np.testing.assert_array_equal(np.asarray(Image.open(out / r["image"])), ref[b, r["index"]])
    grid = Image.open(out / "grid.png")
    assert grid.size[0] == 2 * 128 and grid.size[1] >= 2 * 128


def test_sample_files_skips_undecodable_audio(pipe, waves, tmp_path, caplog):
    """Two good files and a corrupt one in a folder: the good ones are generated (with the seeds they
    have in the full list), the corrupt one is logged as `path: reason` and listed in skipped.jsonl."""
    import soundfile as sf

    folder = tmp_path / "audio"
    folder.mkdir()
    sf.write(folder / "a.flac", waves[0], 16000)
    (folder / "b.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(range(256)))
    sf.write(folder / "c.flac", waves[1], 16000)
    paths = sample.find_audio(folder)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["a.flac", "b.wav", "c.flac"]
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="mtok_jax.sample"):
        records, skipped = sample.sample_files(pipe, paths, out, seed=10, **SETTINGS)
    bad = str(folder / "b.wav")
    assert [r["audio"] for r in skipped] == [bad] and skipped[0]["reason"].startswith("unreadable audio")
    assert [json.loads(l) for l in (out / "skipped.jsonl").read_text().splitlines()] == skipped
    assert f"{bad}: unreadable audio" in caplog.text
    assert [(r["audio"].rsplit("/", 1)[1], r["seed"], r["index"]) for r in records] == [
        ("a.flac", 10, 0), ("a.flac", 10, 1), ("c.flac", 12, 0), ("c.flac", 12, 1)]
    assert (out / "grid.png").exists()
    ref = pipe.generate(np.stack([load_audio(paths[i], 16000, 4.0) for i in (0, 2)]), [10, 12], **SETTINGS)
    got = np.stack([np.asarray(Image.open(out / r["image"])) for r in records]).reshape(ref.shape)
    np.testing.assert_array_equal(got, ref)

    with pytest.raises(sample.NoImages, match="no image made: all 1 audio files were skipped"):
        sample.sample_files(pipe, [bad], tmp_path / "none", seed=0, **SETTINGS)
    assert (tmp_path / "none" / "samples.jsonl").read_text() == ""
    assert len((tmp_path / "none" / "skipped.jsonl").read_text().splitlines()) == 1
    assert not (tmp_path / "none" / "grid.png").exists()


def test_reference_512x320_samples_square(demo_models, waves):
    """data.reference_512x320 trains on W×H = 512×320 images but samples square data.image_size images,
    as the reference pipeline samples at 512×512."""
    config = config_utils.load_config("configs/demo.py", [f"model.sd_path={demo_models['sd']}",
                                                          f"model.beats_path={demo_models['beats']}",
                                                          "data.reference_512x320=True"])
    assert conditioning.image_hw(config) == (320, 512)
    p = sample.load_pipeline(config, None, checkpoint=None, max_batch=8)
    assert p.generate(waves[:1], [0], num_images=1, steps=1, guidance=7.5).shape == (1, 1, 32, 32, 3)
