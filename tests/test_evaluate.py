"""metrics.evaluate end to end in --images mode on tiny random metric models in their real formats.

Every number in report.json is recomputed independently: the embeddings from single-item model calls,
the metrics with the numpy transcriptions of tests/test_metrics_scores.py.
"""

import json
import logging

import numpy as np
import pytest
from absl import app

from metrics.evaluate import (
    GENERATED_FORMATS,
    _generated_format,
    compute_metrics,
    item_indices,
    read_items,
    render_markdown,
    save_generated,
    select_test_items,
)
from test_metrics_scores import (
    np_giils,
    np_iis_script,
    np_script_reference,
    np_paired,
    np_reference_exact,
    np_score,
)

LABELS = ["Heavy metal", "Electronic music", "Renaissance symbolism"]


@pytest.fixture(scope="module")
def images_dir(tmp_path_factory):
    import soundfile as sf
    from PIL import Image

    d = tmp_path_factory.mktemp("gen")
    for sub in ("generated", "ground_truth", "audio"):
        (d / sub).mkdir()
    rng = np.random.default_rng(0)
    rows = []
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 0]  # label 0: 4 images, 1: 3, 2: 2
    for i, lab in enumerate(labels):
        base = np.array([[200, 40, 40], [40, 200, 40], [40, 40, 200]][lab], np.float32)
        gen = np.clip(base + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
        gt = np.clip(base + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(gen).save(d / "generated" / f"{i:04d}.png")
        Image.fromarray(gt).save(d / "ground_truth" / f"{i:04d}.png")
        t = np.arange(8000) / 16000
        wav = 0.3 * np.sin(2 * np.pi * (220 * (lab + 1)) * t) + 0.05 * rng.standard_normal(8000)
        sf.write(d / "audio" / f"{i:04d}.flac", wav.astype(np.float32), 16000, subtype="PCM_16")
        rows.append({"image": f"generated/{i:04d}.png", "ground_truth": f"ground_truth/{i:04d}.png",
                     "audio": f"audio/{i:04d}.flac", "label": lab, "label_name": LABELS[lab], "seed": 100 + i})
    with open(d / "manifest.jsonl", "w") as f:
        f.write("\n".join(json.dumps(r) for r in rows) + "\n")
    return d


@pytest.fixture(scope="module")
def report(images_dir, metric_models):
    from metrics.evaluate import main

    out = images_dir / "eval"
    r = main(["--images", str(images_dir), "--out", str(out), "--per_label", "3", "--clip_seconds", "0.5",
              "--clip_path", metric_models["clip"], "--inception_path", metric_models["inception"],
              "--wav2clip_path", metric_models["wav2clip"]])
    return r, out


def test_files_written(report):
    r, out = report
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["metrics"] == r["metrics"] and on_disk["num_images"] == 9
    assert on_disk["seeds"] == list(range(100, 109))
    md = (out / "report.md").read_text()
    for needle in ("| METHOD | AIS ↑ | IIS ↑ | FID ↓ |", "50.15", "179.16", "Renaissance symbolism", "58.70",
                   "Generated images scored as: PNG files (format not recorded)"):
        assert needle in md
    from PIL import Image

    # 2 columns of ≥128-px cells with a caption band; "Renaissance symbolism" has 2 images → one row,
    # the other labels 3 → two rows of the same cell height.
    shapes = {name: np.asarray(Image.open(out / r["grids"][name])).shape for name in LABELS}
    row = shapes["Renaissance symbolism"][0]
    assert 128 < row < 192
    for name, shape in shapes.items():
        assert shape[1] == 256 and shape[0] == (row if name == "Renaissance symbolism" else 2 * row)


def test_embeddings_independent(report, images_dir, metric_models):
    """Batched/jitted embeddings == one-item calls (Wav2CLIP: each clip alone) and transformers' CLIP."""
    import soundfile as sf
    from PIL import Image
    from transformers import CLIPImageProcessor, FlaxCLIPModel

    from metrics.wav2clip import embed_audio, load_wav2clip

    _, out = report
    emb = np.load(out / "embeddings.npz")
    model, variables, config = load_wav2clip(metric_models["wav2clip"])
    for i in (0, 8):
        wav, sr = sf.read(images_dir / "audio" / f"{i:04d}.flac", dtype="float32")
        one = np.asarray(embed_audio(model, variables, wav[None], config=config))[0]
        np.testing.assert_allclose(emb["audio_wav2clip"][i], one, atol=1e-5, rtol=1e-4)
    clip = FlaxCLIPModel.from_pretrained(metric_models["clip"])
    proc = CLIPImageProcessor.from_pretrained(metric_models["clip"])
    imgs = [Image.open(images_dir / "generated" / f"{i:04d}.png") for i in range(9)]
    ref = np.asarray(clip.get_image_features(proc(images=imgs, return_tensors="np")["pixel_values"]))
    np.testing.assert_allclose(emb["generated_clip"], ref, atol=1e-4, rtol=1e-4)
    assert emb["generated_inception"].shape == (9, 2048)


def test_metrics_match_numpy(report):
    r, out = report
    m = r["metrics"]
    emb = np.load(out / "embeddings.npz")
    a, g, x = emb["audio_wav2clip"], emb["generated_clip"], emb["ground_truth_clip"]
    np.testing.assert_allclose(m["ais"]["mean"], np_paired(a, g), atol=2e-6)
    np.testing.assert_allclose(m["ais"]["score"], np_score(np_paired(a, g)), atol=2e-4)
    np.testing.assert_allclose(m["iis"]["mean"], np_paired(x, g), atol=2e-6)
    np.testing.assert_allclose(m["iis_faithful"]["mean"], np_iis_script(g, x), atol=2e-6)
    # FID wiring (the Fréchet math itself is checked against numpy/pytorch-fid in test_metrics_scores)
    from metrics import fid

    assert m["fid"] == pytest.approx(fid(emb["generated_inception"], emb["ground_truth_inception"]), rel=1e-12)
    assert m["fid"] > 0
    # GIILS: first 3 images of each label form its group (label 0 has 4: the 4th is pool-only)
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1, 0])
    groups = labels.copy()
    groups[8] = -1
    ref = np_giils(g, groups, script=False)
    got = {row["label_id"]: row for row in m["giils"]}
    assert {k: v["n"] for k, v in got.items()} == {0: 3, 1: 3, 2: 2}
    for k, v in ref.items():
        np.testing.assert_allclose(got[k]["mean"], v, atol=2e-6)
        assert got[k]["label"] == LABELS[k]
    scores = [row["score"] for row in m["giils"]]
    assert scores == sorted(scores, reverse=True)


