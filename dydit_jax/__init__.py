"""dydit_jax: DiT and Dynamic Diffusion Transformers (DyDiT) in JAX / Flax NNX."""
__version__ = "0.1.0"
