"""Preliminary model 2 (thesis §5): as prelim1 with a cosine schedule, 13 epochs and λ_l2 = 0.01.

  python train.py --config configs/prelim2.py \
      --config.model.sd_path=/path/to/stable-diffusion-v1-4 --config.model.beats_path=/path/to/beats

The script sized its cosine for max_train_steps × accumulation (warm-up 500 × 4) while stepping it once
per update, so its lr ended at 86 % of the peak; `--config.train.schedule_sized_in_micro_batches=True`
reproduces that (the default decays to 0 over the run).

Expected runtime on one H100 (estimate): ~25 min/epoch, ~5.5 h in total.
"""

from configs import prelim1


def get_config():
    c = prelim1.get_config()
    c.workdir_name = "prelim2"
    c.train.epochs = 13
    c.train.schedule = "cosine"
    c.train.warmup_steps = 500  # the script's lr_warmup_steps (its cosine uses it)
    c.train.lambda_l2 = 0.01
    return c
