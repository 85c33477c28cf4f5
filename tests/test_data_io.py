"""Decoding of single audio/image files (mtok_jax.audio.io, mtok_jax.data.images) against independent
references: soundfile + soxr directly, numpy transcriptions, PIL operations written out here."""

import io

import numpy as np
import pytest
import soundfile as sf
import soxr
from PIL import Image

from mtok_jax.audio.io import AudioDecodeError, load_audio, rms_dbfs
from mtok_jax.data import jobs
from mtok_jax.data import music_image as builder
from mtok_jax.data.images import ImageDecodeError, load_image


def _tone(sr, seconds, freqs=(440.0,), amp=0.5):
    t = np.arange(int(round(sr * seconds))) / sr
    return np.stack([amp * np.sin(2 * np.pi * f * t) for f in freqs], axis=1).astype(np.float32)


def test_hires_stereo_wav_resampled_mono(tmp_path):
    x = _tone(96000, 3.0, freqs=(440.0, 1000.0))
    path = tmp_path / "hires.wav"
    sf.write(path, x, 96000, subtype="PCM_24")
    y = load_audio(path, sample_rate=16000, clip_seconds=2.0)
    raw, _ = sf.read(path, dtype="float32", always_2d=True)
    ref = soxr.resample(raw.mean(axis=1), 96000, 16000, quality="HQ")[:32000]
    assert y.shape == (32000,) and y.dtype == np.float32
    np.testing.assert_allclose(y, ref, atol=1e-6)
    assert np.abs(y).max() <= 1.0


@pytest.mark.parametrize("stereo", ["first", "mean"])
def test_stereo_first_or_mean(tmp_path, stereo):
    """stereo='first' keeps channel 0 (the reference's wav[0]); 'mean' averages the channels (librosa)."""
    path = tmp_path / "stereo.wav"
    sf.write(path, _tone(16000, 1.5, freqs=(440.0, 1000.0)), 16000, subtype="FLOAT")
    raw, _ = sf.read(path, dtype="float32", always_2d=True)
    y = load_audio(path, 16000, 1.0, stereo=stereo)
    np.testing.assert_array_equal(y, (raw[:, 0] if stereo == "first" else raw.mean(axis=1))[:16000])
    other = load_audio(path, 16000, 1.0, stereo="mean" if stereo == "first" else "first")
    assert np.abs(y - other).max() > 0.1
    with pytest.raises(ValueError, match="stereo"):
        load_audio(path, 16000, 1.0, stereo="left")


@pytest.mark.parametrize("fmt", ["FLAC", "OGG", "MP3"])
def test_compressed_formats(tmp_path, fmt):
    x = _tone(44100, 2.0)
    path = tmp_path / f"a.{fmt.lower()}"
    sf.write(path, x, 44100, format=fmt)
    y = load_audio(path, clip_seconds=1.5)
    raw, sr = sf.read(path, dtype="float32", always_2d=True)
    ref = soxr.resample(raw[:, 0], sr, 16000, quality="HQ")[:24000]
    assert y.shape == (24000,)
    np.testing.assert_allclose(y, ref, atol=1e-6)


def test_short_clip_is_repeat_padded(tmp_path):
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (16000 * 3 // 2, 1)).astype(np.float32)
    sf.write(tmp_path / "s.wav", x, 16000, subtype="FLOAT")
    y = load_audio(tmp_path / "s.wav", clip_seconds=4.0)
    assert y.shape == (64000,)
    np.testing.assert_array_equal(y[:24000], x[:, 0])
    np.testing.assert_array_equal(y[24000:48000], x[:, 0])
    np.testing.assert_array_equal(y[48000:], x[:16000, 0])


def test_quirk_rate_44k(tmp_path):
    x = _tone(16000, 2.0)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    y = load_audio(tmp_path / "a.wav", sample_rate=44100, clip_seconds=1.0)
    assert y.shape == (44100,)
    np.testing.assert_allclose(y, soxr.resample(x[:, 0], 16000, 44100, quality="HQ")[:44100], atol=1e-6)


@pytest.mark.parametrize("kind,reason", [
    ("empty", "empty file"), ("random", "unreadable audio"), ("silence", "silence (RMS -inf dBFS ≤ -60 dBFS)"),
    ("short", "too short"), ("header_only", "unreadable audio")])
def test_bad_audio_raises_with_path(tmp_path, kind, reason):
    path = tmp_path / f"bad_{kind}.mp3"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(1).bytes(5000))
    elif kind == "silence":
        path = tmp_path / "silence.wav"
        sf.write(path, np.zeros((32000, 1), np.float32), 16000)
    elif kind == "short":
        path = tmp_path / "short.wav"
        sf.write(path, _tone(16000, 0.2), 16000)
    else:
        buf = io.BytesIO()
        sf.write(buf, _tone(16000, 2.0), 16000, format="WAV")
        path = tmp_path / "hdr.wav"
        path.write_bytes(buf.getvalue()[:30])
    with pytest.raises(AudioDecodeError) as e:
        load_audio(path)
    assert str(e.value).startswith(str(path)) and reason in e.value.reason


def _quiet_files(tmp_path):
    """16-bit wavs: white noise at −78 dBFS RMS (a 'silent' track's codec noise) and a −40 dBFS tone."""
    rng = np.random.default_rng(0)
    noise, tone = tmp_path / "noise.wav", tmp_path / "tone.wav"
    sf.write(noise, rng.standard_normal(32000).astype(np.float32) * 10 ** (-78 / 20), 16000, subtype="PCM_16")
    sf.write(tone, _tone(16000, 2.0, amp=np.sqrt(2) * 10 ** (-40 / 20)), 16000, subtype="PCM_16")
    return noise, tone


