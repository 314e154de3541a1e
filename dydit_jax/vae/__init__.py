"""The Stable Diffusion VAE (AutoencoderKL) that maps images to DiT's latents and back: geometry
(`config`), the NNX network (`model`), VAE directories (`checkpoints`: `load_vae`) and the PyTorch
converter (`convert`, `python -m dydit_jax.vae.convert`)."""
from dydit_jax.vae.checkpoints import load_vae, save_vae
from dydit_jax.vae.config import SD_VAE, VAEConfig, tiny_vae_config
from dydit_jax.vae.model import AutoencoderKL, Posterior

__all__ = ["AutoencoderKL", "Posterior", "SD_VAE", "VAEConfig", "load_vae", "save_vae", "tiny_vae_config"]
