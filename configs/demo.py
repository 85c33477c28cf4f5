"""Built-in demo: tiny random models in the real formats + the synthetic `demo` dataset, CPU-sized.

  make demo        # writes demo_assets/, trains this config into runs/demo/, samples one image per label
  python train.py --config configs/demo.py          # training only (needs demo_assets/)

Same code path as the thesis experiments at toy sizes: CLIP text width 32, UNet (128, 128) channels on
4×4 latents (a VAE with SD's downsampling factor 8 on 32×32 images), 4 s clips, BEATs with 4 layers of
width 32. The embedder and the UNet train (a random tiny UNet must learn to denoise before the audio
token can steer it; BEATs, CLIP and the VAE stay frozen; the VAE is fitted on synthetic demo images
when demo_assets/ is written, the rest is random). 144 training / 36 validation clips, batch 8 →
18 steps per epoch, 40 epochs (720 steps): lr 3e-3 after a 2-epoch warm-up, cosine decay (without
the warm-up 3e-3 collapses to predicting zero noise; 2e-3 learns the hues less well).
Measured on the shared 2-core CPU (fresh clone): training 507 s including a validation grid every
epoch (~3.5 s each), validation loss 0.47 → 0.083; sampled images follow the label's hue
(orange/yellow for the first labels, green, cyan/blue, then pink/magenta); the whole `make demo` 794 s.
"""

from configs import default
from mtok_jax.demo.models import DEMO_BEATS_LAYERS, DEMO_IMAGE_SIZE

ROOT = "demo_assets"


def get_config():
    c = default.get_config()
    c.workdir_name = "demo"
    c.model.sd_path = f"{ROOT}/sd"
    c.model.beats_path = f"{ROOT}/beats"
    c.model.beats_layers = tuple(DEMO_BEATS_LAYERS)
    c.data.data_dir = f"{ROOT}/data"
    c.data.builder_config = "demo"
    c.data.clip_seconds = 4.0
    c.data.image_size = DEMO_IMAGE_SIZE
    c.train.trainable = "embedder|unet"
    c.train.epochs = 40
    c.train.batch_size = 8
    c.train.val_batch_size = 8
    c.train.lr = 3e-3
    c.train.warmup_steps = 36
    c.train.schedule = "cosine"
    c.train.log_every = 6
    c.train.checkpoint_every = 180
    c.train.sample_every_epochs = 1
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
