"""mtok_jax: music → BEATs → audio token → CLIP text states → Stable Diffusion (JAX/Flax)."""

from mtok_jax import environment  # sets USE_TF=0 before transformers loads

environment.hide_broken_torchvision()

__version__ = "0.1.0"
