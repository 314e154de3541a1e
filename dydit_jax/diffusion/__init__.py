"""Gaussian diffusion for DiT/DyDiT: schedules, losses, respacing, samplers and guidance.

`create_diffusion` mirrors DiT's factory; how a sampling chain runs (DDPM / DDIM steps, the one
scan `run_chain`, consecutive pieces `run_pieces`) lives in `samplers`, classifier-free guidance
(model-agnostic) in `guidance`.
"""
from dydit_jax.diffusion.gaussian import (PREDICTIONS, GaussianDiffusion, LossType, ModelMeanType,
                                          ModelVarType, get_named_beta_schedule)
from dydit_jax.diffusion.guidance import cfg_labels, forward_with_cfg, guided
from dydit_jax.diffusion.respace import SpacedDiffusion, create_diffusion, space_timesteps
from dydit_jax.diffusion.samplers import (ddim_sample, ddim_step, ddpm_sample, ddpm_step,
                                          row_noise, run_chain, run_pieces, sampling_timesteps)

__all__ = [
    "PREDICTIONS", "GaussianDiffusion", "LossType", "ModelMeanType", "ModelVarType", "SpacedDiffusion",
    "cfg_labels", "create_diffusion", "ddim_sample", "ddim_step", "ddpm_sample", "ddpm_step",
    "forward_with_cfg", "get_named_beta_schedule", "guided", "row_noise", "run_chain", "run_pieces",
    "sampling_timesteps", "space_timesteps",
]
