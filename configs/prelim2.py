"""Preliminary model 2 (thesis §5): as prelim1 with a cosine schedule, 13 epochs and λ_l2 = 0.01.

  python train.py --config configs/prelim2.py \
      --config.model.sd_path=/path/to/stable-diffusion-v1-4 --config.model.beats_path=/path/to/beats

Expected runtime on one H100 (estimate): ~25 min/epoch, ~5.5 h in total.
"""

from configs import prelim1


def get_config():
    c = prelim1.get_config()
    c.workdir_name = "prelim2"
    c.train.epochs = 13
    c.train.schedule = "cosine"
    c.train.lambda_l2 = 0.01
    return c