def test_manifest_errors(tmp_path, metric_models):
    from metrics.evaluate import main, read_manifest

    with pytest.raises(FileNotFoundError):
        read_manifest(str(tmp_path))
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"image": "a.png", "label": 0}) + "\n")
    with pytest.raises(ValueError, match="audio"):
        read_manifest(str(tmp_path))
    with pytest.raises(app.UsageError, match="generation mode needs --workdir"):
        main(["--workdir", str(tmp_path)])  # generation mode without --config or WORKDIR/config.json


@pytest.mark.slow
def test_generation_mode_demo(tmp_path, metric_models, demo_models):
    """Generation mode on the demo dataset and tiny SD (untrained: --checkpoint none), 4 images, 2 steps;
    the recorded seed regenerates the same image through the sampling library."""
    from metrics.evaluate import main
    from mtok_jax import sample
    from mtok_jax.config_utils import load_config
    from mtok_jax.demo.data import build_demo_dataset

    root = tmp_path / "demo"
    data_dir = build_demo_dataset(root)
    models = demo_models
    overrides = [f"--config.model.sd_path={models['sd']}", f"--config.model.beats_path={models['beats']}",
                 f"--config.data.data_dir={data_dir}", "--config.sample.steps=2"]
    out = tmp_path / "eval"
    r = main(["--config", "configs/demo.py", "--workdir", str(tmp_path / "run"), "--checkpoint", "none",
              "--num_images", "4", "--per_label", "2", "--out", str(out), "--clip_path", metric_models["clip"],
              "--inception_path", metric_models["inception"], "--wav2clip_path", metric_models["wav2clip"],
              *overrides])
    assert r["num_images"] == 4 and (out / "report.md").exists()
    rows = [json.loads(line) for line in (out / "images" / "manifest.jsonl").read_text().splitlines()]
    assert [row["label"] for row in rows] == [0, 1, 2, 3]  # labels interleaved
    assert [row["seed"] for row in rows] == [0, 1, 2, 3] and rows[0]["steps"] == 2
    assert rows[0]["selection"] == "random" and r["audio_ids"] == [row["audio_id"] for row in rows]
    assert r["metrics"]["ais_reference"]["T"] == 18 * 2  # the demo's whole test split
    # Each pair's own audio / image is found exactly in the test-split reference sets (embedded from the
    # stored records in other batches), so the exact baselines drop it as the scripts do.
    assert r["metrics"]["ais_reference"]["paired_found"] == r["metrics"]["iis_reference"]["paired_found"] == 4
    assert "data.stereo=first" in r["wav2clip_input"]
    # --items with another metrics.seed: the same records again
    again = main(["--config", "configs/demo.py", "--workdir", str(tmp_path / "run"), "--checkpoint", "none",
                  "--items", str(out / "images" / "manifest.jsonl"), "--per_label", "2", "--out", str(tmp_path / "e2"),
                  "--clip_path", metric_models["clip"], "--inception_path", metric_models["inception"],
                  "--wav2clip_path", metric_models["wav2clip"], *overrides, "--config.metrics.seed=5"])
    assert again["audio_ids"] == r["audio_ids"] and again["metrics"]["ais"] == r["metrics"]["ais"]
    import soundfile as sf
    from PIL import Image

    config = load_config("configs/demo.py", overrides)
    pipe = sample.load_pipeline(config, None, None)
    wav, _ = sf.read(out / "images" / rows[2]["audio"], dtype="float32")
    again = pipe.generate(wav[None], [rows[2]["seed"]], num_images=1, steps=2, guidance=config.sample.guidance,
                          scheduler=config.sample.scheduler)[0, 0]
    np.testing.assert_array_equal(np.asarray(Image.open(out / "images" / rows[2]["image"])), again)


