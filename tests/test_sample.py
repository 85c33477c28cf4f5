"""mtok_jax.sample: determinism per seed, batch/device independence, and the files it writes."""

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from mtok_jax import config_utils, sample, sharding
from mtok_jax.audio.io import load_audio
from mtok_jax.data import sources


@pytest.fixture(scope="module")
def pipe(demo_models):
    """The demo config on the tiny demo models (shared session-wide folder), untrained, 8-device mesh."""
    paths = demo_models
    config = config_utils.load_config("configs/demo.py", [f"model.sd_path={paths['sd']}",
                                                          f"model.beats_path={paths['beats']}"])
    return sample.load_pipeline(config, None, checkpoint=None, max_batch=8, labels=sources.DEFAULT_LABELS)


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
                              _uncond={}, _plain_states=None, _compiled={})
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


def test_prompt_negative_prompt_and_start_options(pipe, tmp_path):
    """sample_files' prompt / negative_prompt / start reach the images and samples.jsonl."""
    import soundfile as sf

    from mtok_jax.audio.io import load_audio

    path = tmp_path / "long.flac"
    sf.write(path, np.random.RandomState(1).uniform(-0.5, 0.5, 16000 * 7).astype(np.float32), 16000)
    opts = dict(prompt="a watercolor of <*>", negative_prompt="grey", start=2.5)
    records, _ = sample.sample_files(pipe, [str(path)], tmp_path / "out", seed=5, **opts, **SETTINGS)
    assert all({k: r[k] for k in opts} == opts for r in records)
    window = load_audio(path, 16000, 4.0, start_seconds=2.5)
    np.testing.assert_array_equal(window, load_audio(path, 16000, 7.0)[40000:104000])
    want = pipe.generate(window[None], [5], prompt="a watercolor of <*>", negative_prompt="grey", **SETTINGS)[0]
    for r in records:
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / r["image"])), want[r["index"]])
    plain = pipe.generate(window[None], [5], **SETTINGS)[0]
    other_start = pipe.generate(load_audio(path, 16000, 4.0)[None], [5], prompt="a watercolor of <*>",
                                negative_prompt="grey", **SETTINGS)[0]
    no_negative = pipe.generate(window[None], [5], prompt="a watercolor of <*>", **SETTINGS)[0]
    for other in (plain, other_start, no_negative):  # every option changes the images
        assert (other != want).mean() > 0.3
    with pytest.raises(Exception, match="exactly once"):
        sample.sample_files(pipe, [str(path)], tmp_path / "bad", seed=5, prompt="no token", **SETTINGS)


def test_progress_reports_each_step_once_and_changes_nothing(pipe, waves):
    """progress(k, n) sees every loop step of every jit call once, in order; the images equal those of
    the same jitted core without the step callback."""
    import functools

    import jax
    import jax.numpy as jnp

    from mtok_jax import sharding
    from mtok_jax.models import diffusion

    seen = []
    imgs = pipe.generate(waves, [0, 1], progress=lambda k, n: seen.append((k, n)), **dict(SETTINGS, num_images=8))
    n = 2 * (SETTINGS["steps"] + 1)  # 16 images in 2 calls of 8; PNDM runs steps + 1 iterations
    assert seen == [(k, n) for k in range(1, n + 1)]
    sched, state = diffusion.sampler_from_config(diffusion.read_scheduler_config(pipe.config.model.sd_path), "pndm")
    data = sharding.batch_sharding(pipe.mesh)  # placed as Pipeline places it: only the callback differs
    plain = jax.jit(functools.partial(sample.generate_images, pipe.system, scheduler=sched, steps=3),
                    out_shardings=data)
    ref = plain(pipe.params, pipe.negative_states(), jax.device_put(np.repeat(waves[:1], 8, 0), data),
                jax.device_put(sample.image_keys([0], 8), data), jnp.float32(7.5), state=state)
    np.testing.assert_array_equal(np.asarray(ref), imgs[0])
    # a copy with other params (validation images, trained vs untrained) reuses the compiled sampler,
    # whose step callback was bound to the original: it still reports to the copy's caller
    copied = []
    pipe.with_params(pipe.params).generate(waves, [0, 1], progress=lambda k, n: copied.append((k, n)), **SETTINGS)
    assert copied == [(k, SETTINGS["steps"] + 1) for k in range(1, SETTINGS["steps"] + 2)]


def test_sample_py_rejects_a_prompt_without_one_placeholder():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "sample.py", "--checkpoint", "none", "--audio", "sample.py",
                          "--prompt", "a painting"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == ("error: the prompt must contain <*> exactly once, where the "
                                                   "music goes (found 0): 'a painting'")


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
    assert config_utils.image_hw(config) == (320, 512)
    p = sample.load_pipeline(config, None, checkpoint=None, max_batch=8)
    assert p.generate(waves[:1], [0], num_images=1, steps=1, guidance=7.5).shape == (1, 1, 32, 32, 3)


def test_sample_py_exit_status_with_bad_audio(demo_models, waves, tmp_path):
    """sample.py on a folder with one good and one corrupt file exits 0 (the good one's image written, the
    bad one named); on a folder holding only the corrupt file it exits 2 with one line."""
    import soundfile as sf

    mixed, bad_only = tmp_path / "mixed", tmp_path / "bad_only"
    for folder in (mixed, bad_only):
        folder.mkdir()
        (folder / "bad.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEjunk" + bytes(range(256)))
    sf.write(mixed / "good.flac", waves[0], 16000)
    repo = pathlib.Path(__file__).resolve().parents[1]

    def run(folder):
        return subprocess.run(
            [sys.executable, "sample.py", "--config", "configs/demo.py", "--checkpoint", "none",
             f"--config.model.sd_path={demo_models['sd']}", f"--config.model.beats_path={demo_models['beats']}",
             "--audio", str(folder), "--out", str(folder / "out"), "--num_images", "1", "--steps", "1"],
            cwd=repo, capture_output=True, text=True, timeout=300)

    ok = run(mixed)
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert f"{mixed / 'bad.wav'}: unreadable audio" in ok.stderr
    assert [json.loads(x)["audio"] for x in (mixed / "out" / "samples.jsonl").read_text().splitlines()] == [
        str(mixed / "good.flac")]
    none = run(bad_only)
    assert none.returncode == 2, none.stderr[-3000:]
    assert none.stderr.strip().splitlines()[-1].startswith("error: no image made: all 1 audio files were skipped")
    assert "Traceback" not in none.stderr
