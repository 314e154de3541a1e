"""dydit_jax.sampler: the chain equals the diffusion samplers, FLOPs statistics; images; the sample CLI."""
import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import train_helpers as th
from dydit_jax import checkpoints, images
from dydit_jax import sampler as sample
from dydit_jax.diffusion import create_diffusion, ddim_sample, ddpm_sample
from dydit_jax.diffusion.samplers import row_noise
from dydit_jax.models import DiT, ModelConfig
from dydit_jax.models.flops import layer_macs
from dydit_jax.diffusion.guidance import cfg_labels, forward_with_cfg
from model_utils import CheckedSampler, randomize

CFG = ModelConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                  num_classes=4)
LABELS = np.array([0, 1, 3], np.int32)


@pytest.fixture(scope="module")
def dit(tiny_dit):
  return tiny_dit


def _reference(model, sampler, steps, cfg_scale, key):
  """The diffusion helper's own sampler on the same noise (generate's key protocol)."""
  chain = create_diffusion(steps, prediction=model.config.prediction)
  noise_key, chain_key = jax.random.split(key)
  noise = row_noise(noise_key, np.arange(len(LABELS)), (8, 8, 1))   # image i's noise: fold_in(key, i)
  run = ddpm_sample if sampler == "ddpm" else ddim_sample
  if cfg_scale == 1.0:
    return run(lambda x, t: model(x, t, jnp.asarray(LABELS)), chain, noise, chain_key)
  y = cfg_labels(jnp.asarray(LABELS), CFG.num_classes)
  fn = lambda x, t: forward_with_cfg(lambda a, b, c: model(a, b, c), x, t, y, cfg_scale)
  return run(fn, chain, jnp.concatenate([noise, noise]), chain_key)[:len(LABELS)]


@pytest.mark.parametrize("sampler,steps,cfg_scale", [("ddpm", "10", 1.0), ("ddim", "10", 3.0)])
def test_generate_equals_the_diffusion_samplers(dit, sampler, steps, cfg_scale):
  key = jax.random.PRNGKey(3)
  result = sample.generate(dit, LABELS, key, sample.SampleOptions(sampler=sampler, steps=steps,
                                                                  cfg_scale=cfg_scale))
  np.testing.assert_allclose(result.samples, _reference(dit, sampler, steps, cfg_scale, key), rtol=1e-5, atol=1e-5)
  assert result.samples.shape == (3, 8, 8, 1)
  t = result.timesteps
  assert len(t) == 10 and t[0] == 999 and t[-1] == 0 and np.all(np.diff(t) < 0)
  assert result.flops_ratio == 1.0 and result.macs_ratio == 1.0      # a DiT computes everything


def test_a_velocity_model_samples_as_velocity(dit):
  """The model's config says what it predicts, and the Sampler's chain reads its output that way."""
  v_model = DiT(dataclasses.replace(dit.config, prediction="v"), rngs=nnx.Rngs(0))
  nnx.update(v_model, nnx.state(dit))
  key = jax.random.PRNGKey(4)
  options = sample.SampleOptions(sampler="ddpm", steps="10", cfg_scale=2.0)
  got = sample.generate(v_model, LABELS, key, options).samples
  np.testing.assert_allclose(got, _reference(v_model, "ddpm", "10", 2.0, key), rtol=1e-5, atol=1e-5)
  as_eps = sample.generate(dit, LABELS, key, options).samples       # same weights read as eps
  assert np.abs(got - as_eps).max() > 1e-2


def test_flops_statistics_of_closed_routers():
  model = randomize(DiT(CFG.replace(dynamic=True), rngs=nnx.Rngs(1)), scale=0.2)
  for router in (model.blocks.attn_rate.router, model.blocks.mlp_rate.router,
                 model.blocks.token_selection.mlp_head.layers[2]):
    router.kernel[...] = jnp.zeros_like(router.kernel[...])   # logits = bias whatever the input
    router.bias[...] = jnp.full(router.bias.shape, -100.0)
  result = sample.generate(model, LABELS, jax.random.PRNGKey(0), sample.SampleOptions(steps="5"))
  # Only the forced head and group stay open, no token takes the MLP: r = (1/H) A / (A + M).
  attn, mlp = layer_macs(CFG)
  np.testing.assert_allclose(result.flops_ratio, 0.5 * attn / (attn + mlp), rtol=1e-6)
  np.testing.assert_allclose(result.head, 0.5)
  np.testing.assert_allclose(result.token, 0.0)
  assert result.head.shape == (5, 2) and 0 < result.macs_ratio < 1


