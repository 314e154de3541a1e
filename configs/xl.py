"""DiT-XL/2 -> DyDiT-XL/2 on ImageNet latents: the official fine-tuning recipe on a TPU pod or GPUs.

Run (a converted DiT checkpoint and prepared latents first; see README):

  python -m dydit_jax.convert --src DiT-XL-2-256x256.pt --dst gs://BUCKET/dit_xl2_256 --model DiT-XL/2
  python -m dydit_jax.main --config=configs/xl.py:lam=0.5,res=256 --workdir=gs://BUCKET/dydit_xl2_lam05 \
      --config.init_checkpoint=gs://BUCKET/dit_xl2_256 --config.data.path=gs://BUCKET/latents256

  Cloud TPU: python launch/tpu.py run ... --config=configs/xl.py:lam=0.5,res=256 (same flags after --);
  GPU hosts: launch/gpu_multihost.sh. Rerunning the same command resumes from the newest checkpoint.

Arguments: lam (0.7, 0.6, 0.5, 0.3 in the paper), res (256 | 512), bf16 (compute in bfloat16 with
float32 params), fsdp (fsdp mesh axis size; params, EMA and Adam moments sharded over it),
scratch (train a plain DiT-XL/2 from scratch with DiT's recipe instead).

Recipe (DyDiT paper §4 and Table 6; the released DyDiT/train0.5.sh and train0.7.sh scripts):
  AdamW, constant lr 1e-4 (lam >= 0.7: 2.5e-5 as the released script), betas (0.9, 0.999), no weight
  decay; global batch 256; EMA 0.9999 every step, routers included; 200k fine-tune steps; the
  complete-model (routers bypassed) loss during the first 30k steps (the warm-up); lambda held at 1 for
  100 steps, then ramped linearly to the target by step 1000 (lam >= 0.7: 5000); FLOPs loss
  2 * (batch-mean ratio - lambda)^2 over 8 groups of 32 as on the official 8 GPUs; gradients clipped and
  the update skipped at global norm >= 200 (lam >= 0.7: 50); stratified timesteps (sample i in quarter
  i % 4); the optimizer steps ONCE per iteration (the official stage-1 script's double step is a bug).
  The lam=0.7 script keeps the complete-model loss for its whole 150k-step run; pass
  --config.dydit.complete_steps=-1 --config.total_steps=150000 to reproduce it.
"""
from dydit_jax.train.config import imagenet_finetune


def get_config(arg=None):
  return imagenet_finetune(arg, sizes=("XL",))
