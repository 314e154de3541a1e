"""Respacing: sample with a subset of the training chain's timesteps, and DiT's factory.

A respaced chain keeps timesteps S = {s_0 < s_1 < ...} of the original chain and
gets new betas beta'_i = 1 - abar[s_i] / abar[s_{i-1}] (abar before s_0 = 1), so its
cumulative products equal the original ones at the kept steps. All posterior and
learned-variance tables are then those of the SPACED chain, while the model is still
called with the original timesteps s_i (`timestep_map`): DiT's network sees
t = 999, 995, ..., 4, 0 when sampling with 250 steps, never a rescaled t.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from dydit_jax.diffusion.gaussian import (PREDICTIONS, GaussianDiffusion, LossType, ModelVarType,
                                          get_named_beta_schedule)


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> list[int]:
  """Timesteps of the original chain to keep, sorted ascending.

  Args:
    num_timesteps: length of the original chain.
    section_counts: steps per equal-size section of the original chain, as a list of
      ints or a comma-separated string ("250", "10,15,20"; earlier sections absorb the
      remainder of an uneven split). "ddimN" instead takes the integer stride i for
      which range(0, num_timesteps, i) has exactly N elements (DDIM paper striding).

  Returns:
    Sorted list of kept timesteps.
  """
  if isinstance(section_counts, str):
    if section_counts.startswith("ddim"):
      desired = int(section_counts[len("ddim"):])
      for stride in range(1, num_timesteps):
        if len(range(0, num_timesteps, stride)) == desired:
          return list(range(0, num_timesteps, stride))
      raise ValueError(f"cannot take exactly {desired} of {num_timesteps} steps "
                       "with an integer stride")
    section_counts = [int(c) for c in section_counts.split(",")]
  size_per, extra = divmod(num_timesteps, len(section_counts))
  start = 0
  kept = set()
  for i, count in enumerate(section_counts):
    size = size_per + (1 if i < extra else 0)
    if size < count:
      raise ValueError(f"cannot divide a section of {size} steps into {count}")
    stride = 1.0 if count <= 1 else (size - 1) / (count - 1)
    # Accumulate the fractional position (rather than k * stride) and round with
    # Python's round-half-to-even: the reference does both, and the kept steps must
    # match it exactly.
    position = 0.0
    for _ in range(count):
      kept.add(start + round(position))
      position += stride
    start += size
  return sorted(kept)


class SpacedDiffusion(GaussianDiffusion):
  """A `GaussianDiffusion` over a subset of a base chain's timesteps."""

  def __init__(self, use_timesteps: Iterable[int], betas, **kwargs):
    """Builds the spaced chain.

    Args:
      use_timesteps: original timesteps to keep (any order; duplicates ignored).
      betas: float64 betas of the ORIGINAL chain.
      **kwargs: model_mean_type, model_var_type, loss_type for `GaussianDiffusion`.
    """
    base_betas = np.asarray(betas, dtype=np.float64)
    kept = np.asarray(sorted(set(int(s) for s in use_timesteps)), dtype=np.int64)
    if kept.size == 0 or kept[0] < 0 or kept[-1] >= base_betas.shape[0]:
      raise ValueError("use_timesteps must be non-empty and inside the base chain")
    self.original_num_steps = int(base_betas.shape[0])
    alphas_cumprod = np.cumprod(1.0 - base_betas)[kept]
    previous = np.append(1.0, alphas_cumprod[:-1])
    super().__init__(1.0 - alphas_cumprod / previous, timestep_map=kept, **kwargs)


def create_diffusion(timestep_respacing: str | Sequence[int] | None = "",
                     noise_schedule: str = "linear", use_kl: bool = False,
                     sigma_small: bool = False, prediction: str = "eps",
                     learn_sigma: bool = True, rescale_learned_sigmas: bool = False,
                     diffusion_steps: int = 1000) -> SpacedDiffusion:
  """DiT's diffusion factory: defaults give eps-prediction, learned-range variance, MSE loss.

  Args:
    timestep_respacing: "" or None for all `diffusion_steps` steps (training), else
      `space_timesteps` section counts such as "250" or "ddim50" (sampling).
    noise_schedule: "linear" (DiT) or "squaredcos_cap_v2".
    use_kl: train on the rescaled variational bound only.
    sigma_small: with fixed variance, use the posterior variance instead of beta.
    prediction: what the model's mean channels predict: "eps" (DiT), "x0" or "v" (velocity).
    learn_sigma: the model outputs [mean | v] with LEARNED_RANGE variance.
    rescale_learned_sigmas: scale the VB term by num_timesteps / 1000 (RESCALED_MSE).
    diffusion_steps: length of the original chain.
  """
  if prediction not in PREDICTIONS:
    raise ValueError(f"prediction must be one of {sorted(PREDICTIONS)}, got {prediction!r}")
  betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
  if use_kl:
    loss_type = LossType.RESCALED_KL
  elif rescale_learned_sigmas:
    loss_type = LossType.RESCALED_MSE
  else:
    loss_type = LossType.MSE
  if learn_sigma:
    var_type = ModelVarType.LEARNED_RANGE
  else:
    var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
  if not timestep_respacing:
    timestep_respacing = [diffusion_steps]
  return SpacedDiffusion(
      space_timesteps(diffusion_steps, timestep_respacing), betas,
      model_mean_type=PREDICTIONS[prediction],
      model_var_type=var_type, loss_type=loss_type)
