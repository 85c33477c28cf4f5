"""Kaldi fbank (JAX) against the torchaudio golden tensors (docs/design.md §4.1.2, §4.1.4)."""

import numpy as np
import pytest

import jax

from mtok_jax.audio import beats_normalize, kaldi_fbank, kaldi_mel_banks, num_frames, povey_window


@pytest.fixture(scope="module")
def golden(golden_dir):
    return np.load(golden_dir / "beats_small.npz")


@pytest.fixture(scope="module")
def batch(golden):
    """[wav_10s, wav_3p3s zero-padded] → fbank via one jitted call."""
    wav = np.stack([golden["wav_10s"], np.pad(golden["wav_3p3s"], (0, 160000 - 52800))])
    return np.asarray(jax.jit(kaldi_fbank)(wav))


def test_window_and_mel_banks_match_torchaudio(golden):
    np.testing.assert_allclose(povey_window(400), golden["kaldi/povey_window_400"], atol=3e-7, rtol=0)
    banks = kaldi_mel_banks(128, 512, 16000.0)
    assert banks.shape == (128, 257) and banks.dtype == np.float32
    np.testing.assert_allclose(banks[:, :256], golden["kaldi/mel_banks_128x256"], atol=5e-5, rtol=0)
    assert np.all(banks[:, 256] == 0)
    assert np.all(banks[3] == 0)                     # the empty filter torchaudio keeps


def test_fbank_from_waveform_matches_golden(golden, batch):
    assert num_frames(160000) == 998 and num_frames(52800) == 328 and num_frames(399) == 0
    raw_a = golden["a_10s/fbank_raw"][0]
    assert batch.shape == (2, 998, 128) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0], raw_a, atol=5e-3, rtol=0)
    assert np.abs(batch[0] - raw_a).mean() < 2e-5
    np.testing.assert_allclose(batch, golden["pad_batch/fbank_raw"], atol=5e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(beats_normalize(batch)), golden["pad_batch/fbank"], atol=5e-4, rtol=0)
    # empty mel filter 3 → log(float32 eps) everywhere
    np.testing.assert_array_equal(batch[..., 3], np.float32(np.log(np.finfo(np.float32).eps)))


def test_fbank_unbatched_short_clip(golden):
    raw = np.asarray(kaldi_fbank(golden["wav_3p3s"]))        # 1-D input, eager
    assert raw.shape == (328, 128)
    np.testing.assert_allclose(raw, golden["b_3p3s/fbank_raw"][0], atol=5e-3, rtol=0)
    np.testing.assert_allclose(np.asarray(beats_normalize(raw)), golden["b_3p3s/fbank"][0], atol=5e-4, rtol=0)
    with pytest.raises(ValueError, match="shorter than one"):
        kaldi_fbank(np.zeros((1, 300), np.float32))
