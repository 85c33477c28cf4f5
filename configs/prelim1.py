"""Preliminary model 1 (thesis §5): embedder only, 8 epochs, lr 8e-5 constant, batch 1 × accumulation 4.

  python train.py --config configs/prelim1.py \
      --config.model.sd_path=/path/to/stable-diffusion-v1-4 --config.model.beats_path=/path/to/beats

Each optimizer step sees 4 clips (same update as one batch of 4). The script instead summed the 4
micro-batch gradients, each with its own cosine term (Σᵢ (1 − cosᵢ)²); `--config.train.faithful_accumulation=True`
reproduces that. Expected runtime on one H100 (estimate):
4,842 steps/epoch at ~0.3 s → ~25 min/epoch, ~3.5 h in total.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.workdir_name = "prelim1"
    c.train.epochs = 8
    c.train.schedule = "constant"
    c.train.warmup_steps = 0  # diffusers' "constant" ignores the script's lr_warmup_steps
    c.train.batch_size = 1
    c.train.grad_accum = 4
    c.mesh.data = 1  # a micro-batch of 1 cannot be split over devices
    return c
