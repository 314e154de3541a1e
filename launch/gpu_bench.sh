#!/usr/bin/env bash
# Fast dynamic inference on one GPU, in one table: dense DiT-XL/2 vs DyDiT at MACs ratio ~0.49, bf16.
#
# Run from the repository root of a checkout on a GPU machine with jax[cuda], flax, optax, orbax
# installed (the package itself need not be installed):
#   bash launch/gpu_bench.sh
# It runs one `python -m dydit_jax.bench` process under a hard time limit and prints a markdown
# table as each row finishes (so a timeout still shows every finished row), then a summary table.
# Rows, in this order:
#   matmul                 bf16 8192^3 matmul TFLOP/s: the ceiling for every "% matmul" cell
#   forward ATTN           one dense forward at 256 rows (the ">= 60% of matmul" check)
#   chain ATTN ddpm250     DDPM-250 + CFG (scale 1.5), BATCH images = 2*BATCH rows per model call:
#                          dense, then each DyDiT engine of ENGINES (buckets: one program with a
#                          per-layer lax.switch over width buckets; segments: SEGMENTS programs with
#                          static per-layer widths, layers unrolled); STEPS of the 250 steps run
#                          (spread over the schedule, each with its true t, plan row and coefficients),
#                          s/image extrapolated to 250 steps; "compile s" = engine compile for XL
#                          (segment programs compile in parallel threads); each chain runs once
#                          untimed first. With PROFILE=1 each chain is traced once more and the
#                          device busy / idle time and top kernels are printed under its row.
#   chain ATTN ddpm250 bf16  the same with a bfloat16 residual stream (dense and DyDiT alike, with its
#                          own dense baseline): what the width-independent residual passes cost
#   chain ATTN ddim50      DDIM-50 + CFG chains, same engines (last: a timeout cuts only these rows)
# Weights are random (speed depends on them only through the masks); routers are synthetic
# (`dydit_jax.bench.synthetic`): more width at low noise, 85% of tokens routed on a calibration
# batch, MACs ratio ~0.49 of dense.
#
# Environment: BUDGET hard limit in seconds (default 300), BATCH images (default 128), MODEL
# (default DiT-XL/2), ATTENTION cudnn | xla (default cudnn; a CPU smoke run:
# MODEL=DiT-S/8 BATCH=1 STEPS=2 SEGMENTS=2 ATTENTION=xla),
# STEPS chain steps actually run (default 25), ENGINES (default buckets; buckets,segments also times
# the segment engine, whose XL programs take minutes to compile: raise BUDGET), SEGMENTS
# (default 8), PROFILE (default 1; 0 = no traces), EXACTNESS (default 0; 1 = run tests/test_engine.py
# on the device first, in fp32 with highest matmul precision, under EXACTNESS_BUDGET s), OUT output folder (default workdir_bench: ignored by
# git; holds bench.json and bench.log), EXTRA more bench flags, e.g. EXTRA="--head_buckets 4
# --group_buckets 4 --token_buckets 6" (fewer compiled branches) or "--token_keep 1.0" (width only), RESIDUAL_AB
# (default 1; 0 = no bf16-residual rows).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-workdir_bench}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not available"

if [ "${EXACTNESS:-0}" != 0 ]; then  # the engines' fp32 exactness tests on this device first (needs pytest)
  JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout -k 15 "${EXACTNESS_BUDGET:-180}" \
    python -m pytest -q -p no:cacheprovider tests/test_engine.py 2>&1 | tail -5 | tee "$OUT/exactness.log"
fi
ATTN="${ATTENTION:-cudnn}"
PROFILE_FLAG=""
if [ "${PROFILE:-1}" != 0 ]; then PROFILE_FLAG="--profile $OUT/prof"; fi
AB_PART=""
if [ "${RESIDUAL_AB:-1}" != 0 ]; then AB_PART="chain:$ATTN:ddpm250:bfloat16,"; fi
timeout -k 15 "${BUDGET:-300}" python -u -m dydit_jax.bench \
  --model "${MODEL:-DiT-XL/2}" --image_size 256 --dtype bfloat16 --batch "${BATCH:-128}" --cfg_scale 1.5 \
  --routers synthetic:0.49 --samplers ddpm250,ddim50 --steps_limit "${STEPS:-25}" \
  --engines "${ENGINES:-buckets}" --segments "${SEGMENTS:-8}" \
  --forward_batch 256 --iters 5 \
  --parts "matmul,forward:$ATTN,chain:$ATTN:ddpm250,${AB_PART}chain:$ATTN:ddim50" \
  --json "$OUT/bench.json" --verbose $PROFILE_FLAG ${EXTRA:-} 2>&1 | tee "$OUT/bench.log"
rc=${PIPESTATUS[0]}
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  echo "TIMEOUT after ${BUDGET:-300}s: the rows printed above are the parts that finished"
fi
exit "$rc"
