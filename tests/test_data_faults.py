"""The dataset builder on bad file-system entries: symlinks, unreadable directories, unsafe config names.

Tests run as root here, where chmod 000 does not stop a directory from being listed; the unreadable
directory is simulated by making os.scandir (what os.walk lists with) raise PermissionError for it.
"""

import errno
import json
import os

import numpy as np
import pytest
import soundfile as sf
from PIL import Image

import mtok_jax  # noqa: F401
from mtok_jax import cli
from mtok_jax.data import build as build_cli
from mtok_jax.data import music_image as builder_lib
from mtok_jax.data import pipeline, sources

LABEL = "Heavy metal"


def _tone(seconds, f0, amp=0.5, sr=16000):
    t = np.arange(int(round(sr * seconds))) / sr
    return (amp * np.sin(2 * np.pi * f0 * t)).astype(np.float32)


def _good_tree(root):
    """3 audio + 3 images of one label: one of each per split."""
    (root / "audio" / LABEL).mkdir(parents=True)
    (root / "image" / LABEL).mkdir(parents=True)
    for i in range(3):
        sf.write(root / "audio" / LABEL / f"a{i}.wav", _tone(1.5, 200 + 40 * i), 16000)
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
            root / "image" / LABEL / f"i{i}.png")


def _skipped(out):
    return {r["path"]: r for r in map(json.loads, (out / "skipped.jsonl").read_text().splitlines())}


def test_symlinks_and_unreadable_directory_are_skipped_not_fatal(tmp_path, monkeypatch):
    man = tmp_path / "manual"
    _good_tree(man)
    img = man / "image" / LABEL
    os.symlink(tmp_path / "nowhere.png", img / "dangling.png")
    os.symlink(img / "loop.png", img / "loop.png")  # a self-looping symlink: stat gives ELOOP
    os.symlink(tmp_path / "gone.wav", man / "audio" / LABEL / "dangling.wav")
    (tmp_path / "elsewhere").mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "elsewhere" / "x.png")
    os.symlink(tmp_path / "elsewhere", img / "linked")
    locked = img / "locked"
    locked.mkdir()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(locked / "hidden_from_us.png")
    real_scandir = os.scandir

    def scandir(path="."):
        if isinstance(path, (str, os.PathLike)) and os.fspath(path) == str(locked):
            raise PermissionError(errno.EACCES, "Permission denied", str(locked))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    cfg = builder_lib.make_config("folders", clip_seconds=1.0, image_size=32, labels=[LABEL])
    out = builder_lib.build(man, tmp_path / "tfds", cfg, workers=0, progress=False)
    skipped = _skipped(out)
    want = {
        f"image/{LABEL}/dangling.png": "dangling symlink",
        f"image/{LABEL}/loop.png": "symlink loop (OSError",
        f"audio/{LABEL}/dangling.wav": "dangling symlink",
        f"image/{LABEL}/linked": "symlink to a directory (not followed)",
        f"image/{LABEL}/locked": "unreadable directory (PermissionError: Permission denied): its files",
    }
    assert set(skipped) == set(want)
    for path, reason in want.items():
        assert skipped[path]["reason"].startswith(reason), (path, skipped[path])
        assert skipped[path]["kind"] == path.split("/")[0]
    lines, counts = build_cli.summarize(out)
    assert counts == {"train": 1, "validation": 1, "test": 1, "skipped": 5}
    assert "  image unreadable directory: 1" in lines


@pytest.mark.parametrize("name", ["../../x", "a/b", "..", ".hidden", "x\\y", "/abs"])
def test_unsafe_config_names_are_refused(tmp_path, name, capsys):
    with pytest.raises(ValueError, match=f"dataset config name {name!r}".replace("\\", "\\\\")):
        builder_lib.make_config("folders", name=name)
    with pytest.raises(ValueError, match="dataset config name"):
        builder_lib.build(tmp_path, tmp_path / "tfds", name)
    with pytest.raises(ValueError, match="dataset config name"):
        pipeline.resolve_config(tmp_path, name)
    with pytest.raises(SystemExit) as e:
        cli.run(build_cli.main, ["--layout", "folders", "--manual_dir", str(tmp_path), "--data_dir", str(tmp_path / "d"),
                        "--config_name", name])
    assert e.value.code == 2 and "dataset config name" in capsys.readouterr().err
    assert not (tmp_path / "d").exists() and not (tmp_path / "x").exists()


def test_safe_config_name_accepted():
    assert builder_lib.make_config("folders", name="my-set_v1.2").name == "my-set_v1.2"
    assert builder_lib.check_config_name(builder_lib.config_name_for("csv", 2.5, 64)) == "csv-2p5s-64px"


def test_silence_threshold_is_a_builder_option(tmp_path, capsys):
    """A −78 dBFS noise track is skipped as silence at the default −60 dBFS and a −40 dBFS tone is kept;
    --silence_dbfs -30 skips the tone too and is recorded in the built config (and its name)."""
    man = tmp_path / "manual"
    _good_tree(man)
    names = next((f"noise{k}", f"tone{k}") for k in range(100) if set(sources.assign_splits(
        [f"a{i}" for i in range(3)] + [f"noise{k}", f"tone{k}"])[3:]) == {"train"})  # keep val/test non-empty
    rng = np.random.default_rng(0)
    sf.write(man / "audio" / LABEL / f"{names[0]}.wav",
             rng.standard_normal(24000).astype(np.float32) * 10 ** (-78 / 20), 16000, subtype="PCM_16")
    sf.write(man / "audio" / LABEL / f"{names[1]}.wav", _tone(1.5, 300, amp=np.sqrt(2) * 10 ** (-40 / 20)),
             16000, subtype="PCM_16")
    noise, tone = (f"audio/{LABEL}/{n}.wav" for n in names)
    for threshold, silent in ((None, {noise}), (-30.0, {noise, tone})):
        data_dir = tmp_path / f"tfds{threshold}"
        (tmp_path / "labels.txt").write_text(LABEL + "\n")
        argv = ["--layout", "folders", "--manual_dir", str(man), "--data_dir", str(data_dir), "--clip_seconds", "1",
                "--image_size", "32", "--labels", str(tmp_path / "labels.txt"), "--workers", "0", "--no_progress"]
        assert build_cli.main(argv + ([] if threshold is None else ["--silence_dbfs", str(threshold)])) == 0
        name = capsys.readouterr().out.split("config_name: ")[1].split()[0]
        out = sources.dataset_dir(data_dir, name)
        skipped = _skipped(out)
        assert {p for p, r in skipped.items() if r["reason"].startswith("silence (RMS")} == silent
        meta = json.loads((out / "metadata.json").read_text())
        assert meta["config"]["silence_dbfs"] == (-60.0 if threshold is None else threshold)
        assert name.endswith("-silm30dB") == (threshold is not None)
        assert len(meta["splits"]["train"]["labels"]) == 1 + 2 - len(silent)