def test_generated_format_jpeg75(tmp_path):
    """metrics.generated_format='jpeg75' writes what PIL's default JPEG save (quality 75, as the thesis's
    .jpg files) writes; the manifest's record names it in the report."""
    import io

    from PIL import Image

    rgb = np.random.default_rng(0).integers(0, 256, (32, 32, 3), np.uint8)
    path = save_generated(rgb, str(tmp_path / "0000"), "jpeg75")
    assert path.endswith(".jpg")
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG")  # PIL default quality 75
    assert (tmp_path / "0000.jpg").read_bytes() == buf.getvalue()
    png = save_generated(rgb, str(tmp_path / "0001"), "png")
    np.testing.assert_array_equal(np.asarray(Image.open(png)), rgb)
    assert _generated_format([{"image": path, "generated_format": "jpeg75"}]) == GENERATED_FORMATS["jpeg75"][2]
    assert _generated_format([{"image": path}]) == "JPEG files (format not recorded)"
    with pytest.raises(ValueError, match="generated_format"):
        save_generated(rgb, str(tmp_path / "x"), "webp")


def test_reference_sets_in_metrics_and_report(report, caplog):
    """With reference-set embeddings (test split: T audios, T' images), compute_metrics adds the AIS/IIS
    variants over them and the report shows them with T."""
    r, out = report
    emb = dict(np.load(out / "embeddings.npz"))
    labels = emb.pop("labels")
    rng = np.random.default_rng(1)
    emb["reference_audio_wav2clip"] = np.concatenate([emb["audio_wav2clip"], rng.normal(size=(4, emb["audio_wav2clip"].shape[1]))]).astype(np.float32)
    emb["reference_image_clip"] = np.concatenate([rng.normal(size=(3, emb["ground_truth_clip"].shape[1])), emb["ground_truth_clip"]]).astype(np.float32)
    m = compute_metrics(emb, labels, {0: "a", 1: "b", 2: "c"}, 3)
    a, g, x = emb["audio_wav2clip"], emb["generated_clip"], emb["ground_truth_clip"]
    np.testing.assert_allclose(m["ais_reference"]["mean"], np_reference_exact(a, g, emb["reference_audio_wav2clip"]), atol=2e-6)
    np.testing.assert_allclose(m["iis_reference_faithful"]["mean"],
                               np_script_reference(x, g, emb["reference_image_clip"], skip_equal_to=g), atol=2e-6)
    assert (m["ais_reference"]["T"], m["iis_reference"]["T"]) == (13, 12)
    assert m["ais_reference"]["paired_found"] == m["iis_reference"]["paired_found"] == len(a)
    emb["reference_audio_wav2clip"] = emb["reference_audio_wav2clip"][1:]  # the first pair's audio is gone
    with caplog.at_level(logging.WARNING, logger="mtok_jax.evaluate"):
        assert compute_metrics(emb, labels, {0: "a", 1: "b", 2: "c"}, 3)["ais_reference"]["paired_found"] == len(a) - 1
    assert f"1 of {len(a)} paired audios are not exactly in the reference set" in caplog.text
    md = render_markdown({**r, "metrics": m})
    assert "baselines over the test split (T = 13 audios / 12 images)" in md


