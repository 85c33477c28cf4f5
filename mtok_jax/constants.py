"""Facts the whole package shares; this module imports nothing.

The parameter tree of a system has one top-level key per part, in data-flow order:
audio → `beats` → `embedder` → `text` (CLIP text encoder) → `unet` → `vae` (docs/design.md §1).
"""

SAMPLE_RATE = 16000  # Hz: BEATs' front-end (kaldi fbank) and every stored clip
REFERENCE_SAMPLE_RATE = 44100  # Hz: quirk `data.audio_44k_as_16k` stores 44.1 kHz samples as if 16 kHz
PARTS = ("beats", "embedder", "text", "unet", "vae")
PROMPTS = ("train", "inference")  # config.prompt keys: the training and the sampling prompt
SAMPLERS = ("pndm", "ddim", "dpm", "euler")  # sample.scheduler choices (diffusers' Flax schedulers)
DTYPES = ("float32", "bfloat16")  # model.dtype choices (compute dtype; parameters stay float32)
ATTENTIONS = ("auto", "einsum", "xla", "cudnn", "blocked")  # model.attention choices (mtok_jax/models/attention.py)
CONVS = ("auto", "xla", "matmul")  # model.conv choices (mtok_jax/models/conv.py)
BEATS_ATTENTIONS = ("auto", "batched", "blocked")  # model.beats_attention choices (mtok_jax/models/beats.py)
