"""The web app (mtok_jax.app): request checks, and the page end to end in a real headless Chromium.

The browser test trains a tiny run for a few steps (the function train.py runs), starts
`python -m mtok_jax.app` on it on a free 127.0.0.1 port, uploads a held-out demo clip, asks for 2
images with a non-default prompt and negative prompt, and checks that the PNGs the page serves are
byte-identical to `sample.py`'s for the settings of the page's samples.jsonl line; then a corrupt
upload shows its error and the server still answers. Needs the `app` extra (gradio, selenium) and
Debian's chromium + chromium-driver; skipped without them unless MTOK_REQUIRE_BROWSER=1 (CI).
"""

import http.client
import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
import soundfile as sf

from conftest import TINY_LABELS_N
from mtok_jax import config_utils, errors, sample, train
from mtok_jax.data import sources
from mtok_jax.app import Limits, Server, check_audio, check_settings, sample_command

REPO = pathlib.Path(__file__).resolve().parents[1]
SCREENS = pathlib.Path("/tmp/app_screens")


# ------------------------------------------------------------------------------- request checks
GOOD = dict(prompt="a painting of <*>", num_images=2, steps=20, guidance=7.5, scheduler="pndm", seed=3)


def check(**changes):
    return check_settings(**dict(GOOD, **changes), placeholder="<*>", limits=Limits(max_images=4))


def test_settings_checks():
    assert check() == dict(GOOD, guidance=7.5)
    for bad, words in [(dict(prompt="a painting"), "exactly once"), (dict(prompt="<*> and <*>"), "found 2"),
                       (dict(num_images=5), "number of images"), (dict(num_images=0), "number of images"),
                       (dict(steps=0), "steps"), (dict(steps=1001), "steps"), (dict(steps=2.5), "whole"),
                       (dict(guidance=-1.0), "guidance"), (dict(guidance=51.0), "guidance"),
                       (dict(guidance=float("nan")), "guidance"), (dict(scheduler="lms"), "scheduler"),
                       (dict(seed=None), "seed"), (dict(steps=None), "steps")]:
        with pytest.raises(errors.UserError, match=words):
            check(**bad)


@pytest.fixture(scope="module")
def demo_config():
    """configs/demo.py (4 s clips, 16 kHz); check_audio needs no model."""
    return config_utils.load_config(REPO / "configs" / "demo.py")


def test_audio_checks(demo_config, tmp_path):
    rng = np.random.default_rng(0)
    tone = (0.3 * np.sin(np.arange(16000 * 10) / 16000 * 2 * np.pi * 440)).astype(np.float32)
    sf.write(tmp_path / "long.wav", tone, 16000, subtype="FLOAT")
    clip, note = check_audio(str(tmp_path / "long.wav"), demo_config, 2.0, Limits())
    np.testing.assert_array_equal(clip, tone[32000:96000])  # the window from 2 s on
    assert "2–6 s" in note
    sf.write(tmp_path / "short.wav", tone[:8000], 16000, subtype="FLOAT")
    clip, note = check_audio(str(tmp_path / "short.wav"), demo_config, 0.0, Limits())
    np.testing.assert_array_equal(clip, np.tile(tone[:8000], 8))  # 0.5 s repeat-padded to 4 s
    assert "repeat-padded to 4 s, as in training" in note and "shorter than 1 s" in note
    sf.write(tmp_path / "silence.wav", np.zeros(32000, np.float32), 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + rng.bytes(3000))
    (tmp_path / "empty.mp3").write_bytes(b"")
    for name, start, limits, words in [("silence.wav", 0, Limits(), "silence"),
                                       ("corrupt.wav", 0, Limits(), "cannot use corrupt.wav: unreadable"),
                                       ("empty.mp3", 0, Limits(), "empty file"),
                                       ("long.wav", 10.5, Limits(), "past the end"),
                                       ("long.wav", 0, Limits(max_bytes=1000), "limit is 0.001 MB")]:
        with pytest.raises(errors.UserError, match=words):
            check_audio(str(tmp_path / name), demo_config, start, limits)
    with pytest.raises(errors.UserError, match="upload or record"):
        check_audio(None, demo_config, 0, Limits())


