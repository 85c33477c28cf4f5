"""Audio front-end: Kaldi log-mel fbank in JAX and the BEATs input normalisation."""

from mtok_jax.audio.fbank import (  # noqa: F401
    BEATS_FBANK_MEAN,
    BEATS_FBANK_STD,
    beats_normalize,
    kaldi_fbank,
    kaldi_mel_banks,
    num_frames,
    povey_window,
)

__all__ = ["kaldi_fbank", "beats_normalize", "kaldi_mel_banks", "povey_window", "num_frames",
           "BEATS_FBANK_MEAN", "BEATS_FBANK_STD"]
