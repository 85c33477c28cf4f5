"""mtok_jax: music → BEATs → audio token → CLIP text states → Stable Diffusion (JAX/Flax)."""

from mtok_jax import _compat as _compat  # noqa: F401  (sets USE_TF=0 before transformers loads)

__version__ = "0.1.0"