def test_seeded_selection_of_test_items():
    """Records sorted by (label, path), 5 consecutive segments per recording: the seeded draw picks other
    records than record order, covers more recordings, keeps labels balanced and interleaved, differs
    between seeds and repeats for one seed."""
    labels = np.repeat(np.arange(3), 20)  # record k of a label belongs to recording k // 5
    recording = np.tile(np.arange(20) // 5, 3)
    first = select_test_items(labels, 30, seed=None)
    a, b = select_test_items(labels, 30, seed=0), select_test_items(labels, 30, seed=1)
    np.testing.assert_array_equal(a, select_test_items(labels, 30, seed=0))
    assert set(a.tolist()) != set(b.tolist()) and set(a.tolist()) != set(first.tolist())
    for sel in (first, a, b):
        assert labels[sel].tolist() == [0, 1, 2] * 10
    per_label_recordings = lambda sel: np.mean([len(set(recording[sel[labels[sel] == l]])) for l in range(3)])  # noqa: E731
    assert per_label_recordings(first) == 2 and per_label_recordings(a) > 3


def test_items_file_and_ids(tmp_path):
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps({"test_index": i, "image": "x"}) + "\n"
                                                     for i in (4, 0, 2)))
    assert read_items(str(tmp_path / "manifest.jsonl")) == [4, 0, 2]
    (tmp_path / "items.txt").write_text("# chosen clips\n3\naudio/Heavy metal/b.wav\n")
    source = [{"audio_id": f"audio/Heavy metal/{c}.wav".encode()} for c in "abcde"]
    np.testing.assert_array_equal(item_indices(read_items(str(tmp_path / "items.txt")), source), [3, 1])
    with pytest.raises(ValueError, match="not a test record"):
        item_indices([9], source)


def test_report_names_the_wav2clip_stereo_mix(report):
    """The report says what Wav2CLIP embedded: stored clips mixed per data.stereo (and that only `mean`
    matches the thesis's librosa average), or — in --images mode — the manifest's files averaged as librosa does."""
    from metrics.evaluate import _wav2clip_input

    r, out = report
    assert "librosa" in r["wav2clip_input"] and f"Wav2CLIP input: {r['wav2clip_input']}." in (out / "report.md").read_text()
    first = _wav2clip_input([{"stereo": "first"}] * 2)
    assert "data.stereo=first" in first and "thesis" in first
    mean = _wav2clip_input([{"stereo": "mean"}])
    assert "data.stereo=mean" in mean and "thesis" not in mean
    assert f"Wav2CLIP input: {first}." in render_markdown({**r, "wav2clip_input": first})