def test_sample_command_quotes_every_setting():
    record = dict(num_images=2, steps=3, guidance=7.5, scheduler="ddim", seed=9, prompt="it's <*>",
                  negative_prompt="", start=1.5)
    cmd = sample_command("configs/demo.py", ["--config.a=1"], "/r", "best", record, "my song.mp3")
    assert cmd == ("python sample.py --config configs/demo.py --config.a=1 --workdir /r --checkpoint best "
                   "--audio 'my song.mp3' --num_images 2 --steps 3 --guidance 7.5 --scheduler ddim --seed 9 "
                   "--prompt 'it'\"'\"'s <*>' --negative_prompt '' --start 1.5")


def test_forget_deletes_only_uploads(tmp_path):
    """Server.forget (called when an upload is replaced or its session ends) deletes files inside the
    upload folder only, and nothing with --keep_uploads."""
    (tmp_path / "up").mkdir()
    inside, outside = tmp_path / "up" / "a.wav", tmp_path / "b.wav"
    for f in (inside, outside):
        f.write_bytes(b"x")
    Server(None, None, "", [], str(tmp_path / "up"), Limits(), keep_uploads=True).forget(str(inside))
    assert inside.exists()
    server = Server(None, None, "", [], str(tmp_path / "up"), Limits(), keep_uploads=False)
    server.forget(str(outside))
    server.forget(str(tmp_path / "up" / ".." / "b.wav"))
    assert outside.exists()
    server.forget(str(inside))
    assert not inside.exists()


# ------------------------------------------------------------------------------- the browser test
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _browser_or_skip():
    required = os.environ.get("MTOK_REQUIRE_BROWSER") == "1"
    missing = [b for b in ("chromium", "chromedriver") if not shutil.which(b)]
    try:
        import gradio  # noqa: F401
        import selenium  # noqa: F401
    except ImportError as e:
        missing.append(f"python package {e.name} (the app extra)")
    if missing:
        if required:
            pytest.fail(f"MTOK_REQUIRE_BROWSER=1 but missing: {', '.join(missing)}")
        pytest.skip(f"browser test needs {', '.join(missing)}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1200", "--disable-dev-shm-usage"):
        opts.add_argument(flag)
    return webdriver, opts, Service(shutil.which("chromedriver"))


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError):
        return 0, b""  # not listening (yet), or starting


@pytest.fixture(scope="module")
def tiny_run(tiny_assets, tmp_path_factory):
    """A tiny demo run trained for 3 steps (train.train_and_evaluate, what train.py runs) and the
    `--config.*` overrides that describe it."""
    overrides = [f"--config.model.sd_path={tiny_assets['sd']}", f"--config.model.beats_path={tiny_assets['beats']}",
                 f"--config.data.data_dir={tiny_assets['data']}", "--config.data.builder_config=tiny",
                 "--config.data.clip_seconds=1.0", "--config.train.trainable=embedder", "--config.train.epochs=1",
                 "--config.train.batch_size=2", "--config.train.val_batch_size=1", "--config.train.log_every=1",
                 "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.train.sample_every_epochs=0",
                 "--config.sample.steps=3",
                 "--config.sample.num_images=2"]
    config = config_utils.load_config(REPO / "configs" / "demo.py", [o[len("--config."):] for o in overrides])
    workdir = tmp_path_factory.mktemp("run")
    train.train_and_evaluate(config, str(workdir))
    return workdir, overrides, pathlib.Path(tiny_assets["data"]).parent / "manual"