def test_silence_is_an_rms_level_in_dbfs(tmp_path):
    noise, tone = _quiet_files(tmp_path)
    raw, _ = sf.read(noise, dtype="float32")
    assert np.abs(raw).max() > 4 / 32768  # well above one LSB: the old peak ≤ 1/32768 rule kept it
    assert rms_dbfs(raw) == pytest.approx(-78, abs=0.3) and rms_dbfs(np.zeros(4)) == -np.inf
    with pytest.raises(AudioDecodeError, match=r"silence \(RMS -7[78]\.\d dBFS ≤ -60 dBFS\)"):
        load_audio(noise)
    assert rms_dbfs(load_audio(tone, clip_seconds=2.0)) == pytest.approx(-40, abs=0.1)  # kept
    assert load_audio(noise, clip_seconds=2.0, silence_dbfs=-80).shape == (32000,)  # lower threshold: kept
    assert load_audio(noise, clip_seconds=2.0, silence_dbfs=None).shape == (32000,)
    with pytest.raises(AudioDecodeError, match=r"silence \(RMS -40\.0 dBFS ≤ -30 dBFS\)"):
        load_audio(tone, silence_dbfs=-30)


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def _ref_resize(rgb: np.ndarray, h, w, crop=True):
    """Independent reference: centre crop written with integer arithmetic, PIL bicubic."""
    ih, iw = rgb.shape[:2]
    img = Image.fromarray(rgb)
    if crop:
        if iw * h > ih * w:
            cw = round(ih * w / h)
            img = img.crop(((iw - cw) // 2, 0, (iw - cw) // 2 + cw, ih))
        else:
            ch = round(iw * h / w)
            img = img.crop((0, (ih - ch) // 2, iw, (ih - ch) // 2 + ch))
    return np.asarray(img.resize((w, h), Image.Resampling.BICUBIC))


def test_image_modes_to_rgb(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    out = load_image(_save(Image.fromarray(rgb), tmp_path / "a.png"), 32, 32)
    np.testing.assert_array_equal(out, _ref_resize(rgb, 32, 32))
    # no crop: the reference's 512x320 stretch
    out = load_image(tmp_path / "a.png", 20, 32, crop=False)
    np.testing.assert_array_equal(out, np.asarray(Image.fromarray(rgb).resize((32, 20), Image.Resampling.BICUBIC)))
    # 16-bit grayscale: value v → round(v·255/65535) replicated in 3 channels
    g16 = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 16).astype(np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    out = load_image(tmp_path / "g16.png", 64, 64)
    np.testing.assert_array_equal(out[..., 0], np.rint(g16 * (255 / 65535)).astype(np.uint8))
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    # palette with transparency → composited over white
    pal = Image.new("P", (40, 40), 0)
    pal.putpalette([255, 0, 0] + [0, 0, 255] * 255)
    pal.paste(1, (0, 20, 40, 40))
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal.png", transparency=1)
    out = load_image(tmp_path / "pal.png", 40, 40)
    assert tuple(out[5, 5]) == (255, 0, 0) and tuple(out[30, 30]) == (255, 255, 255)
    # RGBA webp, half-transparent black over white → mid gray
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 3] = 128
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.webp", lossless=True)
    out = load_image(tmp_path / "a.webp", 40, 40)
    assert np.all(np.abs(out.astype(int) - 127) <= 1)
    # CMYK JPEG (cyan-free magenta+yellow = red)
    Image.new("CMYK", (40, 40), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    out = load_image(tmp_path / "cmyk.jpg", 32, 32)
    assert out.shape == (32, 32, 3) and np.all(np.abs(out.astype(int) - [255, 0, 0]) <= 3)


def test_exif_orientation(tmp_path):
    rgb = np.zeros((40, 80, 3), np.uint8)  # wide, left half white
    rgb[:, :40] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° CW to display
    Image.fromarray(rgb).save(tmp_path / "r.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "r.jpg", 80, 40, crop=False)  # displayed image is 40 wide, 80 high
    assert out.shape == (80, 40, 3)
    assert out[:30].mean() > 200 and out[50:].mean() < 50  # former left half is now on top


@pytest.mark.parametrize("kind,reason", [
    ("truncated", "unreadable image"), ("text", "not an image"), ("tiny", "too small"), ("empty", "empty")])
def test_bad_images(tmp_path, kind, reason):
    if kind == "truncated":
        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
        path = tmp_path / "t.jpg"
        path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif kind == "text":
        path = tmp_path / "t.png"
        path.write_text("this is not a png\n")
    elif kind == "tiny":
        path = _save(Image.new("RGB", (1, 1), (9, 9, 9)), tmp_path / "t.png")
    else:
        path = tmp_path / "e.jpg"
        path.write_bytes(b"")
    with pytest.raises(ImageDecodeError) as e:
        load_image(path, 32, 32)
    assert str(e.value).startswith(str(path)) and reason in e.value.reason


def test_stretch_build_option_square_without_crop(tmp_path):
    """--stretch: the whole (non-square) image resized to image_size² (no crop), in the config name."""
    cfg = builder.make_config("folders", image_size=32, stretch=True, image_format="png")
    assert cfg.name == "folders-32px-nocrop" and not cfg.center_crop
    assert builder.make_config("folders", image_size=32).center_crop
    src = np.random.default_rng(0).integers(0, 256, (40, 64, 3), np.uint8)
    Image.fromarray(src).save(tmp_path / "wide.png")
    cache = tmp_path / "cached.png"
    assert jobs.image_job((str(tmp_path / "wide.png"), str(cache), cfg.image_height, cfg.image_width,
                           cfg.center_crop, cfg.image_format)) is None
    stretched = np.asarray(Image.fromarray(src).resize((32, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(np.asarray(Image.open(cache)), stretched)
