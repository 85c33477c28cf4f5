"""mtok_jax: music → BEATs → audio token → CLIP text states → Stable Diffusion (JAX/Flax)."""

from mtok_jax import _compat as _compat  # sets USE_TF=0 before transformers loads

_compat.hide_broken_torchvision()

__version__ = "0.1.0"
