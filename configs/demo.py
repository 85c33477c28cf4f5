"""Built-in demo: tiny random models in the real formats + the synthetic `demo` dataset, CPU-sized.

  make demo        # writes demo_assets/, trains this config into runs/demo/, samples one image per label
  python train.py --config configs/demo.py          # training only (needs demo_assets/)

Same code path as the thesis experiments at toy sizes: CLIP text width 32, UNet (64, 64) channels on
4×4 latents (a VAE with SD's downsampling factor 8 on 32×32 images), 4 s clips, BEATs with 4 layers of
width 32. The embedder and the UNet train (a random tiny UNet must learn to denoise before the audio
token can steer it; BEATs, CLIP and the VAE stay frozen; the VAE is fitted on synthetic demo images
when demo_assets/ is written, the rest is random). 144 training / 36 validation clips, batch 8 →
18 steps per epoch, 40 epochs (720 steps): lr 3e-3 after a 2-epoch warm-up, cosine decay (without
the warm-up 3e-3 collapses to predicting zero noise; 2e-3 learns the hues less well). 10 % of the
training examples see the empty prompt's states instead of the audio token's (`train.uncond_prob`,
classifier-free-guidance dropout): without it the guided images of every label looked alike.
A validation grid every 4 epochs (≈ 2.5 s each on this CPU).
Measured on the shared 2-core CPU (fresh clone): training 271 s, validation loss 0.58 → 0.103; the
demo report's AIS / IIS / GIILS 59.98 / 61.03 / 63.47 for the trained model against 48.82 / 48.72 /
50.43 untrained; the whole `make demo` 505 s.
"""

from configs import default

ROOT = "demo_assets"
IMAGE_SIZE = 32  # the demo models' size (mtok_jax.demo.models.DEMO_IMAGE_SIZE; tests/test_demo_models.py)
BEATS_LAYERS = (1, 2, 3)  # 0-based blocks of the 4-layer demo BEATs concatenated for the embedder


def get_config():
    c = default.get_config()
    c.workdir_name = "demo"
    c.model.sd_path = f"{ROOT}/sd"
    c.model.beats_path = f"{ROOT}/beats"
    c.model.beats_layers = BEATS_LAYERS
    c.data.data_dir = f"{ROOT}/data"
    c.data.builder_config = "demo"
    c.data.clip_seconds = 4.0
    c.data.image_size = IMAGE_SIZE
    c.train.trainable = "embedder|unet"
    c.train.epochs = 40
    c.train.batch_size = 8
    c.train.val_batch_size = 8
    c.train.lr = 3e-3
    c.train.warmup_steps = 36
    c.train.schedule = "cosine"
    c.train.log_every = 6
    c.train.checkpoint_every = 180
    c.train.uncond_prob = 0.1
    c.train.sample_every_epochs = 4
    c.train.sample_steps = 10
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.sample.num_images = 1
    c.sample.steps = 20
    c.metrics.clip_path = f"{ROOT}/metrics/clip"
    c.metrics.inception_path = f"{ROOT}/metrics/inception"
    c.metrics.wav2clip_path = f"{ROOT}/metrics/wav2clip"
    c.metrics.num_images = 36
    c.metrics.per_label = 2
    c.metrics.generated_format = "png"
    return c
