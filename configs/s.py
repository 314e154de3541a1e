"""DiT-S/2 -> DyDiT-S/2 on ImageNet latents (paper Table 6: 50k fine-tune steps, no warm-up).

Run (the pretrained DiT-S/2 of the paper comes from Pan et al. 2024; any converted DiT-S/2 works):

  python -m dydit_jax.main --config=configs/s.py:lam=0.5 --workdir=gs://BUCKET/dydit_s2_lam05 \
      --config.init_checkpoint=gs://BUCKET/dit_s2_256 --config.data.path=gs://BUCKET/latents256

  Train the DiT-S/2 itself first: --config=configs/s.py:scratch=1 (no init_checkpoint).

Arguments: lam (paper grid 0.9 0.8 0.7 0.5 0.4 0.3), res, bf16, fsdp, scratch (see configs/xl.py).

Recipe: as configs/xl.py (AdamW lr 1e-4 constant, no weight decay, batch 256, EMA 0.9999, lambda hold
100 steps then ramp to step 1000, FLOPs loss weight 2, skip at grad norm 200, stratified t, one
optimizer step per iteration) with 50k fine-tune steps and no complete-model warm-up (paper: 0 for S/B).
"""
from dydit_jax.train.config import imagenet_finetune


def get_config(arg=None):
  return imagenet_finetune("DiT-S/2", arg, steps=50_000, complete_steps=0)
