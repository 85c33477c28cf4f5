"""The music–image dataset: TFDS builder `music_image`, decoding, pairing and the input pipeline.

Import-light: tensorflow_datasets is only imported by the functions that need it.
  build:     `python -m mtok_jax.data.build ...` or `mtok_jax.data.builder.build(...)`
  read:      `load_examples(data_dir, split)`; training batches: `mtok_jax.data.pipeline.batches`
"""

from __future__ import annotations

from typing import Iterator, Optional


def load_examples(data_dir, split: str, config_name: Optional[str] = None, *, seed: int = 0,
                  epoch: int = 0) -> Iterator[dict]:
    """Yield every example of a built split as a dict (stored order).

    Keys: 'audio' float32 [clip_samples] in [-1, 1) (16 kHz; 44.1 kHz with the quirk config),
    'image' uint8 [H, W, 3] RGB, 'label' int, 'audio_id' / 'image_id' (source paths relative to the
    manual dir). 'train' shows the (seed, epoch) training pairing; 'validation'/'test' the stored
    pairing; '<split>_images' yields image-only dicts (no 'audio', 'audio_id').
    `config_name` may be omitted when data_dir holds a single built config.
    """
    from mtok_jax.data.pipeline import iter_examples

    return iter_examples(data_dir, split, config_name, seed=seed, epoch=epoch)


__all__ = ["load_examples"]
