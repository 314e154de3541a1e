"""The benchmark CLI runs end to end on a small model (CPU: correctness of the tooling, not speed),
and the profile summary reads a real trace."""
import jax
import jax.numpy as jnp
import pytest

from dydit_jax import bench
from dydit_jax.bench import profile_summary
from dydit_jax.bench.config import BenchConfig

pytestmark = pytest.mark.slow   # end to end: subprocesses / whole runs (`-m "not slow"` skips)


def test_profile_summary_reads_a_trace(tmp_path):
  f = jax.jit(lambda a: jnp.tanh(a @ a) @ a)
  a = jnp.ones((256, 256))
  f(a).block_until_ready()
  with jax.profiler.trace(str(tmp_path)):
    for _ in range(3):
      f(a).block_until_ready()
  s = profile_summary.summarize(tmp_path)
  assert s.kernels and s.kernels[0][1] > 0 and s.kernels[0][2] >= 3
  assert 0 < s.busy_ms <= s.span_ms + 1e-6
  # Every kernel counts in exactly one kind; kernels may overlap in time, so the sum can pass busy.
  assert sum(s.kinds.values()) >= s.kernels[0][1] and set(s.kinds) <= {"matmul", "attention", "copy", "fusion", "other"}
  text = profile_summary.format_summary(s, "toy")
  assert "idle" in text and s.kernels[0][0][:20] in text


def test_bench_rows_for_dense_and_both_engines(tmp_path):
  rows = bench.run(BenchConfig(model="DiT-S/8", batch=1, samplers=("ddim50",), steps_limit=2,
                               parts=("chain", "chain:xla:ddim50:bfloat16"),
                               engines=("buckets", "segments"), segments=2, routers="synthetic:0.5",
                               warmup=0,                   # timing is not what this test checks
                               token_caps="calibrated",    # the chain-fitted default: the next test
                               json=str(tmp_path / "bench.json")))
  models = ["dense", "DyDiT buckets", "DyDiT segments x2"]
  assert [(r["part"], r["model"]) for r in rows] == ([("chain", m) for m in models]
                                                     + [("chain", f"{m}, bfloat16 residual") for m in models])
  for r in rows:
    assert "ERROR" not in r.get("note", "") and r["ms/call"] > 0
  for r in rows[1:3] + rows[4:]:
    assert 0.3 < r["MACs ratio"] < 0.7 and r["speedup"] > 0
    assert "the analytic MACs" in r["note"]
  assert rows[3]["speedup"] == 1.0                       # the bf16 rows compare with their own dense row
  assert (tmp_path / "bench.json").stat().st_size > 100


def test_bench_calls_profile_and_cost_part_at_another_batch(tmp_path, capsys):
  rows = bench.run(BenchConfig(model="DiT-S/8", batch=1, samplers=("ddim50",), steps_limit=2,
                               parts=("chain", "calls", "hlo", "cost"), calls=2, engines=("buckets-3x3",),
                               routers="synthetic:0.5", cost_batch=3, profile=str(tmp_path / "prof"),
                               profile_chains=False))
  engine = "DyDiT buckets 3x3"          # an engine variant: its own head / group capacities
  assert [(r["part"], r["model"]) for r in rows] == [("chain", "dense"), ("chain", engine), ("calls", "dense"),
                                                     ("calls", engine), ("hlo", "dense"), ("hlo", engine),
                                                     ("cost", "dydit")]
  assert "3 attn + " in rows[1]["note"]
  out = capsys.readouterr().out
  assert out.count("profile call_ddim50_xla_") == 2 and "profile ddim50_xla_" not in out  # calls traced, chains not
  assert "conditionals" in rows[5]["note"] and "conditionals" not in rows[4]["note"]
  assert (tmp_path / "prof" / "hlo_DyDiT_buckets_3x3_xla.txt").stat().st_size > 1000
  assert 0.3 < rows[3]["MACs ratio"] < 0.7 and rows[3]["speedup"] > 0 and "ERROR" not in rows[3]["note"]
  cost_row = rows[-1]
  assert cost_row["rows"] == 6 and "ERROR" not in cost_row["note"]
  bytes_ratio = float(cost_row["note"].split("(ratio ")[-1].rstrip(")"))
  assert 0.3 < cost_row["MACs ratio"] < bytes_ratio < 1.0


def test_train_step_benchmark_runs_the_trainer_step():
  from dydit_jax.bench import train_step
  r = train_step.run("DiT-S/8", batch=2, dtype="float32", steps=1, complete=True, remat=False, attention="xla",
                     matmul_size=128)
  assert r["mesh"] == {"data": jax.device_count(), "fsdp": 1}
  assert r["steps_per_s"] > 0 and 0 < r["mfu"] and jnp.isfinite(r["loss"])


def test_kernel_kinds_of_gpu_kernel_names():
  # Names from an H100 trace of the dense DiT and the engine (docs/benchmarks.md §3c).
  kinds = {"nvjet_sm90_tst_192x128_64x5_1x2_h_bz_coopB_NNT": "matmul",
           "sm90_xmma_gemm_f32f32_tf32f32_f32_nn_n_tilesize128x256x32": "matmul",
           "gemm_fusion_dot_general_7": "matmul",
           "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7": "attention",
           "loop_multiply_fusion": "fusion", "loop_select_fusion_7": "fusion", "fusion_6141": "fusion",
           "memcpy128": "copy", "Memset 3": "copy", "wrapped_iota": "other"}
  assert {name: profile_summary.kernel_kind(name) for name in kinds} == kinds


def test_kernel_families_hlo_census_and_engine_variants():
  assert profile_summary.kernel_family("loop_select_fusion.17") == "loop_select_fusion"
  assert profile_summary.kernel_family("input_reduce_fusion_3") == "input_reduce_fusion"
  assert profile_summary.kernel_family("nvjet_sm90_tst_128x160_64x5_1x2_h_bz_NNT") == "nvjet_sm90_tst_128x160_64x5_1x2_h_bz_NNT"
  text = """%a = f32[2] custom-call(%x), custom_call_target="__cublas$lt$matmul", backend_config={"epilogue":"GELU"}
  %b = f32[2] custom-call(%x), custom_call_target="__cublas$lt$matmul", backend_config={"epilogue":"BIAS"}
  %c = f32[2] fusion(%x), kind=kLoop, calls=%f
  %w = (s32[], /*index=5*/f32[2]) while(%t), condition=%c, body=%b"""
  assert bench.parts.hlo_census(text) == "cublasLt 2, fusions 1, while loops 1, epilogues BIAS 1, GELU 1"
  from dydit_jax.bench.config import engine_variant
  from dydit_jax.errors import UserError
  assert engine_variant("buckets") == ("buckets", None, None)
  assert engine_variant("buckets-12x10") == ("buckets", 12, 10)
  for bad in ("buckets-12", "segments-2x2", "bucket", "buckets-0x3"):
    with pytest.raises(UserError, match="--engines"):
      engine_variant(bad)
