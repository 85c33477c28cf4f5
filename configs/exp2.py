"""Experiment 2, "model 2" (thesis §5): train embedder + BEATs + UNet (text encoder and VAE frozen).

  python train.py --config configs/exp2.py \
      --config.model.sd_path=/path/to/stable-diffusion-v1-4 --config.model.beats_path=/path/to/beats

50 epochs, lr 1e-5 cosine, batch 8 / 8, AdamW; best epoch by validation loss (thesis: 36). The UNet is
sharded over the `fsdp` mesh axis when `--config.mesh.fsdp` > 1 (fp32 params + Adam ≈ 14 GB).
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
    return c
