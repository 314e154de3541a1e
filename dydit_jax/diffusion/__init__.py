"""Gaussian diffusion for DiT/DyDiT: schedules, losses, respacing and samplers.

`create_diffusion` mirrors DiT's factory; samplers live in `dydit_jax.diffusion.samplers`.
"""
from dydit_jax.diffusion.gaussian import (GaussianDiffusion, LossType, ModelMeanType,
                                          ModelVarType, get_named_beta_schedule)
from dydit_jax.diffusion.respace import SpacedDiffusion, create_diffusion, space_timesteps
from dydit_jax.diffusion.samplers import (ddim_sample, ddim_step, ddpm_sample, ddpm_step,
                                          run_chain, sampling_timesteps)

__all__ = [
    "GaussianDiffusion", "LossType", "ModelMeanType", "ModelVarType", "SpacedDiffusion",
    "create_diffusion", "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step",
    "get_named_beta_schedule", "run_chain", "sampling_timesteps", "space_timesteps",
]
