"""Diffusion tests against an independent float64 NumPy implementation of IDDPM's formulas.

Tolerances: the JAX code is run in float64 (inside `jax.enable_x64(True)`, never
globally) and compared to the NumPy reference with rtol=1e-6, atol=1e-9 (agreement is
~1e-13, so any formula slip fails). The default float32 path is checked separately with
rtol=atol=1e-4, the float32 error of x_0 = x_t / sqrt(abar) - ... when 1/sqrt(abar) is
up to 157. Schedule tables, both float64 NumPy, are compared with rtol=1e-12.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dydit_jax.diffusion import (GaussianDiffusion, LossType, ModelMeanType, ModelVarType,
                                 create_diffusion, space_timesteps)
from dydit_jax.diffusion.samplers import (ddim_sample, ddim_step, ddpm_sample, ddpm_step,
                                          sampling_timesteps)

X64 = dict(rtol=1e-6, atol=1e-9)
F32 = dict(rtol=1e-4, atol=1e-4)
SHAPE = (6, 4, 4, 3)  # NHWC


# ----------------------------------------------------------------------------- reference

def ref_space(num_steps, counts):
  """Kept timesteps per the IDDPM description (independent re-implementation)."""
  if isinstance(counts, str) and counts.startswith("ddim"):
    n = int(counts[4:])
    stride = next(s for s in range(1, num_steps) if -(-num_steps // s) == n)
    return np.arange(0, num_steps, stride)
  counts = [int(c) for c in counts.split(",")] if isinstance(counts, str) else counts
  sizes = [num_steps // len(counts) + (i < num_steps % len(counts)) for i in range(len(counts))]
  starts = np.cumsum([0] + sizes[:-1])
  out = []
  for start, size, c in zip(starts, sizes, counts):
    stride = (size - 1) / (c - 1) if c > 1 else 1.0
    pos = np.concatenate([[0.0], np.cumsum(np.full(c - 1, stride))])
    out.extend(start + np.round(pos).astype(int))  # np.round: half to even, like Python
  return np.unique(out)


class Ref:
  """Float64 tables of a chain given its betas (and the kept original timesteps)."""

  def __init__(self, betas, kept=None):
    self.b = np.asarray(betas, np.float64)
    self.kept = np.arange(len(self.b)) if kept is None else np.asarray(kept)
    self.ab = np.cumprod(1 - self.b)
    self.abp = np.concatenate([[1.0], self.ab[:-1]])
    self.pv = self.b * (1 - self.abp) / (1 - self.ab)
    self.plv = np.log(np.concatenate([self.pv[1:2], self.pv[1:]]))
    self.c1 = self.b * np.sqrt(self.abp) / (1 - self.ab)
    self.c2 = (1 - self.abp) * np.sqrt(1 - self.b) / (1 - self.ab)

  @classmethod
  def spaced(cls, counts, num_steps=1000):
    base = np.cumprod(1 - np.linspace(1e-4, 0.02, num_steps))
    kept = ref_space(num_steps, counts)
    ab = base[kept]
    return cls(1 - ab / np.concatenate([[1.0], ab[:-1]]), kept)

  def col(self, table, t):
    return table[t][:, None, None, None]

  def pmv(self, out, x, t, clip=False):
    eps, v = np.split(out, 2, axis=-1)
    x0 = x / np.sqrt(self.col(self.ab, t)) - np.sqrt(1 / self.col(self.ab, t) - 1) * eps
    x0 = np.clip(x0, -1, 1) if clip else x0
    frac = (v + 1) / 2
    logvar = frac * np.log(self.col(self.b, t)) + (1 - frac) * self.col(self.plv, t)
    mean = self.col(self.c1, t) * x0 + self.col(self.c2, t) * x
    return mean, logvar, x0

  def vb(self, out, x0, xt, t):
    tmean = self.col(self.c1, t) * x0 + self.col(self.c2, t) * xt
    tlv = self.col(self.plv, t)
    mean, lv, _ = self.pmv(out, xt, t)
    kl = 0.5 * (-1 + lv - tlv + np.exp(tlv - lv) + (tmean - mean) ** 2 * np.exp(-lv))
    cdf = lambda z: 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z ** 3)))
    inv = np.exp(-0.5 * lv)
    hi, lo = cdf(inv * (x0 - mean + 1 / 255)), cdf(inv * (x0 - mean - 1 / 255))
    logp = np.where(x0 < -0.999, np.log(np.maximum(hi, 1e-12)),
                    np.where(x0 > 0.999, np.log(np.maximum(1 - lo, 1e-12)),
                             np.log(np.maximum(hi - lo, 1e-12))))
    per = lambda a: a.reshape(len(t), -1).mean(1) / np.log(2)
    return np.where(t == 0, per(-logp), per(kl))


# ----------------------------------------------------------------------------- toy model

RNG = np.random.default_rng(0)
W_EPS = RNG.normal(size=(3, 3)) * 0.3
W_V = RNG.normal(size=(3, 3)) * 0.5


def toy_output(x, t_orig, xp=np):
  """A t-dependent linear map producing [eps | v]; works on NumPy or jnp arrays."""
  tt = t_orig.astype(x.dtype)[:, None, None, None]
  eps = x @ xp.asarray(W_EPS, x.dtype) + 0.3 * xp.sin(0.037 * tt + xp.arange(3, dtype=x.dtype))
  v = xp.tanh(x @ xp.asarray(W_V, x.dtype) + xp.cos(0.011 * tt))
  return xp.concatenate([eps, v], axis=-1)


def toy_model(x, t):
  assert t.dtype == jnp.int32, t.dtype
  return toy_output(x, t, jnp)


def data(seed, dtype=np.float64):
  r = np.random.default_rng(seed)
  x0 = np.clip(r.normal(size=SHAPE) * 0.7, -1, 1)  # includes exact +-1: decoder edge bins
  return x0.astype(dtype), r.normal(size=SHAPE).astype(dtype)


# ----------------------------------------------------------------------------- schedule

def test_linear_schedule_tables():
  d = create_diffusion("")
  ref = Ref(np.linspace(1e-4, 0.02, 1000))
  np.testing.assert_allclose(d.betas, ref.b, rtol=1e-12)
  assert d.betas.dtype == np.float64 and d.num_timesteps == 1000
  np.testing.assert_allclose(d.alphas_cumprod[[0, 999]], [0.9999, 4.0358e-05], rtol=1e-4)
  for mine, theirs in [(d.alphas_cumprod, ref.ab), (d.posterior_variance, ref.pv),
                       (d.posterior_log_variance_clipped, ref.plv),
                       (d.posterior_mean_coef1, ref.c1), (d.posterior_mean_coef2, ref.c2)]:
    np.testing.assert_allclose(mine, theirs, rtol=1e-12)
  np.testing.assert_array_equal(d.timestep_map, np.arange(1000))


@pytest.mark.parametrize("counts", ["250", "ddim50", "10,15,20", "50", "25", "ddim25", "100"])
def test_space_timesteps_matches_reference(counts):
  np.testing.assert_array_equal(space_timesteps(1000, counts), ref_space(1000, counts))


def test_space_timesteps_known_values():
  s250 = space_timesteps(1000, "250")
  assert len(s250) == 250 and s250[:4] == [0, 4, 8, 12] and s250[-4:] == [987, 991, 995, 999]
  assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
  assert space_timesteps(1000, "50")[:6] == [0, 20, 41, 61, 82, 102]
  sections = space_timesteps(1000, "10,15,20")  # sections of 334, 333, 333 steps
  assert len(sections) == 45 and sections[:2] == [0, 37] and sections[-1] == 999
  assert space_timesteps(1000, [10, 15, 20]) == sections
  with pytest.raises(ValueError):
    space_timesteps(1000, "ddim3000")
  with pytest.raises(ValueError):
    space_timesteps(10, "5,20")


@pytest.mark.parametrize("counts", ["250", "ddim50", "10,15,20"])
def test_spaced_chain(counts):
  d, ref = create_diffusion(counts), Ref.spaced(counts)
  np.testing.assert_array_equal(d.timestep_map, ref.kept)
  assert d.timestep_map.dtype == np.int32 and d.num_timesteps == len(ref.kept)
  for mine, theirs in [(d.betas, ref.b), (d.posterior_log_variance_clipped, ref.plv),
                       (d.posterior_mean_coef1, ref.c1), (d.posterior_mean_coef2, ref.c2)]:
    np.testing.assert_allclose(mine, theirs, rtol=1e-12)
  base = create_diffusion("")
  np.testing.assert_allclose(d.alphas_cumprod, base.alphas_cumprod[d.timestep_map], rtol=1e-12)


def test_spaced_betas_known_values():
  betas = create_diffusion("250").betas
  np.testing.assert_allclose(betas[[0, 1, 249]], [1e-4, 5.99e-4, 0.07752], rtol=2e-3)


def test_sampling_timesteps():
  ts = sampling_timesteps(create_diffusion("250"))
  assert ts.dtype == np.int32 and len(ts) == 250
  np.testing.assert_array_equal(ts[:3], [999, 995, 991])
  np.testing.assert_array_equal(ts[-3:], [8, 4, 0])
  np.testing.assert_array_equal(sampling_timesteps(create_diffusion("ddim50")),
                                np.arange(980, -1, -20))


# ----------------------------------------------------------------------------- posterior

T_1000 = np.array([0, 1, 2, 500, 998, 999])
T_250 = np.array([0, 1, 7, 100, 248, 249])


def test_q_sample_and_posterior():
  d, ref = create_diffusion(""), Ref(np.linspace(1e-4, 0.02, 1000))
  x0, noise = data(1)
  with jax.enable_x64(True):
    xt = d.q_sample(jnp.asarray(x0), jnp.asarray(T_1000), jnp.asarray(noise))
    mean, var, logvar = d.q_posterior_mean_variance(jnp.asarray(x0), xt, jnp.asarray(T_1000))
    assert xt.dtype == jnp.float64
  ref_xt = np.sqrt(ref.col(ref.ab, T_1000)) * x0 + np.sqrt(1 - ref.col(ref.ab, T_1000)) * noise
  np.testing.assert_allclose(xt, ref_xt, **X64)
  np.testing.assert_allclose(mean, ref.col(ref.c1, T_1000) * x0 + ref.col(ref.c2, T_1000) * ref_xt,
                             **X64)
  np.testing.assert_allclose(var[:, 0, 0, 0], ref.pv[T_1000], **X64)
  np.testing.assert_allclose(logvar[:, 0, 0, 0], ref.plv[T_1000], **X64)


@pytest.mark.parametrize("clip", [False, True])
def test_p_mean_variance_learned_range(clip):
  d, ref = create_diffusion("250"), Ref.spaced("250")
  x, _ = data(2)
  x = x * 3
  out = toy_output(x, ref.kept[T_250])
  with jax.enable_x64(True):
    got = d.p_mean_variance(toy_model, jnp.asarray(x), jnp.asarray(T_250), clip_denoised=clip)
  mean, logvar, x0 = ref.pmv(out, x, T_250, clip)
  np.testing.assert_allclose(got["mean"], mean, **X64)
  np.testing.assert_allclose(got["log_variance"], logvar, **X64)
  np.testing.assert_allclose(got["variance"], np.exp(logvar), **X64)
  np.testing.assert_allclose(got["pred_xstart"], x0, **X64)
  # The default float32 path computes the same thing.
  got32 = d.p_mean_variance(toy_model, jnp.asarray(x, jnp.float32), jnp.asarray(T_250),
                            clip_denoised=clip)
  assert got32["mean"].dtype == jnp.float32
  np.testing.assert_allclose(got32["mean"], mean, **F32)
  np.testing.assert_allclose(got32["log_variance"], logvar, **F32)


def test_fixed_variances_and_start_x():
  x, _ = data(3)
  t = jnp.asarray(T_1000)
  out = jnp.asarray(x[..., ::-1].copy(), jnp.float32)
  xj = jnp.asarray(x, jnp.float32)
  large = create_diffusion("", learn_sigma=False)
  small = create_diffusion("", learn_sigma=False, sigma_small=True)
  ref = Ref(np.linspace(1e-4, 0.02, 1000))
  got = large.p_mean_variance_from_output(out, xj, t)["log_variance"]
  np.testing.assert_allclose(got[:, 0, 0, 0], np.log(np.append(ref.pv[1], ref.b[1:]))[T_1000],
                             **F32)
  got = small.p_mean_variance_from_output(out, xj, t)["log_variance"]
  np.testing.assert_allclose(got[:, 0, 0, 0], ref.plv[T_1000], **F32)
  # Variances come from their own tables, as the official code returns them: FIXED_SMALL's is the
  # posterior variance, exactly 0 at the last chain index (its log-variance stays the clipped one).
  got = small.p_mean_variance_from_output(out, xj, t)["variance"]
  np.testing.assert_allclose(got[:, 0, 0, 0], ref.pv[T_1000], **F32)
  at_zero = small.p_mean_variance_from_output(out[:1], xj[:1], jnp.zeros((1,), jnp.int32))
  assert float(at_zero["variance"].max()) == 0.0 and float(at_zero["log_variance"].max()) < -5
  got = large.p_mean_variance_from_output(out, xj, t)["variance"]
  np.testing.assert_allclose(got[:, 0, 0, 0], np.append(ref.pv[1], ref.b[1:])[T_1000], **F32)
  x0_model = create_diffusion("", learn_sigma=False, prediction="x0")
  np.testing.assert_array_equal(x0_model.p_mean_variance_from_output(out, xj, t)["pred_xstart"],
                                out)
  with pytest.raises(ValueError):  # a learned-sigma chain needs 2C output channels
    create_diffusion("").p_mean_variance_from_output(out, xj, t)


# ----------------------------------------------------------------------------- losses

def test_training_losses_match_reference():
  d, ref = create_diffusion(""), Ref(np.linspace(1e-4, 0.02, 1000))
  x0, noise = data(4)
  seen = []

  def model(x, t):
    seen.append(np.asarray(t))
    return toy_model(x, t)

  with jax.enable_x64(True):
    got = d.training_losses(model, jnp.asarray(x0), jnp.asarray(T_1000), jnp.asarray(noise))
  np.testing.assert_array_equal(seen[0], T_1000)
  xt = np.sqrt(ref.col(ref.ab, T_1000)) * x0 + np.sqrt(1 - ref.col(ref.ab, T_1000)) * noise
  out = toy_output(xt, T_1000)
  mse = ((noise - out[..., :3]) ** 2).reshape(len(T_1000), -1).mean(1)
  vb = ref.vb(out, x0, xt, T_1000)
  assert set(got) == {"loss", "mse", "vb"} and got["vb"].shape == (len(T_1000),)
  np.testing.assert_allclose(got["mse"], mse, **X64)
  np.testing.assert_allclose(got["vb"], vb, **X64)
  np.testing.assert_allclose(got["loss"], mse + vb, **X64)
  # t = 0 takes the decoder NLL branch, which differs from the KL there.
  assert abs(vb[0]) > 0 and np.isfinite(vb).all()

  got32 = d.training_losses(toy_model, jnp.asarray(x0, jnp.float32), jnp.asarray(T_1000),
                            jnp.asarray(noise, jnp.float32))
  np.testing.assert_allclose(got32["loss"], mse + vb, **F32)

  kl = create_diffusion("", use_kl=True)
  with jax.enable_x64(True):
    got_kl = kl.training_losses(toy_model, jnp.asarray(x0), jnp.asarray(T_1000), jnp.asarray(noise))
  assert set(got_kl) == {"loss"}
  np.testing.assert_allclose(got_kl["loss"], 1000 * vb, **X64)


def test_rescaled_mse_scales_vb_by_steps_over_1000():
  x0, noise = data(11, np.float32)
  args = (toy_model, jnp.asarray(x0), jnp.asarray(T_250), jnp.asarray(noise))
  plain = create_diffusion("250").training_losses(*args)
  rescaled = create_diffusion("250", rescale_learned_sigmas=True).training_losses(*args)
  np.testing.assert_allclose(rescaled["vb"], 0.25 * plain["vb"], rtol=1e-6)
  np.testing.assert_allclose(rescaled["mse"], plain["mse"], rtol=1e-6)


def test_training_losses_spaced_chain_calls_model_with_original_timesteps():
  d = create_diffusion("250")
  seen = []

  def model(x, t):
    seen.append(np.asarray(t))
    return toy_model(x, t)

  x0, noise = data(5, np.float32)
  d.training_losses(model, jnp.asarray(x0), jnp.asarray(T_250), jnp.asarray(noise))
  np.testing.assert_array_equal(seen[0], ref_space(1000, "250")[T_250])


def test_vb_trains_only_the_variance_and_mse_only_the_mean():
  d = create_diffusion("")
  x0, noise = data(6, np.float32)
  t = jnp.asarray(T_1000)
  out = jnp.asarray(toy_output(x0.astype(np.float64), T_1000), jnp.float32)

  def grad_of(term):
    fn = lambda o: d.training_losses(lambda x, tt: o, jnp.asarray(x0), t, jnp.asarray(noise))[term]
    return jax.grad(lambda o: fn(o).sum())(out)

  g_vb, g_mse = grad_of("vb"), grad_of("mse")
  assert jnp.all(g_vb[..., :3] == 0) and jnp.all(jnp.abs(g_vb[..., 3:]).sum((1, 2, 3)) > 0)
  assert jnp.all(g_mse[..., 3:] == 0) and jnp.all(jnp.abs(g_mse[..., :3]).sum((1, 2, 3)) > 0)


def test_v_prediction_target_and_x0_follow_the_definition():
  """v = sqrt(abar) eps - sqrt(1 - abar) x0 (float64 reference): a model that outputs the true v has
  zero MSE, its x0 and mean equal those of an eps-model that outputs the true eps, on a spaced
  chain too (respacing keeps abar at the kept steps)."""
  x0, noise = data(12)
  for spacing, t_idx in (("", T_1000), ("250", T_250)):
    eps_chain = create_diffusion(spacing, learn_sigma=False)
    v_chain = create_diffusion(spacing, learn_sigma=False, prediction="v")
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))[ref_space(1000, spacing or "1000")][t_idx]
    ab = ab[:, None, None, None]
    xt = np.sqrt(ab) * x0 + np.sqrt(1 - ab) * noise
    v_true = np.sqrt(ab) * noise - np.sqrt(1 - ab) * x0
    with jax.enable_x64(True):
      t = jnp.asarray(t_idx)
      np.testing.assert_allclose(v_chain.velocity(jnp.asarray(x0), t, jnp.asarray(noise)), v_true, **X64)
      terms = v_chain.training_losses(lambda x, tt: jnp.asarray(v_true), jnp.asarray(x0), t,
                                      jnp.asarray(noise))
      np.testing.assert_allclose(terms["mse"], 0.0, atol=1e-20)
      # A wrong v costs its squared error, not eps's.
      off = v_chain.training_losses(lambda x, tt: jnp.asarray(v_true + 0.5), jnp.asarray(x0), t,
                                    jnp.asarray(noise))
      np.testing.assert_allclose(off["mse"], 0.25, **X64)
      by_v = v_chain.p_mean_variance_from_output(jnp.asarray(v_true), jnp.asarray(xt), t)
      by_eps = eps_chain.p_mean_variance_from_output(jnp.asarray(noise), jnp.asarray(xt), t)
    np.testing.assert_allclose(by_v["pred_xstart"], x0, **X64)
    np.testing.assert_allclose(by_v["mean"], by_eps["mean"], **X64)
  with pytest.raises(ValueError, match="prediction"):
    create_diffusion("", prediction="velocity")


def test_v_prediction_ddim_with_an_oracle_recovers_the_data():
  """A v-model that knows x0 (v computed from x_t and the true x0) sends deterministic DDIM to x0."""
  x0 = jnp.asarray(data(13, np.float32)[0])
  chain = create_diffusion("ddim25", learn_sigma=False, prediction="v")
  ab_full = jnp.asarray(np.cumprod(1 - np.linspace(1e-4, 0.02, 1000)), jnp.float32)

  def oracle(x, t):
    ab = ab_full[t][:, None, None, None]
    eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
    return jnp.sqrt(ab) * eps - jnp.sqrt(1 - ab) * x0

  noise = jax.random.normal(jax.random.PRNGKey(0), x0.shape)
  out = ddim_sample(oracle, chain, noise, jax.random.PRNGKey(1))
  np.testing.assert_allclose(out, x0, atol=1e-3)


# ----------------------------------------------------------------------------- single steps

def test_ddpm_step_matches_reference():
  d, ref = create_diffusion("250"), Ref.spaced("250")
  x, z = data(7)
  with jax.enable_x64(True):
    got, x0 = ddpm_step(toy_model, d, jnp.asarray(x), jnp.asarray(T_250), jnp.asarray(z))
  mean, logvar, ref_x0 = ref.pmv(toy_output(x, ref.kept[T_250]), x, T_250)
  expected = mean + (T_250 != 0)[:, None, None, None] * np.exp(0.5 * logvar) * z
  np.testing.assert_allclose(got, expected, **X64)
  np.testing.assert_allclose(x0, ref_x0, **X64)
  np.testing.assert_allclose(got[0], mean[0], **X64)  # no noise at t = 0


def ref_ddim(ref, x, t, z, eta):
  _, _, x0 = ref.pmv(toy_output(x, ref.kept[t]), x, t)
  ab, abp = ref.col(ref.ab, t), ref.col(ref.abp, t)
  eps = (x / np.sqrt(ab) - x0) / np.sqrt(1 / ab - 1)
  sigma = eta * np.sqrt((1 - abp) / (1 - ab)) * np.sqrt(1 - ab / abp)
  mean = x0 * np.sqrt(abp) + np.sqrt(1 - abp - sigma ** 2) * eps
  return mean + (t != 0)[:, None, None, None] * sigma * z


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_step_matches_reference(eta):
  d, ref = create_diffusion("ddim50"), Ref.spaced("ddim50")
  t = np.array([0, 1, 10, 25, 48, 49])
  x, z = data(8)
  with jax.enable_x64(True):
    got, _ = ddim_step(toy_model, d, jnp.asarray(x), jnp.asarray(t), jnp.asarray(z), eta=eta)
  np.testing.assert_allclose(got, ref_ddim(ref, x, t, z, eta), **X64)


# ----------------------------------------------------------------------------- samplers

def test_ddim_sampler_trajectory_uses_original_timesteps():
  """A full eta=0 trajectory with a t-dependent model: wrong or reordered t would fail."""
  counts = "10,15,20"
  d, ref = create_diffusion(counts), Ref.spaced(counts)
  noise, _ = data(9)
  with jax.enable_x64(True):
    got = jax.jit(lambda n, k: ddim_sample(toy_model, d, n, k))(jnp.asarray(noise),
                                                                 jax.random.key(0))
  x = noise
  for i in range(d.num_timesteps - 1, -1, -1):
    x = ref_ddim(ref, x, np.full(SHAPE[0], i), np.zeros(SHAPE), 0.0)
  np.testing.assert_allclose(got, x, **X64)
  # Feeding spaced indices instead of original timesteps gives a different answer.
  wrong = Ref.spaced(counts)
  wrong.kept = np.arange(d.num_timesteps)
  y = noise
  for i in range(d.num_timesteps - 1, -1, -1):
    y = ref_ddim(wrong, y, np.full(SHAPE[0], i), np.zeros(SHAPE), 0.0)
  assert np.abs(y - x).max() > 1e-3


def test_ddpm_sampler_noise_free_part_of_trajectory():
  """Two models differing only by an x-independent eps offset h(t), run with the same key.

  Ancestral sampling is affine in (x_T, noise, h) and the noise scale depends only on t,
  so the difference of the two outputs cancels the noise and follows a deterministic
  recursion that depends on every (original) timestep fed to the model.
  """
  d, ref = create_diffusion("250"), Ref.spaced("250")
  w = np.asarray(W_EPS)

  def h(t):
    return np.sin(0.05 * np.asarray(t, np.float64))[:, None, None, None] * np.ones(3)

  def linear_model(offset):
    def fn(x, t):
      eps = x @ jnp.asarray(w, x.dtype) + (jnp.sin(0.05 * t.astype(x.dtype))[:, None, None, None]
                                           * offset)
      v = jnp.broadcast_to(jnp.cos(0.011 * t.astype(x.dtype))[:, None, None, None], x.shape)
      return jnp.concatenate([eps, v], axis=-1)
    return fn

  noise, _ = data(10)
  with jax.enable_x64(True):
    run = lambda offset: jax.jit(lambda n, k: ddpm_sample(linear_model(offset), d, n, k))(
        jnp.asarray(noise), jax.random.key(3))
    diff = np.asarray(run(1.0) - run(0.0))
  delta = np.zeros(SHAPE)
  for i in range(d.num_timesteps - 1, -1, -1):
    t = np.full(SHAPE[0], i)
    ab = ref.col(ref.ab, t)
    d_eps = delta @ w + h(ref.kept[t])
    d_x0 = delta / np.sqrt(ab) - np.sqrt(1 / ab - 1) * d_eps
    delta = ref.col(ref.c1, t) * d_x0 + ref.col(ref.c2, t) * delta
  np.testing.assert_allclose(diff, delta, **X64)
  assert np.abs(delta).max() > 1e-3


def test_ddpm_sampler_draws_fresh_noise_each_step():
  """eps = 0, v = 1: x_{i-1} = k_i x_i + sqrt(beta_i) z_i, so the final variance is known.

  Independent z_i give sum_i a_i^2 (a_i = sqrt(beta_i) prod_{j<i} k_j); reused noise
  would give (sum_i a_i)^2. 8192 samples estimate the variance to about 2%.
  """
  d, ref = create_diffusion("ddim25"), Ref.spaced("ddim25")
  model = lambda x, t: jnp.concatenate([jnp.zeros_like(x), jnp.ones_like(x)], axis=-1)
  shape = (8, 16, 16, 4)
  noise = jax.random.normal(jax.random.key(0), shape)
  out = jax.jit(lambda n, k: ddpm_sample(model, d, n, k))(noise, jax.random.key(1))
  k = ref.c1 / np.sqrt(ref.ab) + ref.c2  # x_0 = x / sqrt(abar) when eps = 0
  var, gain = 0.0, 1.0
  for i in range(d.num_timesteps - 1, -1, -1):
    var = var * k[i] ** 2 + (ref.b[i] if i > 0 else 0.0)
    gain *= k[i]
  expected = var + gain ** 2  # x_T is unit Gaussian too
  np.testing.assert_allclose(float(jnp.var(out)), expected, rtol=0.1)


def test_samplers_jit_deterministic_per_key():
  d = create_diffusion("ddim25")
  noise = jax.random.normal(jax.random.key(0), SHAPE)
  ddpm = jax.jit(lambda n, k: ddpm_sample(toy_model, d, n, k))
  ddim = jax.jit(lambda n, k, eta: ddim_sample(toy_model, d, n, k, eta=eta))
  k1, k2 = jax.random.key(1), jax.random.key(2)
  a, b, c = ddpm(noise, k1), ddpm(noise, k1), ddpm(noise, k2)
  assert a.shape == SHAPE and a.dtype == jnp.float32 and bool(jnp.isfinite(a).all())
  np.testing.assert_array_equal(a, b)
  assert float(jnp.abs(a - c).max()) > 1e-3
  np.testing.assert_array_equal(ddim(noise, k1, 0.0), ddim(noise, k2, 0.0))  # eta=0: no noise
  e1, e2 = ddim(noise, k1, 1.0), ddim(noise, k2, 1.0)
  np.testing.assert_array_equal(e1, ddim(noise, k1, 1.0))
  assert float(jnp.abs(e1 - e2).max()) > 1e-3


def test_bad_configurations_raise():
  with pytest.raises(ValueError):
    create_diffusion("", noise_schedule="quadratic")
  with pytest.raises(ValueError):
    GaussianDiffusion(np.array([0.1]))
  with pytest.raises(ValueError):
    GaussianDiffusion(np.array([0.1, 1.5]))
  d = GaussianDiffusion(np.linspace(1e-4, 0.02, 10), model_mean_type=ModelMeanType.EPSILON,
                        model_var_type=ModelVarType.LEARNED_RANGE, loss_type=LossType.MSE)
  np.testing.assert_array_equal(d.timestep_map, np.arange(10))
