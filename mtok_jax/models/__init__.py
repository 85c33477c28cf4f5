"""Flax models (BEATs, embedder, text tower, diffusion wrappers). Import submodules directly."""
