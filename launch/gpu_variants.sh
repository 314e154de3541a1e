#!/usr/bin/env bash
# Variants of the GPU benchmark, one process each, under one time budget: XLA flags are process-wide,
# so an XLA-flag A/B (or a bucket-count change) needs its own process, each with its own dense baseline.
#
# Run from the repository root of a checkout on a GPU machine (jax[cuda], flax, optax, orbax):
#   OUT=workdir_variants BUDGET=330 bash launch/gpu_variants.sh
# Each line of VARIANTS is  NAME | XLA_FLAGS | extra `python -m dydit_jax.bench` flags. Every process
# runs dense DiT-XL/2 vs the DyDiT bucket engine (bf16, batch 128 images + CFG = 256 rows per call,
# DDPM-250 with STEPS of its steps spread over the chain, synthetic routers 0.49, cuDNN attention) and
# prints its table as rows finish; OUT/NAME.log keeps it (OUT/data.tar.gz the JSON tables). Variants run in order
# until BUDGET seconds are spent (a variant that would start with under 60 s left is skipped, and each
# is killed at the budget's end), so put the most important first. OUT/data.tar.gz also holds the optimized
# HLO texts the `hlo` parts wrote (kernel names in the profiles are the fusion names of those texts).
#
# The default list is what round 2 (docs/benchmarks.md §3e) left to measure, most important first:
#   base      fp32 and bf16 residual streams, dense vs engine; one model call of each traced (busy /
#             idle, kernel time by kind and family: a whole engine chain's trace did not finish in
#             minutes on an H200); what XLA fused (hlo census, optimized HLO in data.tar.gz)
#   caps12x10 12 head / 10 group capacities (width padding x1.037 -> x1.002), its compile time
#   cudnn2    --xla_gpu_cudnn_gemm_fusion_level=2
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT="${OUT:-workdir_variants}"
BUDGET="${BUDGET:-330}"
STEPS="${STEPS:-16}"
mkdir -p "$OUT/prof"
DEFAULT_VARIANTS="base||--parts chain:cudnn:ddpm250:float32,chain:cudnn:ddpm250:bfloat16,calls:cudnn,hlo:cudnn --profile $OUT/prof --profile_chains=false --calls 4 --forward_attention cudnn --residual_dtype bfloat16
caps12x10||--parts chain:cudnn:ddpm250:bfloat16 --head_buckets 12 --group_buckets 10
cudnn2|--xla_gpu_cudnn_gemm_fusion_level=2|--parts chain:cudnn:ddpm250:bfloat16,hlo:cudnn:dense --profile $OUT/prof/cudnn2"
VARIANTS="${VARIANTS:-$DEFAULT_VARIANTS}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "nvidia-smi not available"
start=$(date +%s)
while IFS='|' read -r name xla args; do
  [ -z "$name" ] && continue
  left=$(( BUDGET - ($(date +%s) - start) ))
  if [ "$left" -lt 60 ]; then echo "SKIPPED $name: ${left}s of the budget left"; continue; fi
  mkdir -p "$OUT/prof/$name"
  echo "=== $name (XLA_FLAGS=${xla:-none}; ${left}s left) ==="
  # shellcheck disable=SC2086  # args is a list of flags
  XLA_FLAGS="$xla" timeout -k 10 "$left" python -u -m dydit_jax.bench \
    --model "${MODEL:-DiT-XL/2}" --image_size 256 --dtype bfloat16 --batch "${BATCH:-128}" --cfg_scale 1.5 \
    --routers synthetic:0.49 --samplers ddpm250 --steps_limit "$STEPS" --engines buckets \
    --attention "${ATTENTION:-cudnn}" --json "$OUT/$name.json" --verbose $args 2>&1 | tee "$OUT/$name.log"
  rc=${PIPESTATUS[0]}
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && echo "TIMEOUT in $name: the rows above are what finished"
done <<< "$VARIANTS"
# One archive for the HLO texts and the JSON tables (few files travel back from a lent machine).
(cd "$OUT" && { find prof -name 'hlo_*.txt'; ls ./*.json; } 2>/dev/null | tar czf data.tar.gz -T - && rm -f ./*.json)
rm -rf "$OUT/prof"   # traces are large; their summaries are in the logs
echo "total $(( $(date +%s) - start ))s"
