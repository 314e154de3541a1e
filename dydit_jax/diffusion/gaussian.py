"""Gaussian diffusion (IDDPM / ADM, as configured by DiT): schedule, posterior, losses.

Every schedule constant is computed once in float64 NumPy, exactly as the PyTorch
reference does, and is only cast to a JAX array (float32 for float32 or bfloat16
inputs) at the moment a traced function gathers it. Keeping the tables in float64
means the respaced chains (which divide cumulative products) lose no precision, and
the gathered float32 values match PyTorch's `_extract_into_tensor(...).float()`.

Arrays are NHWC: the model output's channel axis is the LAST axis, split as
[eps | v] when the variance is learned.

Timesteps: functions here take `t`, an int array of shape (B,) indexing THIS chain
(0 .. num_timesteps - 1). When the chain is respaced, `t` is the spaced index and the
model is called with `timestep_map[t]`, the ORIGINAL timestep it was trained on
(`model_fn(x, t_original)`, int32); see `respace.py`.
"""
from __future__ import annotations

import enum
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dydit_jax.diffusion import likelihoods

# model_fn(x_t, t_original) -> model output, (B, H, W, C) or (B, H, W, 2C).
ModelFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


class ModelMeanType(enum.Enum):
  """What the model's first C output channels predict."""
  START_X = enum.auto()  # x_0
  EPSILON = enum.auto()  # the noise added to x_0 (DiT)
  # v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, "Progressive Distillation"):
  # eps at low t, -x_0 at high t. Its plain MSE is eps's MSE weighted by 1 + 1/SNR(t), so the
  # high-t steps that decide a sample's global shape get a real share of the gradient; a small
  # model trained from scratch on a short budget learns them far sooner (the CPU demo's recipe).
  VELOCITY = enum.auto()


# The spelling a ModelConfig / config file uses for each ModelMeanType.
PREDICTIONS = {"eps": ModelMeanType.EPSILON, "x0": ModelMeanType.START_X, "v": ModelMeanType.VELOCITY}


class ModelVarType(enum.Enum):
  """How the reverse-process variance is obtained."""
  FIXED_SMALL = enum.auto()  # posterior variance beta-tilde
  FIXED_LARGE = enum.auto()  # beta (beta-tilde at t = 0 for a better decoder NLL)
  LEARNED_RANGE = enum.auto()  # model's v in [-1, 1] interpolates log beta-tilde .. log beta (DiT)