def test_fast_engines_sample_what_the_masked_forward_samples(tiny_dydit):
  """Same key, fp32: every call of the engines' chains equals the masked model on the same input
  (`checked`: relative L2 <= 1e-5 and the same routed tokens, else NaN samples), and the samples and
  statistics equal the masked path's."""
  model = tiny_dydit
  key = jax.random.PRNGKey(4)
  want = sample.generate(model, LABELS, key, sample.SampleOptions(steps="25", cfg_scale=3.0))
  assert 0.2 < want.flops_ratio < 0.9                         # mixed masks: something to skip
  for engine in ("buckets", "segments"):
    options = sample.SampleOptions(steps="25", cfg_scale=3.0, engine=engine, segments=3)
    got = CheckedSampler(model, options, reference=model).generate(LABELS, key)
    assert np.isfinite(got.samples).all(), engine
    assert np.linalg.norm(got.samples - want.samples) <= 1e-4 * np.linalg.norm(want.samples)
    for field in ("head", "group", "token"):
      np.testing.assert_allclose(getattr(got, field), getattr(want, field), atol=1e-6)
    np.testing.assert_allclose(got.ratio, want.ratio, rtol=1e-5)
    np.testing.assert_allclose(got.macs, want.macs, rtol=1e-5)
  with pytest.raises(ValueError, match="needs a DyDiT"):
    sample.generate(DiT(CFG, rngs=nnx.Rngs(0)), LABELS, key, sample.SampleOptions(engine="buckets"))
  with pytest.raises(ValueError, match="engine must be"):
    sample.SampleOptions(engine="fast")


def test_a_wrong_call_fails_the_sampler_check(tiny_dydit):
  """The check can fail: one head closed at one step of the engine's plan (a change that moves the
  final sample by < 1e-6 relative) turns the checked samples into NaN."""
  model = tiny_dydit
  sampler = CheckedSampler(model, sample.SampleOptions(steps="25", cfg_scale=3.0, engine="buckets"), reference=model)
  row = 12
  layer = int(np.argmax(sampler.engine.plan.head_counts[row]))
  head = jax.tree.map(np.array, sampler.arrays["tables"]["head"])
  head["mask"][row, layer, head["idx"][row, layer, 0]] = 0.0
  head["valid"][row, layer, 0] = 0.0
  sampler.arrays = {**sampler.arrays, "tables": {**sampler.arrays["tables"], "head": jax.tree.map(jnp.asarray, head)}}
  assert np.isnan(sampler.generate(LABELS, jax.random.PRNGKey(4)).samples).all()


def test_sampler_compiles_once_for_many_batches(tiny_dydit):
  """Batches through one Sampler reuse its plan and compiled chain, and each batch samples what the
  masked forward samples for those labels and key (fp32, relative L2 <= 1e-4)."""
  model = tiny_dydit
  options = sample.SampleOptions(steps="10", cfg_scale=3.0, engine="buckets")
  sampler = sample.Sampler(model, options)     # per-call checks: the test above
  for seed, labels in enumerate(([0, 1, 2, 3], [3, 3, 0, 1], [2, 0, 1, 1])):
    key = jax.random.PRNGKey(seed)
    got = sampler.generate(labels, key)
    want = sample.generate(model, labels, key, dataclasses.replace(options, engine="masked"))
    assert np.linalg.norm(got.samples - want.samples) <= 1e-4 * np.linalg.norm(want.samples)
    np.testing.assert_allclose(got.ratio, want.ratio, rtol=1e-5)
  assert sampler.traces == 1
  masked = sample.Sampler(model, dataclasses.replace(options, engine="masked"))
  for seed in range(2):   # new weights (another model object), same program
    other = randomize(nnx.clone(model), seed=seed + 5, scale=0.05)
    masked.update(other)
    key = jax.random.PRNGKey(seed)
    got = masked.generate([0, 1, 2, 3], key)
    np.testing.assert_array_equal(got.samples, sample.generate(other, [0, 1, 2, 3], key, masked.options).samples)
  assert masked.traces == 1
  with pytest.raises(ValueError, match="prebuilt engine"):
    sample.Sampler(model, sample.SampleOptions(), engine=sampler.engine)