def test_page_end_to_end_in_chromium(tiny_run, tmp_path):
    webdriver, opts, service = _browser_or_skip()
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    workdir, overrides, manual = tiny_run
    clip = pathlib.Path(sample.held_out_audio(manual, sources.DEFAULT_LABELS[:TINY_LABELS_N], per_label=1)[0])
    port, uploads = _free_port(), tmp_path / "uploads"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "mtok_jax.app", "--config", "configs/demo.py", "--workdir",
                               str(workdir), "--port", str(port), "--upload_dir", str(uploads), *overrides],
                              cwd=REPO, env=env, stdout=open(tmp_path / "server.log", "w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    driver = None
    try:
        while _get(url)[0] != 200:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.perf_counter() - t0 < 300, "server did not start in 300 s"
            time.sleep(1)
        startup = time.perf_counter() - t0
        driver = webdriver.Chrome(options=opts, service=service)
        wait = WebDriverWait(driver, 240)
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(clip))
        wait.until(lambda d: clip.name in d.find_element(By.ID, "audio_info").text)

        def fill(elem_id, value, tag="input"):
            box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} {tag}")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(Keys.DELETE)
            box.send_keys(str(value), Keys.TAB)

        fill("num_images", 2)
        fill("steps", 3)
        fill("seed", 11)
        fill("prompt", "a watercolor of <*>, loud colours", "textarea")
        fill("negative", "grey", "textarea")
        t1 = time.perf_counter()
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        assert list(uploads.rglob(clip.name))  # the upload is in the upload folder while in use
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery img")) == 2
                   or "⚠" in d.find_element(By.ID, "status").text)
        generate_s = time.perf_counter() - t1
        assert "⚠" not in driver.find_element(By.ID, "status").text, driver.find_element(By.ID, "status").text
        SCREENS.mkdir(exist_ok=True)
        for path in (tmp_path / "after_generate.png", SCREENS / "after_generate.png"):
            driver.save_screenshot(str(path))
        served = [_get(img.get_attribute("src")) for img in driver.find_elements(By.CSS_SELECTOR, "#gallery img")]
        assert [code for code, _ in served] == [200, 200]
        links = {a.get_attribute("href").rsplit("/", 1)[-1]: a.get_attribute("href")
                 for a in driver.find_elements(By.CSS_SELECTOR, "#downloads a[href]")}
        records = [json.loads(l) for l in _get(links["samples.jsonl"])[1].decode().splitlines()]
        assert [(r["seed"], r["index"], r["steps"], r["prompt"], r["negative_prompt"]) for r in records] == [
            (11, 0, 3, "a watercolor of <*>, loud colours", "grey"), (11, 1, 3, "a watercolor of <*>, loud colours",
                                                                       "grey")]
        pngs = [_get(links[urllib.parse.quote(r["image"])])[1] for r in records]
        assert sorted(pngs) == sorted(body for _, body in served)
        # nothing outside the upload folder is served, the upload itself is gone once replaced/closed
        assert _get(url + "gradio_api/file=" + str(REPO / "configs" / "demo.py"))[0] in (403, 404)

        # sample.py with the settings of the page's samples.jsonl line writes the same PNG bytes
        cmd = shlex.split(sample_command("configs/demo.py", overrides, str(workdir), "best", records[0], str(clip)))
        out = tmp_path / "cli"
        subprocess.run([sys.executable, *cmd[1:], "--out", str(out)], cwd=REPO, env=env, check=True,
                       capture_output=True)
        cli_records = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
        for r, c, png in zip(records, cli_records, pngs):
            assert (out / c["image"]).read_bytes() == png
            assert {k: v for k, v in r.items() if k not in ("image", "audio", "label")} == \
                   {k: v for k, v in c.items() if k not in ("image", "audio", "label")}

        # a corrupt upload: a message on the page, and the server keeps serving
        bad = tmp_path / "broken.wav"
        bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt " + bytes(range(256)) * 8)
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))
        driver.find_element(By.CSS_SELECTOR, "#upload input[type=file]").send_keys(str(bad))
        wait.until(lambda d: "broken.wav" in d.find_element(By.ID, "audio_info").text)
        driver.find_element(By.CSS_SELECTOR, "#generate").click()
        wait.until(lambda d: "cannot use broken.wav: unreadable audio" in d.find_element(By.ID, "status").text)
        assert "cannot use broken.wav: unreadable audio" in driver.find_element(By.ID, "audio_info").text
        assert str(uploads) not in driver.find_element(By.ID, "status").text  # no server paths in messages
        driver.execute_script("window.scrollTo(0, 0)")
        for path in (tmp_path / "error.png", SCREENS / "error.png"):
            driver.save_screenshot(str(path))
        assert _get(url)[0] == 200 and server.poll() is None
        print(f"\napp start-up {startup:.1f} s; 2 images (3 steps) {generate_s:.1f} s from click to gallery")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(60)
    assert not uploads.exists()  # uploads and results removed when the server stops


def test_cli_warns_for_a_public_host_and_fails_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mtok_jax.app", "--host", "0.0.0.0", "--workdir",
                          str(tmp_path / "nothing")], cwd=REPO, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])))
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr
    assert lines[0].startswith("warning: --host 0.0.0.0 makes the page reachable from other machines")
    assert lines[-1] == (f"error: no best checkpoint in {tmp_path / 'nothing' / 'checkpoints'}; none exist (train "
                         f"it first, or --checkpoint none for the untrained model)")
