"""The music_image builder + input pipeline over a generated source tree full of bad input.

Checks against independent expectations: every source file ends up in exactly one record or in
skipped.jsonl with the right reason; decoded audio equals soundfile + soxr + int16 rounding written
out here; stored images equal a PIL crop/resize written out here; splits are disjoint and follow the
sha1-rank rule; pairing stays within label and split; determinism and per-epoch re-pairing.
"""

import hashlib
import io
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import soxr
from PIL import Image

import mtok_jax  # noqa: F401
from mtok_jax.data import music_image as builder_lib
from mtok_jax.data import jobs as jobs_lib
from mtok_jax.data import load_examples
from mtok_jax.data.pipeline import batches, num_batches, num_examples, open_dataset

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Heavy metal", "Electronic music", "Renaissance symbolism"]  # the last one has no images
CLIP = 2.0
SIDE = 32
SPLITS = ("train", "validation", "test")


def _tone(sr, seconds, f0, channels=1, amp=0.5, seed=0):
    t = np.arange(int(round(sr * seconds))) / sr
    ph = np.random.default_rng(seed).uniform(0, 6.28, channels)
    return np.stack([amp * np.sin(2 * np.pi * f0 * (c + 1) * t + ph[c]) for c in range(channels)], 1).astype(np.float32)