def test_grid_layout_and_png(tmp_path):
  pictures = np.stack([np.full((4, 4, 1), 10 * i, np.uint8) for i in range(5)])
  grid = images.make_grid(pictures, ncols=2, pad=1)
  assert grid.shape == (3 * 5 + 1, 2 * 5 + 1, 1)
  assert grid[1, 6, 0] == 10 and grid[11, 1, 0] == 40 and grid[11, 6, 0] == 0
  path = images.save_grid(pictures, tmp_path / "g.png", ncols=2)
  assert np.asarray(Image.open(path)).shape == (3 * 6 + 2, 2 * 6 + 2)
  np.testing.assert_array_equal(images.to_uint8(np.array([[-1.0, 0.0, 1.0]])[..., None])[..., 0], [[0, 128, 255]])
  with pytest.raises(ValueError, match="latents"):
    images.to_uint8(np.zeros((1, 4, 4, 4)))


def test_cli_on_a_model_directory(tmp_path, dit):
  checkpoints.save_model(dit, tmp_path / "model")
  out = tmp_path / "grid.png"
  subprocess.run([sys.executable, "-m", "dydit_jax.sample", f"--model={tmp_path / 'model'}", "--classes=0,2",
                  "--per_class=3", "--steps=5", "--cfg_scale=2", f"--out={out}"],
                 cwd=th.REPO, env=th.env(), check=True, capture_output=True, timeout=300)
  assert np.asarray(Image.open(out)).shape == (2 * 10 + 2, 3 * 10 + 2)
  stats = json.loads(out.with_suffix(".json").read_text())
  assert stats["flops_ratio"] == 1.0 and stats["labels"] == [0, 0, 0, 2, 2, 2]


def test_cli_engine_bf16_on_a_dydit(tmp_path, tiny_dydit):
  model = tiny_dydit
  checkpoints.save_model(model, tmp_path / "model")
  out = tmp_path / "grid.png"
  proc = subprocess.run([sys.executable, "-m", "dydit_jax.sample", f"--model={tmp_path / 'model'}",
                         "--classes=0,2", "--per_class=2", "--steps=5", "--cfg_scale=2", "--engine=segments",
                         "--segments=2", "--dtype=bfloat16", "--residual_dtype=bfloat16", f"--out={out}"],
                        cwd=th.REPO, env=th.env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert np.asarray(Image.open(out)).shape == (2 * 10 + 2, 2 * 10 + 2)
  stats = json.loads(out.with_suffix(".json").read_text())
  assert 0.0 < stats["flops_ratio"] < 1.0 and stats["options"]["engine"] == "segments"
  assert stats["numerics"] == {"dtype": "bfloat16", "residual_dtype": "bfloat16", "attention": "xla"}
  bad = subprocess.run([sys.executable, "-m", "dydit_jax.sample", f"--model={tmp_path / 'model'}",
                        "--classes=0,9", f"--out={tmp_path / 'bad.png'}"], cwd=th.REPO, env=th.env(),
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "error: labels must lie in [0, 4)" in bad.stderr
  assert "Traceback" not in bad.stderr and not (tmp_path / "bad.png").exists()


def test_masked_chain_traces_at_full_size():
  # The whole CFG chain of a DyDiT-XL/2 traced on abstract weights (no XL array is made): what only full
  # sizes trigger shows here, e.g. MAC constants beyond int32 (that crashed XL sampling on jax 0.11).
  from dydit_jax.models import model_config
  cfg = model_config("DiT-XL/2", 256, dynamic=True)
  sampler = sample.Sampler(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))),
                           sample.SampleOptions("ddpm", "2", cfg_scale=1.5))
  program = sampler._program(0, sampler.positions, 2, None, first=True)
  ids = jnp.arange(2, dtype=jnp.int32)
  samples, stats = jax.eval_shape(program, sampler.arrays, None, ids, ids, jax.random.PRNGKey(0))
  assert samples.shape == (4, 32, 32, 4) and len(sampler.timesteps) == 2
  assert stats["head"].shape == (2, cfg.depth) and stats["kept"].shape == (2, cfg.depth, 4)
