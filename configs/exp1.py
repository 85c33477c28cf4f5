"""Experiment 1, "music-image conditional model 1" (thesis §5): train the embedder only.

  python train.py --config configs/exp1.py \
      --config.model.sd_path=/path/to/stable-diffusion-v1-4 --config.model.beats_path=/path/to/beats

25 epochs, lr 8e-5 cosine, batch 8 (validation 1), AdamW; best epoch by validation loss (thesis: 21).
Expected runtime (an estimate from the FLOP count, not measured here): 19,366 training clips =
2,421 steps/epoch; on one H100 (bf16, 512 px, frozen UNet ≈13 TFLOP/step) roughly 0.5 s/step, i.e.
~20 min/epoch and ~9 h for 25 epochs plus validation.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.workdir_name = "exp1"  # the thesis settings above are the defaults (configs/default.py)
    return c
