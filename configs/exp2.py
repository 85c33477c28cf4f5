"""Experiment 2, "model 2" (thesis §5): train embedder + BEATs + UNet (text encoder and VAE frozen).

  python train.py --config configs/exp2.py \
      --config.model.sd_path=/path/to/stable-diffusion-v1-4 --config.model.beats_path=/path/to/beats

50 epochs, lr 1e-5 cosine, batch 8 / 8, AdamW; best epoch by validation loss (thesis: 36). 958.7 M
trainable parameters: fp32 params + Adam = 10.7 GiB, sharded over the `fsdp` mesh axis when
`--config.mesh.fsdp` > 1. `train.remat` is on. Per device at 512 px, batch 8, bf16 compute
(`--config.model.dtype=bfloat16`), XLA's memory analysis (python -m mtok_jax.memory --table):
61.3 GiB on 1 device, 10.6 GiB on 8 (mesh fsdp=8, batch 1 per device), 10.9 GiB on 32 (batch 32).
On one 24 GiB machine without an accelerator, float32 at 256 px and batch 1
(`--config.data.image_size=256 --config.train.batch_size=1 --config.train.update_unet_first=True`): peak
RSS 18.4 GiB (18.0 resuming),
≈33 s/step on 2 cores (README "Memory per device").
Launch recipes (one 8-GPU node, SLURM, TPU slices): README "Launch recipes".
Expected runtime (an estimate, not measured here): ≈19 TFLOP/step at 512 px; on one H100 roughly
0.8 s/step, ~35 min/epoch, ~30 h in total.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.workdir_name = "exp2"
    c.train.trainable = "embedder|beats|unet"
    c.train.epochs = 50
    c.train.lr = 1e-5
    c.train.val_batch_size = 8
    c.train.remat = True  # same step; activations recomputed in the backward pass
    return c
