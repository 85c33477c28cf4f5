"""The music–image dataset: TFDS builder `music_image`, decoding, pairing and the input pipeline.

Reading is light (tensorflow_datasets loads on the first dataset opened); building imports it.
  build:     `python -m mtok_jax.data.build ...` or `mtok_jax.data.music_image.build(...)`
  read:      `load_examples(data_dir, split)`; training batches: `mtok_jax.data.pipeline.batches`
"""

from mtok_jax.data.pipeline import iter_examples as load_examples

__all__ = ["load_examples"]