def _pattern(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_tree(root: Path) -> dict:
    """Write the fixture manual dir; returns {relpath: expected reason substring or None (usable)}."""
    exp = {}
    a, im = root / "audio", root / "image"
    for lab in LABELS + ["Polka"]:
        (a / lab).mkdir(parents=True)
    for lab in LABELS[:2]:
        (im / lab).mkdir(parents=True)
    for li, lab in enumerate(LABELS[:2]):
        for i in range(10):
            sf.write(a / lab / f"good{i}.wav", _tone(16000, 2.5, 200 + 50 * i + 7 * li, seed=i), 16000, subtype="PCM_16")
            exp[f"audio/{lab}/good{i}.wav"] = None
    hm = a / "Heavy metal"
    (hm / "empty.wav").write_bytes(b"")
    exp["audio/Heavy metal/empty.wav"] = "empty file"
    buf = io.BytesIO()
    sf.write(buf, _tone(16000, 3.0, 330), 16000, format="WAV", subtype="PCM_16")
    (hm / "truncated.wav").write_bytes(buf.getvalue()[: 44 + 2 * 24000])  # 1.5 s of the 3 s survive
    exp["audio/Heavy metal/truncated.wav"] = None
    (hm / "noise.mp3").write_bytes(np.random.default_rng(5).bytes(4096))
    exp["audio/Heavy metal/noise.mp3"] = "unreadable audio"
    sf.write(hm / "silence.wav", np.zeros((40000, 1), np.float32), 16000)
    exp["audio/Heavy metal/silence.wav"] = "silence (RMS -inf dBFS"
    sf.write(hm / "short.wav", _tone(16000, 0.2, 500), 16000)
    exp["audio/Heavy metal/short.wav"] = "too short"
    sf.write(hm / "hires.wav", _tone(96000, 2.5, 440, channels=2), 96000, subtype="PCM_24")
    exp["audio/Heavy metal/hires.wav"] = None
    sf.write(hm / "song.mp3", _tone(44100, 2.5, 220, channels=2), 44100)
    exp["audio/Heavy metal/song.mp3"] = None
    sf.write(hm / "dup.wav", _tone(16000, 2.5, 250), 16000)
    exp["audio/Heavy metal/dup.wav"] = None
    (hm / "notes.txt").write_text("not audio")
    exp["audio/Heavy metal/notes.txt"] = "unsupported file extension"
    em = a / "Electronic music"
    sf.write(em / "dup.wav", _tone(16000, 2.5, 260), 16000)  # same id as in Heavy metal
    exp["audio/Electronic music/dup.wav"] = None
    sf.write(em / "ünïcödé 音楽.flac", _tone(22050, 2.5, 300), 22050)
    exp["audio/Electronic music/ünïcödé 音楽.flac"] = None
    sf.write(em / "chill.ogg", _tone(48000, 2.5, 180), 48000)
    exp["audio/Electronic music/chill.ogg"] = None
    for i in range(4):
        sf.write(a / "Renaissance symbolism" / f"mass{i}.wav", _tone(16000, 2.5, 150 + i), 16000)
        exp[f"audio/Renaissance symbolism/mass{i}.wav"] = "no usable image"
    sf.write(a / "Polka" / "p.wav", _tone(16000, 2.5, 400), 16000)
    exp["audio/Polka/p.wav"] = "unknown label folder"
    sf.write(a / "loose.wav", _tone(16000, 2.5, 400), 16000)
    exp["audio/loose.wav"] = "not inside a label folder"
    (im / "Polka").mkdir()
    Image.fromarray(_pattern(40, 40, 99)).save(im / "Polka" / "x.png")
    exp["image/Polka/x.png"] = "unknown label folder"
    for li, lab in enumerate(LABELS[:2]):
        for i in range(9):
            Image.fromarray(_pattern(40 + 3 * i, 50, 10 * li + i)).save(im / lab / f"art{i}.png")
            exp[f"image/{lab}/art{i}.png"] = None
    hi = im / "Heavy metal"
    jb = io.BytesIO()
    Image.fromarray(_pattern(120, 120, 3)).save(jb, "JPEG")
    (hi / "truncated.jpg").write_bytes(jb.getvalue()[: len(jb.getvalue()) // 2])
    exp["image/Heavy metal/truncated.jpg"] = "unreadable image"
    (hi / "text.png").write_text("hello, I am text\n")
    exp["image/Heavy metal/text.png"] = "not an image"
    Image.new("CMYK", (48, 40), (0, 255, 255, 0)).save(hi / "cmyk.jpg", quality=95)
    exp["image/Heavy metal/cmyk.jpg"] = None
    Image.new("RGB", (1, 1), (1, 2, 3)).save(hi / "pixel.png")
    exp["image/Heavy metal/pixel.png"] = "too small"
    Image.fromarray((np.arange(48 * 48).reshape(48, 48) * 20).astype(np.uint16)).save(hi / "gray16.png")
    exp["image/Heavy metal/gray16.png"] = None
    Image.fromarray(_pattern(40, 40, 7)).convert("P").save(im / "Electronic music" / "ünï 絵.png")
    exp["image/Electronic music/ünï 絵.png"] = None
    rgba = np.concatenate([_pattern(40, 40, 8), np.full((40, 40, 1), 200, np.uint8)], axis=2)
    Image.fromarray(rgba, "RGBA").save(im / "Electronic music" / "alpha.webp")
    exp["image/Electronic music/alpha.webp"] = None
    return exp


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("manual")
    exp = make_tree(root)
    (root / "labels.txt").write_text("# test labels\n" + "\n".join(LABELS) + "\n")
    return root, exp


def _config():
    return builder_lib.make_config("folders", clip_seconds=CLIP, image_size=SIDE, labels=LABELS)


@pytest.fixture(scope="module")
def built(tree, tmp_path_factory):
    """Build through the CLI (as users do); returns (data_dir, config_name, stdout)."""
    root, _ = tree
    out = tmp_path_factory.mktemp("tfds")
    cmd = [sys.executable, "-m", "mtok_jax.data.build", "--layout", "folders", "--manual_dir", str(root),
           "--data_dir", str(out), "--labels", str(root / "labels.txt"), "--clip_seconds", str(CLIP),
           "--image_size", str(SIDE), "--workers", "2", "--no_progress"]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return out, _config().name, res.stdout


def _records(data_dir, cfg):
    return {s: list(load_examples(data_dir, s, cfg)) for s in SPLITS + tuple(f"{s}_images" for s in SPLITS)
            if open_dataset(data_dir, cfg).has_split(s)}


@pytest.fixture(scope="module")
def records(built):
    data_dir, cfg, _ = built
    return _records(data_dir, cfg)


def test_cli_summary_and_every_file_accounted_for(tree, built, records):
    root, exp = tree
    data_dir, cfg, stdout = built
    last = stdout.strip().splitlines()[-1]
    counts = {s: len(records.get(s, [])) for s in SPLITS}
    ds_dir = data_dir / "music_image" / cfg / "1.0.0"
    skipped = [json.loads(line) for line in (ds_dir / "skipped.jsonl").read_text(encoding="utf-8").splitlines()]
    assert last == (f"built: train={counts['train']} validation={counts['validation']} test={counts['test']} "
                    f"skipped={len(skipped)}")
    assert sum("built:" in line for line in stdout.splitlines()) == 1
    n_audio, n_image = (sum(rel.startswith(k + "/") for rel in exp) for k in ("audio", "image"))
    assert f"source files: audio={n_audio} image={n_image}" in stdout
    for name in LABELS:
        assert name in stdout
    stored_audio = [r["audio_id"] for s in SPLITS for r in records.get(s, [])]
    stored_images = [r["image_id"] for s in SPLITS for r in records.get(f"{s}_images", [])]
    assert len(stored_audio) == len(set(stored_audio)) and len(stored_images) == len(set(stored_images))
    by_path = {r["path"]: r for r in skipped}
    assert len(by_path) == len(skipped)
    on_disk = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != "labels.txt"}
    assert on_disk == set(exp)
    assert set(stored_audio) | set(stored_images) | set(by_path) == on_disk  # counts add up
    assert not (set(stored_audio) | set(stored_images)) & set(by_path)
    for rel, reason in exp.items():
        if reason is None:
            assert rel in stored_audio or rel in stored_images, (rel, by_path.get(rel))
        else:
            assert rel in by_path and reason in by_path[rel]["reason"], (rel, by_path.get(rel))
            assert by_path[rel]["kind"] == rel.split("/")[0]
    assert Counter(r["kind"] for r in skipped)["image"] == 4  # unknown label, truncated, text, 1x1


def test_decoded_audio_matches_reference(tree, records):
    root, _ = tree
    for s in SPLITS:
        for r in records[s]:
            assert r["audio"].shape == (int(CLIP * 16000),) and r["audio"].dtype == np.float32
            assert -1.0 <= r["audio"].min() and r["audio"].max() <= 1.0
    by_id = {r["audio_id"]: r["audio"] for s in SPLITS for r in records[s]}
    for rel in ["audio/Heavy metal/hires.wav", "audio/Electronic music/ünïcödé 音楽.flac",
                "audio/Heavy metal/song.mp3", "audio/Heavy metal/truncated.wav", "audio/Heavy metal/good3.wav"]:
        raw, sr = sf.read(root / rel, dtype="float32", always_2d=True)
        ref = soxr.resample(raw[:, 0], sr, 16000, quality="HQ")  # the default --stereo first (the reference)
        ref = np.tile(ref, 2)[: int(CLIP * 16000)]  # the truncated wav (1.5 s) is repeat-padded
        ref = np.clip(np.rint(ref * 32768), -32768, 32767) / 32768.0
        np.testing.assert_allclose(by_id[rel], ref, atol=1.5 / 32768, err_msg=rel)


def test_stored_images_match_reference(tree, records):
    root, _ = tree
    by_id = {r["image_id"]: r["image"] for s in SPLITS for r in records.get(f"{s}_images", [])}
    for rel, img in by_id.items():
        assert img.shape == (SIDE, SIDE, 3) and img.dtype == np.uint8
    for rel in ["image/Heavy metal/art4.png", "image/Electronic music/art8.png"]:
        src = np.asarray(Image.open(root / rel).convert("RGB"))
        h, w = src.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        ref = Image.fromarray(src[top:top + side, left:left + side]).resize((SIDE, SIDE), Image.Resampling.BICUBIC)
        np.testing.assert_array_equal(img if rel not in by_id else by_id[rel], np.asarray(ref))
    assert np.all(np.abs(by_id["image/Heavy metal/cmyk.jpg"].astype(int) - [255, 0, 0]) <= 4)


def test_labels_and_splits(tree, records):
    names = {i: n for i, n in enumerate(LABELS)}
    for s in SPLITS:
        for r in records[s]:
            assert r["audio_id"].split("/")[1] == names[r["label"]]
        for r in records[f"{s}_images"]:
            assert r["image_id"].split("/")[1] == names[r["label"]]
    # Split rule, transcribed: per label and modality rank usable-looking files by sha1(id), the first
    # ceil(n/10) → validation, next ceil(n/10) → test. Checked on the images of 'Electronic music'
    # (11 candidates, all decode) and on its 13 audio files (all decode).
    root, exp = tree
    for kind, split_key in (("image", "_images"), ("audio", "")):
        cands = sorted(rel for rel in exp if rel.startswith(f"{kind}/Electronic music/"))
        ids = {rel: rel.split("/", 2)[2].rsplit(".", 1)[0] for rel in cands}
        ranked = sorted(cands, key=lambda rel: (hashlib.sha1(ids[rel].encode()).hexdigest(), ids[rel]))
        k = math.ceil(len(ranked) / 10)
        want = {"validation": set(ranked[:k]), "test": set(ranked[k:2 * k]), "train": set(ranked[2 * k:])}
        key = "image_id" if kind == "image" else "audio_id"
        for s in SPLITS:
            got = {r[key] for r in records[s + split_key] if r[key] in want[s] | set(cands)}
            assert got == want[s], (kind, s)


def test_eval_pairing_same_label_and_split(records):
    for s in ("validation", "test"):
        pool = {r["image_id"]: r for r in records[f"{s}_images"]}
        assert records[s]
        for r in records[s]:
            assert r["image_id"] in pool and pool[r["image_id"]]["label"] == r["label"]
            np.testing.assert_array_equal(r["image"], pool[r["image_id"]]["image"])


def test_train_repairing_per_epoch(built, records):
    data_dir, cfg, _ = built
    pool = {r["image_id"]: r["label"] for r in records["train_images"]}
    e0 = [r["image_id"] for r in load_examples(data_dir, "train", cfg, seed=3, epoch=0)]
    e0b = [r["image_id"] for r in load_examples(data_dir, "train", cfg, seed=3, epoch=0)]
    e1 = [r["image_id"] for r in load_examples(data_dir, "train", cfg, seed=3, epoch=1)]
    assert e0 == e0b and e0 != e1
    for ids in (e0, e1):
        assert all(pool[i] == r["label"] for i, r in zip(ids, records["train"]))


def test_batches_deterministic_resumable_and_hosts(built, records):
    data_dir, cfg, _ = built
    n = num_examples(data_dir, "train", cfg)
    assert n == len(records["train"])
    kw = dict(global_batch_size=4, seed=1, config_name=cfg)
    full = list(batches(data_dir, "train", epoch=2, **kw))
    assert len(full) == num_batches(n, 4) == n // 4
    again = list(batches(data_dir, "train", epoch=2, **kw))
    resumed = list(batches(data_dir, "train", epoch=2, start_batch=2, **kw))
    other = list(batches(data_dir, "train", epoch=3, **kw))
    for x, y in zip(full, again):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    assert len(resumed) == len(full) - 2
    for x, y in zip(full[2:], resumed):
        np.testing.assert_array_equal(x["audio"], y["audio"])
        np.testing.assert_array_equal(x["image"], y["image"])
    assert not all(np.array_equal(x["audio"], y["audio"]) for x, y in zip(full, other))
    b = full[0]
    assert b["audio"].shape == (4, int(CLIP * 16000)) and b["audio"].dtype == np.float32
    assert b["image"].shape == (4, SIDE, SIDE, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and -1 <= b["image"].min() and b["image"].max() <= 1
    # every batch row is a stored audio of that label, with a train image of that label
    audio_rows = {r["audio"].tobytes(): r["label"] for r in records["train"]}
    image_rows = {}
    for r in records["train_images"]:
        image_rows.setdefault(r["label"], []).append(r["image"].astype(np.float32) / 127.5 - 1)
    for bt in full:
        for a, im, lab in zip(bt["audio"], bt["image"], bt["label"]):
            assert audio_rows[a.tobytes()] == lab
            assert any(np.array_equal(im, ref) for ref in image_rows[lab])
    # two hosts, each loading its rows of every global batch: together exactly the one-host batches
    # (the global order does not depend on the process count); with 2 micro-batches, rows of each
    hosts = [list(batches(data_dir, "train", epoch=2, rows=np.arange(2 * p, 2 * p + 2), **kw)) for p in range(2)]
    assert len(hosts[0]) == len(hosts[1]) == len(full)
    for one, h0, h1 in zip(full, *hosts):
        for key in one:
            np.testing.assert_array_equal(np.concatenate([h0[key], h1[key]]), one[key])
    micro = [list(batches(data_dir, "train", epoch=2, rows=[p], micro_batches=2, **kw)) for p in range(2)]
    for one, h0, h1 in zip(full, *micro):  # micro-batch i = rows 2i, 2i + 1 of the global batch
        np.testing.assert_array_equal(np.stack([h0["audio"], h1["audio"]], 1).reshape(one["audio"].shape),
                                      one["audio"])


def test_eval_batches_padding_mask_bgr(built, records):
    data_dir, cfg, _ = built
    n = len(records["validation"])
    out = list(batches(data_dir, "validation", global_batch_size=3, seed=0, epoch=0, shuffle=False,
                       drop_remainder=False, config_name=cfg))
    assert len(out) == -(-n // 3) and all(b["mask"].shape == (3,) for b in out)
    assert out[-1]["mask"].sum() == n - 3 * (len(out) - 1) and sum(b["mask"].sum() for b in out) == n
    real = [(a, im) for b in out for a, im, m in zip(b["audio"], b["image"], b["mask"]) if m == 1]
    for (a, im), r in zip(real, records["validation"]):  # stored order, stored pairing
        np.testing.assert_array_equal(a, r["audio"])
        np.testing.assert_array_equal(im, r["image"].astype(np.float32) / 127.5 - 1)
    bgr = list(batches(data_dir, "validation", global_batch_size=3, seed=0, epoch=0, shuffle=False,
                       drop_remainder=False, bgr=True, config_name=cfg))
    np.testing.assert_array_equal(bgr[0]["image"], out[0]["image"][..., ::-1])
    # three hosts with one row each: the padding is the global batch's, masked wherever it lands
    hosts = [list(batches(data_dir, "validation", global_batch_size=3, seed=0, epoch=0, shuffle=False,
                          drop_remainder=False, rows=[p], config_name=cfg)) for p in range(3)]
    for one, *parts in zip(out, *hosts):
        for key in one:
            np.testing.assert_array_equal(np.concatenate([h[key] for h in parts]), one[key])


def test_to_global_shards_batch(built):
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    from mtok_jax.data.pipeline import to_global

    data_dir, cfg, _ = built
    b = next(iter(batches(data_dir, "train", global_batch_size=8, seed=0, epoch=0, config_name=cfg)))
    mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
    g = to_global(b, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    assert g["image"].shape == b["image"].shape and len(g["label"].sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(g["audio"]), b["audio"])


def test_interrupted_build_leaves_nothing_and_rerun_completes(tree, built, tmp_path, monkeypatch):
    root, _ = tree
    ref_dir, cfg, _ = built
    real_job, calls = jobs_lib.audio_job, []

    def flaky(job):
        calls.append(job)
        if len(calls) == 7:
            raise KeyboardInterrupt("simulated interruption")
        return real_job(job)

    monkeypatch.setattr(jobs_lib, "audio_job", flaky)
    with pytest.raises(KeyboardInterrupt):
        builder_lib.build(root, tmp_path, _config(), workers=0, progress=False)
    ds_root = tmp_path / "music_image" / cfg
    assert not (ds_root / "1.0.0").exists()
    assert not [p for p in ds_root.iterdir() if "incomplete" in p.name] if ds_root.exists() else True
    with pytest.raises(FileNotFoundError):
        num_examples(tmp_path, "train", cfg)
    monkeypatch.setattr(jobs_lib, "audio_job", real_job)
    builder_lib.build(root, tmp_path, _config(), workers=0, progress=False)
    assert not (tmp_path / ".music_image_build" / cfg).exists()  # build cache removed on success
    got, want = _records(tmp_path, cfg), _records(ref_dir, cfg)
    assert {s: len(v) for s, v in got.items()} == {s: len(v) for s, v in want.items()}
    for s in SPLITS:
        assert [r["audio_id"] for r in got[s]] == [r["audio_id"] for r in want[s]]
        assert [r["image_id"] for r in got[s]] == [r["image_id"] for r in want[s]]


def test_csv_layout_with_quirk_flags(tmp_path):
    man = tmp_path / "m"
    (man / "audio").mkdir(parents=True)
    (man / "image").mkdir()
    rows_a = ["id,class,set"]
    for i, (lab, st) in enumerate([("Heavy metal", "train"), ("Heavy metal", "val"), ("Heavy metal", "test"),
                                   ("Electronic music", "train"), ("Electronic music", "train")]):
        sf.write(man / "audio" / f"a{i}.wav", _tone(16000, 1.5, 200 + 40 * i), 16000)
        rows_a.append(f"{'a%d' % i if i % 2 else 'a%d.wav' % i},{lab},{st}")
    rows_a += ["a0.wav,Heavy metal,train", "ghost,Heavy metal,train", "a5,Heavy metal,train", "a5,Heavy metal,test",
               "a6,Jazz,train"]
    for i in (5, 6, 7):
        sf.write(man / "audio" / f"a{i}.wav", _tone(16000, 1.5, 100 + i), 16000)
    rows_i = ["id,class,set"]
    for i, (lab, st) in enumerate([("Heavy metal", "train"), ("Heavy metal", "validation"), ("Heavy metal", "test"),
                                   ("Electronic music", "train")]):
        Image.fromarray(_pattern(40, 64, i)).save(man / "image" / f"i{i}.png")
        rows_i.append(f"i{i},{lab},{st}")
    (man / "audio.csv").write_text("\n".join(rows_a) + "\n")
    (man / "images.csv").write_text("\n".join(rows_i) + "\n")
    cfg = builder_lib.make_config("csv", clip_seconds=1.0, reference_512x320=True, audio_44k_as_16k=True,
                                  image_format="png")
    assert cfg.name == "csv-1s-512x320nocrop-44k" and cfg.sample_rate == 44100
    out = builder_lib.build(man, tmp_path / "tfds", cfg, workers=0, progress=False)
    skipped = {r["path"]: r["reason"] for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}
    assert "duplicate row" in skipped["audio.csv:7"]
    assert "no file" in skipped["audio.csv:8"]
    assert "different class/set" in skipped["audio/a5.wav"]
    assert "unknown label 'Jazz'" in skipped["audio/a6.wav"]
    assert "not listed" in skipped["audio/a7.wav"]
    ex = {s: list(load_examples(tmp_path / "tfds", s, cfg.name)) for s in SPLITS}
    assert [r["audio_id"] for r in ex["train"]] == ["audio/a3.wav", "audio/a4.wav", "audio/a0.wav"]  # label order
    assert [r["audio_id"] for r in ex["validation"]] == ["audio/a1.wav"]
    assert ex["validation"][0]["image_id"] == "image/i1.png" and ex["test"][0]["image_id"] == "image/i2.png"
    a = ex["validation"][0]["audio"]
    raw, _ = sf.read(man / "audio" / "a1.wav", dtype="float32")
    ref = np.rint(soxr.resample(raw, 16000, 44100, quality="HQ")[:44100] * 32768) / 32768
    assert a.shape == (44100,)
    np.testing.assert_allclose(a, ref, atol=1.5 / 32768)
    img = ex["test"][0]["image"]
    assert img.shape == (320, 512, 3)  # whole 64×40 source stretched, no crop
    src = Image.open(man / "image" / "i2.png").convert("RGB")
    np.testing.assert_array_equal(img, np.asarray(src.resize((512, 320), Image.Resampling.BICUBIC)))
