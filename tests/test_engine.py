"""The fast engine computes the masked eval-mode DyDiT exactly (fp32, CPU), and counts MACs honestly.

Every parameter is random (zero-initialized adaLN / final layers included: an adaLN-Zero block is the
identity and would hide slicing errors) and the routers are set so masks are mixed; single layers are
forced to the edge cases: no routed token, every token routed, and (format "all") no head / no group.
Tolerances: relative L2 <= 1e-5 per model call, <= 1e-4 after a 250-step DDPM chain.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_utils import checked, rel_l2, tiny_config

from dydit_jax.bench import cost
from dydit_jax.bench.synthetic import calibrate_token_routers, set_synthetic_routers
from dydit_jax.diffusion import (cfg_labels, create_diffusion, ddpm_sample, forward_with_cfg, guided,
                                 run_pieces, sampling_timesteps)
from dydit_jax.engine.buckets import choose_caps, padded_counts, token_caps
from dydit_jax.engine.engine import DynamicEngine, EngineOptions
from dydit_jax.engine.plan import WidthPlan
from dydit_jax.engine.segments import SegmentEngine, partition_steps
from dydit_jax.models import DiT, flops
from dydit_jax.models.compute import compute_model
from dydit_jax.models.layers import sincos_pos_embed_2d
from dydit_jax.models.dydit_init import dit_from_dydit

from dydit_jax.sampler import SampleOptions, generate

# Fewer width buckets than distinct counts, so padded (zero-weighted) slots are exercised.
FP32 = EngineOptions(dtype="float32", head_buckets=2, group_buckets=3, token_buckets=4)
BATCH = 4
NO_TOKEN_LAYER, ALL_TOKEN_LAYER, NO_HEAD_LAYER, NO_GROUP_LAYER = 0, 1, 2, 3


def _model(router_format: str) -> DiT:
  """Random DyDiT built on the host (numpy): eager init compiles ~50 tiny programs, too slow here.

  Every parameter ~ N(0, 0.05^2) except the width routers, N(0, 9 / fan_in) for mixed masks; the
  sin-cos position table stays; token routers are calibrated to route half the tokens, then single
  layers are forced to the edge cases.
  """
  cfg = tiny_config(dynamic=True, depth=4, router_format=router_format)
  graphdef, state = nnx.split(nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    names = [str(getattr(k, "key", k)) for k in path]
    if names[0] == "pos_embed":
      return jnp.asarray(sincos_pos_embed_2d(cfg.hidden_size, cfg.grid_size)[None])
    scale = 3.0 / leaf.shape[-2] ** 0.5 if "router" in names and names[-1] == "kernel" else 0.05
    return jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype)

  model = nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state.to_pure_dict()))
  calibrate_token_routers(model, 0.5, batch=4, iters=12)
  blocks = model.blocks
  token_bias = blocks.token_selection.mlp_head.layers[2].bias
  token_bias[...] = token_bias[...].at[NO_TOKEN_LAYER].set(-1e3).at[ALL_TOKEN_LAYER].set(1e3)
  if router_format == "all":
    blocks.attn_rate.router.bias[...] = blocks.attn_rate.router.bias[...].at[NO_HEAD_LAYER].set(-1e3)
    blocks.mlp_rate.router.bias[...] = blocks.mlp_rate.router.bias[...].at[NO_GROUP_LAYER].set(-1e3)
  return model


@pytest.fixture(scope="module", params=["forced_first", "all"])
def setup(request):
  """(model, diffusion, plan, engine, jitted engine apply, jitted reference forward)."""
  model = _model(request.param)
  diffusion = create_diffusion("250")
  plan = WidthPlan.from_model(model, sampling_timesteps(diffusion))
  engine = DynamicEngine(model, plan, FP32)
  graphdef, state = nnx.split(model)
  reference = jax.jit(lambda s, x, t, y: nnx.merge(graphdef, s)(x, t, y, return_masks=True))
  return model, diffusion, plan, engine, jax.jit(engine.apply), lambda x, t, y: reference(state, x, t, y)


def _inputs(cfg, t: int, seed: int = 0, batch: int = BATCH):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (batch, cfg.input_size, cfg.input_size, cfg.in_channels))
  y = jax.random.randint(ky, (batch,), 0, cfg.num_classes)
  return x, jnp.full((batch,), t, jnp.int32), y


def test_engine_call_matches_masked_forward(setup):
  model, _, plan, engine, apply, reference = setup
  cfg = model.config
  assert np.any(padded_counts(plan.head_counts, engine.spec.head_caps) > plan.head_counts)
  assert np.any(padded_counts(plan.group_counts, engine.spec.group_caps) > plan.group_counts)
  seen = {"head": [], "group": [], "token": []}
  for row in (0, 60, 125, 249):
    x, t, y = _inputs(cfg, int(plan.timesteps[row]), seed=row)
    want, masks = reference(x, t, y)
    got, kept = apply(engine.arrays, x, t, y, row)
    assert rel_l2(got, want) <= 1e-5
    np.testing.assert_array_equal(np.asarray(kept).T, np.asarray(masks["token"].sum(-1)))
    np.testing.assert_array_equal(plan.head[row], np.asarray(masks["head"][0]) > 0.5)
    np.testing.assert_array_equal(plan.group[row], np.asarray(masks["group"][0]) > 0.5)
    for k in seen:
      seen[k].append(np.asarray(masks[k]))
    kept = np.asarray(kept)
    assert np.all(kept[NO_TOKEN_LAYER] == 0) and np.all(kept[ALL_TOKEN_LAYER] == cfg.num_tokens)
  mixed = [l for l in range(cfg.depth) if l not in (NO_TOKEN_LAYER, ALL_TOKEN_LAYER)]
  for kind, arrays in seen.items():
    m = np.stack(arrays)
    on = m[:, :, mixed].mean() if kind == "token" else m.mean()
    assert 0.2 <= on <= 0.8, f"{kind} masks are not mixed: {on:.2f} open"
  token = np.stack(seen["token"])[:, :, mixed].sum(-1)     # (calls, B, layers)
  assert np.any(token.min(axis=1) != token.max(axis=1)), "samples should route different token counts"


def test_format_all_has_closed_layers(setup):
  model, _, plan, *_ = setup
  if model.config.router_format != "all":
    pytest.skip("only format 'all' can close every unit")
  assert np.all(plan.head_counts[:, NO_HEAD_LAYER] == 0)
  assert np.all(plan.group_counts[:, NO_GROUP_LAYER] == 0)


def test_row_lookup_by_t_and_nan_outside_plan(setup):
  model, _, plan, engine, apply, reference = setup
  x, t, y = _inputs(model.config, int(plan.timesteps[10]))
  got = apply(engine.arrays, x, t, y)[0]                    # row looked up from t
  assert rel_l2(got, reference(x, t, y)[0]) <= 1e-5
  off_plan = jnp.full_like(t, 1 + int(plan.timesteps[10]))   # 250-step chain: t+1 is not a step
  assert int(plan.row_of_t()[off_plan[0]]) == -1
  assert np.isnan(np.asarray(apply(engine.arrays, x, off_plan, y)[0])).all()
  mixed_t = t.at[0].set(int(plan.timesteps[11]))
  assert np.isnan(np.asarray(apply(engine.arrays, x, mixed_t, y)[0])).all()


def test_cfg_halves_share_one_plan_row(setup):
  model, _, plan, engine, _, _ = setup
  cfg = model.config
  x, t, y = _inputs(cfg, int(plan.timesteps[40]), batch=2 * 2)
  labels = cfg_labels(y[:2], cfg.num_classes)
  graphdef, state = nnx.split(model)
  want = jax.jit(lambda s: forward_with_cfg(nnx.merge(graphdef, s), x, t, labels, 4.0))(state)
  got = jax.jit(lambda arrays: forward_with_cfg(lambda a, b, c: engine.apply(arrays, a, b, c, 40)[0],
                                                x, t, labels, 4.0))(engine.arrays)
  assert rel_l2(got, want) <= 1e-5


def _engine_chain(engine, model, labels, noise, key):
  """The DDPM-250 CFG chain through the engine's pieces (as the Sampler runs it), every call `checked`
  against the masked model on the same input (a final-sample check alone cannot see a wrong call)."""
  cfg = model.config

  @jax.jit
  def fast(arrays):
    pieces = []
    for rows, f in engine.forwards(arrays):
      as_dict = lambda x, t, y, row, f=f: (lambda out, kept: (out, {"kept": kept}))(*f(x, t, y, row))
      pieces.append((rows, guided(checked(as_dict, model, poison=False), labels, cfg_scale=1.5, num_classes=cfg.num_classes)))
    return run_pieces(pieces, create_diffusion("250"), noise, key)

  return fast


def _reference_chain(model, labels, noise, key):
  cfg = model.config
  graphdef, state = nnx.split(model)
  m = nnx.merge(graphdef, state)
  fn = lambda x, t: forward_with_cfg(m, x, t, cfg_labels(labels, cfg.num_classes), 1.5)
  return jax.jit(lambda: ddpm_sample(fn, create_diffusion("250"), noise, key))()


def _chain_inputs(cfg, seed):
  noise = jax.random.normal(jax.random.key(seed), (4, cfg.input_size, cfg.input_size, cfg.in_channels))
  return jnp.array([1, 7]), noise, jax.random.key(seed + 1)


def test_ddpm250_chain_with_cfg_matches_reference(setup):
  """Every call of the chain (per call <= 1e-5, same routed tokens) and the whole chain (<= 1e-4)."""
  model, _, _, engine, _, _ = setup
  labels, noise, key = _chain_inputs(model.config, 5)
  got, aux = _engine_chain(engine, model, labels, noise, key)(engine.arrays)
  assert aux["kept"].shape == (250, model.config.depth, 4) and aux["err"].shape == (250,)
  assert float(aux["err"].max()) <= 1e-5 and bool(aux["same_tokens"].all())
  assert rel_l2(got, _reference_chain(model, labels, noise, key)) <= 1e-4


def test_a_wrong_head_at_one_step_fails_the_chain_check(setup):
  """The per-call check can fail: close one open head of one layer at one step (engine tables only)."""
  model, _, plan, engine, _, _ = setup
  row = 30
  layer = int(np.argmax(plan.head_counts[row]))            # a layer with open heads at that step
  head = jax.tree.map(np.array, engine.arrays["tables"]["head"])
  first = head["idx"][row, layer, 0]                        # its first open head
  head["mask"][row, layer, first] = 0.0
  head["valid"][row, layer, 0] = 0.0
  planted = {**engine.arrays, "tables": {**engine.arrays["tables"], "head": jax.tree.map(jnp.asarray, head)}}
  labels, noise, key = _chain_inputs(model.config, 5)
  _, aux = _engine_chain(engine, model, labels, noise, key)(planted)
  err = np.asarray(aux["err"])
  assert err[row] > 1e-4, err[row]                  # ten times the per-call tolerance
  assert np.delete(err, row).max() <= 1e-5          # every other call still equals the masked model


def test_plan_macs_equal_flops_module(setup):
  model, _, plan, engine, apply, reference = setup
  cfg = model.config
  want = flops.dydit_macs(cfg, plan.masks())                  # steps as the batch axis, all tokens
  np.testing.assert_allclose(plan.macs(), np.asarray(want), rtol=1e-6)
  for routers in (False, True):                               # with per-sample token counts of a call
    row = 77
    x, t, y = _inputs(cfg, int(plan.timesteps[row]), seed=3)
    _, masks = reference(x, t, y)
    kept = np.zeros((plan.num_steps, cfg.depth, BATCH), np.int64)
    kept[row] = np.asarray(apply(engine.arrays, x, t, y, row)[1])
    want = flops.dydit_macs(cfg, masks, include_routers=routers)
    np.testing.assert_allclose(plan.macs(kept, include_routers=routers)[row], np.asarray(want), rtol=1e-6)


def test_xla_cost_agrees_with_analytic_at_capacities(setup):
  model, diffusion, plan, engine, apply, _ = setup
  cfg = model.config
  if cfg.router_format != "all":
    pytest.skip("costed once, on the format with empty-width branches")
  rows = np.array([0, 100, 200])
  kept = np.stack([np.asarray(apply(engine.arrays, *_inputs(cfg, int(plan.timesteps[r]), seed=int(r)), r)[1])
                   for r in rows])
  branch = cost.engine_branch_costs(engine, BATCH)
  dense = cost.dense_call_cost(compute_model(dit_from_dydit(model), "float32"), BATCH)
  r = cost.run_macs(engine, branch, dense, kept, rows)
  assert r.analytic <= r.padded
  # Beyond the padded MACs XLA only counts elementwise work (softmax, GELU, norms): a few % here.
  assert 1.0 <= r.xla / r.padded <= 1.08
  assert 1.0 <= r.dense_xla / r.dense_analytic <= 1.08
  # Memory traffic: the engine moves less than the dense model, but not less than the MACs ratio
  # suggests (the residual passes and the token router do not shrink with the widths).
  assert r.xla / r.dense_xla < r.xla_bytes / r.dense_xla_bytes < 1.0


def test_choose_caps_is_optimal_and_covers_counts():
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 9, size=200)
  for k in (1, 2, 3, 9):
    caps = choose_caps(counts, k)
    assert len(caps) <= k and caps[-1] == counts.max()
    waste = (padded_counts(counts, caps) - counts).sum()
    values = np.unique(counts)                                 # brute force over cap subsets
    import itertools
    best = min((padded_counts(counts, tuple(c) + (values[-1],)) - counts).sum()
               for n in range(min(k, len(values))) for c in itertools.combinations(values[:-1], n))
    assert waste == best
  assert token_caps(64, 8) == (0, 8, 16, 24, 32, 40, 48, 56, 64)
  assert token_caps(20, 4)[0] == 0 and token_caps(20, 4)[-1] == 20


def test_plan_io_summary_and_plot(setup, tmp_path):
  _, _, plan, *_ = setup
  for name in ("plan.npz", "plan.json"):
    back = WidthPlan.load(plan.save(tmp_path / name))
    np.testing.assert_array_equal(back.head, plan.head)
    np.testing.assert_array_equal(back.group, plan.group)
    np.testing.assert_array_equal(back.timesteps, plan.timesteps)
    assert back.config == plan.config
  text = plan.summary()
  assert "250 steps" in text and "MACs ratio" in text
  assert plan.plot(tmp_path / "plan.png").stat().st_size > 1000


def test_synthetic_routers_hit_target_exactly_on_fitted_steps():
  model = _model("forced_first")
  timesteps = sampling_timesteps(create_diffusion("ddim50"))   # 50 <= D + 1: exact least squares
  report = set_synthetic_routers(model, 0.6, timesteps, token_keep=1.0)
  assert report["width_misses"] == 0
  plan = WidthPlan.from_model(model, timesteps)
  assert abs(plan.macs_ratio() - 0.6) < 0.03
  counts = plan.head_counts
  assert counts[-1].mean() > counts[0].mean()                 # more width at low noise (tilt > 0)


# Segment engine: static widths per range of steps (engine.segments) --------------------------------

@pytest.fixture(scope="module")
def segmented(setup):
  model, _, plan, *_ = setup
  engine = SegmentEngine(model, plan, FP32, num_segments=3)
  return engine, jax.jit(engine.apply)


def test_segment_engine_call_matches_masked_forward(setup, segmented):
  model, _, plan, _, _, reference = setup
  engine, apply = segmented
  assert len(engine.bounds) == 3
  head, group = engine.width_capacities(np.arange(plan.num_steps))
  assert np.all(head >= plan.head_counts) and np.all(group >= plan.group_counts)
  assert np.any(head > plan.head_counts)                     # union padding is exercised
  for (start, stop), row in zip(engine.bounds, (0, 125, 249)):
    row = min(max(row, start), stop - 1)
    x, t, y = _inputs(model.config, int(plan.timesteps[row]), seed=row)
    want, masks = reference(x, t, y)
    got, kept = apply(engine.arrays, x, t, y, row)
    assert rel_l2(got, want) <= 1e-5
    np.testing.assert_array_equal(np.asarray(kept).T, np.asarray(masks["token"].sum(-1)))


def test_segment_engine_ddpm250_chain_matches_reference(setup, segmented):
  model, _, plan, *_ = setup
  engine, _ = segmented
  cfg = model.config
  labels, noise, key = _chain_inputs(cfg, 7)
  got, aux = _engine_chain(engine, model, labels, noise, key)(engine.arrays)
  kept = aux["kept"]
  assert kept.shape == (250, cfg.depth, 4) and aux["err"].shape == (250,)
  assert float(aux["err"].max()) <= 1e-5 and bool(aux["same_tokens"].all())
  assert rel_l2(got, _reference_chain(model, labels, noise, key)) <= 1e-4
  steps = np.arange(250)
  analytic = cost.analytic_macs(plan, kept, steps)
  assert analytic < cost.padded_macs(engine, kept, steps, include_router=False) < 2 * analytic
  if cfg.router_format == "all":   # XLA's count of the pieces that ran (costed once: slow-ish)
    branch = cost.engine_branch_costs(engine, 4)
    dense = cost.dense_call_cost(compute_model(dit_from_dydit(model), "float32"), 4)
    r = cost.run_macs(engine, branch, dense, kept[::10], steps[::10])
    assert 1.0 <= r.xla / r.padded <= 1.08


def test_partition_steps_is_optimal():
  rng = np.random.default_rng(3)
  cfg = tiny_config(dynamic=True, depth=2)
  steps = 7
  head, group = (rng.random((steps, cfg.depth, cfg.num_heads)) < 0.5 for _ in range(2))
  plan = WidthPlan(cfg, np.arange(steps, dtype=np.int32)[::-1].copy(), head, group)
  attn, mlp = flops.layer_macs(cfg)

  def computed(bounds):
    return sum((b - a) * (head[a:b].any(0).sum(-1) * attn + group[a:b].any(0).sum(-1) * mlp).sum()
               for a, b in bounds)

  import itertools
  for k in (1, 2, 3):
    bounds = partition_steps(plan, k)
    assert len(bounds) <= k and bounds[0][0] == 0 and bounds[-1][1] == steps
    assert all(b[1] == c[0] for b, c in zip(bounds, bounds[1:]))
    best = min(computed(list(zip((0,) + cuts, cuts + (steps,))))
               for n in range(k) for cuts in itertools.combinations(range(1, steps), n))
    assert computed(bounds) == best


def test_sample_pieces_must_cover_the_steps(setup):
  _, diffusion, *_ = setup
  forward = lambda x, t, row: (x, ())
  noise = jnp.zeros((1, 2, 2, 1))
  with pytest.raises(ValueError, match="every requested step"):
    run_pieces([(np.arange(100), forward)], diffusion, noise, jax.random.key(0))
  with pytest.raises(ValueError, match="every requested step"):   # out of order
    run_pieces([(np.arange(100, 250), forward), (np.arange(100), forward)], diffusion, noise,
                           jax.random.key(0))


def test_chain_token_fractions_follow_the_sampler(setup):
  """The per-call routed fractions of a real chain (what the benchmark fits token capacities to)."""
  model, *_ = setup
  fractions = generate(model, np.arange(2), jax.random.PRNGKey(0),
                       SampleOptions("ddim", "ddim10", cfg_scale=1.5)).token
  assert fractions.shape == (10, model.config.depth)
  np.testing.assert_array_equal(fractions[:, NO_TOKEN_LAYER], 0.0)
  np.testing.assert_array_equal(fractions[:, ALL_TOKEN_LAYER], 1.0)
  mixed = np.delete(fractions, [NO_TOKEN_LAYER, ALL_TOKEN_LAYER], axis=1)
  assert 0.05 < mixed.mean() < 0.95 and mixed.std() > 0       # calls differ along the chain


def test_compiled_forwards_have_no_hidden_loops(setup, segmented):
  """A while loop is a host round trip per iteration on a GPU: the bucket engine's only loop is the
  layer scan, a segment program has none (e.g. `jnp.searchsorted` would add one per layer)."""
  model, _, plan, engine, *_ = setup
  segments, _ = segmented
  x, t, y = _inputs(model.config, int(plan.timesteps[5]))
  loops = lambda fn, arrays: jax.jit(fn).lower(arrays, x, t, y).compile().as_text().count(" while(")
  assert loops(lambda a, x, t, y: engine.apply(a, x, t, y, 5), engine.arrays) == 1
  assert loops(lambda a, x, t, y: segments.apply_segment(0, a, x, t, y, 5), segments.arrays) == 0


def test_bf16_residual_stream_engine_matches_masked_forward(setup):
  # With the residual stream in bfloat16 (ModelConfig.residual_dtype) and fp32 matmuls, engine and
  # masked model round the same sums at the same points: equal up to an odd one-ulp difference.
  model, _, plan, *_ = setup
  model16 = compute_model(model, "float32", residual_dtype="bfloat16")
  engine = DynamicEngine(model16, plan, FP32)
  graphdef, state = nnx.split(model16)
  x, t, y = _inputs(model.config, int(plan.timesteps[100]), seed=3)
  tokens = nnx.merge(graphdef, state).embed(x, t, y)[0]
  assert tokens.dtype == jnp.bfloat16
  want, masks = jax.jit(lambda s: nnx.merge(graphdef, s)(x, t, y, return_masks=True))(state)
  got, kept = jax.jit(engine.apply)(engine.arrays, x, t, y, 100)
  assert got.dtype == jnp.float32 and rel_l2(got, want) <= 1e-3
  np.testing.assert_array_equal(np.asarray(kept).T, np.asarray(masks["token"].sum(-1)))
  # The bf16 stream changes the float32 model's output by bf16 rounding only.
  graphdef32, state32 = nnx.split(model)
  full = jax.jit(lambda s: nnx.merge(graphdef32, s)(x, t, y))(state32)
  assert 1e-6 < rel_l2(want, full) <= 3e-2