class LossType(enum.Enum):
  """Training objective; DiT uses MSE (eps MSE + unscaled VB term for the variance)."""
  MSE = enum.auto()
  RESCALED_MSE = enum.auto()  # VB term scaled by num_timesteps / 1000
  KL = enum.auto()  # variational bound only
  RESCALED_KL = enum.auto()  # VB scaled by num_timesteps, an estimate of the full bound


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
  """Betas that discretize a continuous cumulative product alpha_bar(s), s in [0, 1]."""
  betas = [min(1.0 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
           for i in range(num_timesteps)]
  return np.asarray(betas, dtype=np.float64)


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
  """Float64 betas of a named schedule.

  "linear" is Ho et al.'s 1e-4 .. 0.02 for 1000 steps, scaled by 1000 / T so other
  step counts describe the same process; "squaredcos_cap_v2" is IDDPM's cosine.
  """
  if name == "linear":
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
  if name == "squaredcos_cap_v2":
    return betas_for_alpha_bar(
        num_timesteps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
  raise ValueError(f"unknown beta schedule: {name!r}")


def compute_dtype(x: jnp.ndarray) -> jnp.dtype:
  """At least float32: bf16 activations must not degrade the diffusion arithmetic."""
  return jnp.promote_types(x.dtype, jnp.float32)


class GaussianDiffusion:
  """A discrete Gaussian diffusion chain with float64 NumPy tables.

  The object is plain Python: close over it (or pass it as a static argument) in
  jitted code; its tables become small constants of the compiled program.

  Attributes:
    betas: (T,) float64 betas of this chain.
    num_timesteps: T, the number of steps of this chain.
    timestep_map: (T,) int32, the original-chain timestep each step corresponds to
      (identity unless the chain was respaced).
  """

  def __init__(self, betas, *, model_mean_type: ModelMeanType = ModelMeanType.EPSILON,
               model_var_type: ModelVarType = ModelVarType.LEARNED_RANGE,
               loss_type: LossType = LossType.MSE, timestep_map=None):
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.shape[0] < 2:
      raise ValueError(f"betas must be 1-D with at least 2 steps, got shape {betas.shape}")
    if not ((betas > 0).all() and (betas <= 1).all()):
      raise ValueError("betas must lie in (0, 1]")
    self.model_mean_type = model_mean_type
    self.model_var_type = model_var_type
    self.loss_type = loss_type
    self.betas = betas
    self.num_timesteps = int(betas.shape[0])
    if timestep_map is None:
      timestep_map = np.arange(self.num_timesteps)
    self.timestep_map = np.asarray(timestep_map, dtype=np.int32)
    if self.timestep_map.shape != betas.shape:
      raise ValueError("timestep_map must have one entry per step")

    alphas = 1.0 - betas
    self.alphas_cumprod = np.cumprod(alphas)
    self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
    self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
    self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
    self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
    self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
    self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
    self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)
    self.log_betas = np.log(betas)

    # Posterior q(x_{t-1} | x_t, x_0). Its variance is 0 at t = 0, so the log is
    # "clipped" by reusing the t = 1 value there.
    self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
    self.posterior_log_variance_clipped = np.log(
        np.append(self.posterior_variance[1], self.posterior_variance[1:]))
    self.posterior_mean_coef1 = (
        betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod))
    self.posterior_mean_coef2 = (
        (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod))

  # ---------------------------------------------------------------- helpers

  @staticmethod
  def extract(table: np.ndarray, t: jnp.ndarray, x: jnp.ndarray) -> jnp.ndarray:
    """Gathers table[t] in x's compute dtype, shaped (B, 1, ..., 1) to broadcast on x."""
    values = jnp.asarray(table, dtype=compute_dtype(x))[t]
    return values.reshape(t.shape + (1,) * (x.ndim - t.ndim))

  def original_timesteps(self, t: jnp.ndarray) -> jnp.ndarray:
    """Maps indices of this chain to the original timesteps the model was trained on."""
    return jnp.asarray(self.timestep_map)[t]

  def call_model(self, model_fn: ModelFn, x: jnp.ndarray, t: jnp.ndarray) -> jnp.ndarray:
    """Runs the model at original timesteps and returns its output in compute dtype."""
    return model_fn(x, self.original_timesteps(t)).astype(compute_dtype(x))

  # ---------------------------------------------------------------- forward process

  def q_sample(self, x_start, t, noise):
    """Samples x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I) with given noise."""
    return (self.extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
            + self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

  def q_posterior_mean_variance(self, x_start, x_t, t):
    """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
    mean = (self.extract(self.posterior_mean_coef1, t, x_t) * x_start
            + self.extract(self.posterior_mean_coef2, t, x_t) * x_t)
    variance = self.extract(self.posterior_variance, t, x_t)
    log_variance = self.extract(self.posterior_log_variance_clipped, t, x_t)
    return mean, variance, log_variance

  def predict_xstart_from_eps(self, x_t, t, eps):
    """x_0 = x_t / sqrt(abar_t) - sqrt(1 / abar_t - 1) eps."""
    return (self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

  def predict_xstart_from_v(self, x_t, t, v):
    """x_0 = sqrt(abar_t) x_t - sqrt(1 - abar_t) v."""
    return (self.extract(self.sqrt_alphas_cumprod, t, x_t) * x_t
            - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v)

  def velocity(self, x_start, t, noise):
    """The v-prediction target sqrt(abar_t) eps - sqrt(1 - abar_t) x_0."""
    return (self.extract(self.sqrt_alphas_cumprod, t, x_start) * noise
            - self.extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * x_start)

  def predict_eps_from_xstart(self, x_t, t, pred_xstart):
    """Inverse of `predict_xstart_from_eps`."""
    return ((self.extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
            / self.extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

  # ---------------------------------------------------------------- reverse process

  def _model_variance(self, var_values, x, t):
    """(variance, log-variance) of p(x_{t-1} | x_t); `var_values` is the model's v (LEARNED_RANGE only).

    As the official code: with a fixed variance both come from their own tables, so FIXED_SMALL's
    variance is the posterior variance (0 at the last step) while its log-variance is the clipped
    one; a learned variance is the exponential of its interpolated log.
    """
    if self.model_var_type == ModelVarType.LEARNED_RANGE:
      min_log = self.extract(self.posterior_log_variance_clipped, t, x)
      max_log = self.extract(self.log_betas, t, x)
      frac = (var_values + 1.0) / 2.0
      log_variance = frac * max_log + (1.0 - frac) * min_log
      return jnp.exp(log_variance), log_variance
    if self.model_var_type == ModelVarType.FIXED_LARGE:
      variance = np.append(self.posterior_variance[1], self.betas[1:])
      log_variance = np.log(variance)
    else:
      variance, log_variance = self.posterior_variance, self.posterior_log_variance_clipped
    full = lambda table: jnp.broadcast_to(self.extract(table, t, x), x.shape)
    return full(variance), full(log_variance)

  def p_mean_variance_from_output(self, model_output, x, t, clip_denoised: bool = False):
    """Reverse-step distribution p(x_{t-1} | x_t) from an already computed model output.

    Args:
      model_output: (B, H, W, 2C) [eps, x0 or velocity | v] for LEARNED_RANGE, else (B, H, W, C).
      x: x_t, (B, H, W, C).
      t: (B,) int indices of this chain.
      clip_denoised: clamp the x_0 prediction to [-1, 1] (DiT samples with False).

    Returns:
      dict with "mean", "variance", "log_variance", "pred_xstart", each shaped like x.
    """
    channels = x.shape[-1]
    learned = self.model_var_type == ModelVarType.LEARNED_RANGE
    expected = 2 * channels if learned else channels
    if model_output.shape != x.shape[:-1] + (expected,):
      raise ValueError(f"model output {model_output.shape} does not match x {x.shape} "
                       f"with {expected} output channels")
    if learned:
      model_output, var_values = jnp.split(model_output, 2, axis=-1)
    else:
      var_values = None
    variance, log_variance = self._model_variance(var_values, x, t)

    if self.model_mean_type == ModelMeanType.EPSILON:
      pred_xstart = self.predict_xstart_from_eps(x, t, model_output)
    elif self.model_mean_type == ModelMeanType.VELOCITY:
      pred_xstart = self.predict_xstart_from_v(x, t, model_output)
    else:
      pred_xstart = model_output
    if clip_denoised:
      pred_xstart = jnp.clip(pred_xstart, -1.0, 1.0)
    mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
    return {"mean": mean, "variance": variance, "log_variance": log_variance,
            "pred_xstart": pred_xstart}

  def p_mean_variance(self, model_fn: ModelFn, x, t, clip_denoised: bool = False):
    """Calls the model at x_t and returns p(x_{t-1} | x_t); see `p_mean_variance_from_output`."""
    return self.p_mean_variance_from_output(self.call_model(model_fn, x, t), x, t, clip_denoised)

  # ---------------------------------------------------------------- losses

  def vb_terms_bpd(self, model_output, x_start, x_t, t):
    """One term of the variational bound, in bits per dimension, shape (B,).

    KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for t > 0; at t == 0 the
    discretized-Gaussian decoder NLL of x_0. Computed without clipping x_0.
    """
    true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
    out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
    kl = likelihoods.normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])
    kl = likelihoods.mean_flat(kl) / math.log(2.0)
    decoder_nll = -likelihoods.discretized_gaussian_log_likelihood(
        x_start, out["mean"], 0.5 * out["log_variance"])
    decoder_nll = likelihoods.mean_flat(decoder_nll) / math.log(2.0)
    return jnp.where(t == 0, decoder_nll, kl)

  def training_losses(self, model_fn: ModelFn, x_start, t, noise):
    """Per-sample training losses at chain indices `t` with the given noise.

    Args:
      model_fn: model_fn(x_t, t_original) -> output (see module docstring).
      x_start: x_0, (B, H, W, C).
      t: (B,) int indices of this chain (original timesteps when not respaced).
      noise: the Gaussian noise that diffuses x_0 to x_t, shaped like x_start.

    Returns:
      dict of (B,) arrays. MSE losses: "mse" (mean over H, W, C of the squared
      prediction error), "vb" (learned variance only: the VB term in bits with the
      model's mean under stop_gradient, so the VB trains only the variance head) and
      "loss" = mse + vb. KL losses: "loss" only.
    """
    dtype = compute_dtype(x_start)
    x_start = x_start.astype(dtype)
    noise = noise.astype(dtype)
    x_t = self.q_sample(x_start, t, noise)
    model_output = self.call_model(model_fn, x_t, t)

    if self.loss_type in (LossType.KL, LossType.RESCALED_KL):
      loss = self.vb_terms_bpd(model_output, x_start, x_t, t)
      if self.loss_type == LossType.RESCALED_KL:
        loss = loss * self.num_timesteps
      return {"loss": loss}

    terms = {}
    if self.model_var_type == ModelVarType.LEARNED_RANGE:
      mean_output, var_values = jnp.split(model_output, 2, axis=-1)
      frozen = jnp.concatenate([jax.lax.stop_gradient(mean_output), var_values], axis=-1)
      terms["vb"] = self.vb_terms_bpd(frozen, x_start, x_t, t)
      if self.loss_type == LossType.RESCALED_MSE:
        # IDDPM's rescale "for equivalence with the initial implementation".
        terms["vb"] = terms["vb"] * (self.num_timesteps / 1000.0)
      model_output = mean_output
    if self.model_mean_type == ModelMeanType.EPSILON:
      target = noise
    elif self.model_mean_type == ModelMeanType.VELOCITY:
      target = self.velocity(x_start, t, noise)
    else:
      target = x_start
    terms["mse"] = likelihoods.mean_flat(jnp.square(target - model_output))
    terms["loss"] = terms["mse"] + terms.get("vb", 0.0)
    return terms
