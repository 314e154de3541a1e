"""DiT-S/2 or DiT-B/2 -> DyDiT on ImageNet latents (paper Table 6: S 50k, B 100k fine-tune steps).

Run (the pretrained DiT-S/2 and DiT-B/2 of the paper come from Pan et al. 2024; any converted one works):

  python -m dydit_jax.main --config=configs/imagenet.py:size=B,lam=0.5 --workdir=gs://BUCKET/dydit_b2_lam05 \
      --config.init_checkpoint=gs://BUCKET/dit_b2_256 --config.data.path=gs://BUCKET/latents256

  Train the DiT itself first: --config=configs/imagenet.py:size=B,scratch=1 (no init_checkpoint).

Arguments: size (S | B, default S), lam (paper grid 0.9 0.8 0.7 0.5 0.4 0.3), res, bf16, fsdp,
scratch (see configs/xl.py, the XL/2 recipe and the mission's command).

Recipe: as configs/xl.py (AdamW lr 1e-4 constant, no weight decay, batch 256, EMA 0.9999, lambda hold
100 steps then ramp to step 1000, FLOPs loss weight 2, skip at grad norm 200, stratified t, one
optimizer step per iteration) with no complete-model warm-up (the paper's S/B setting); the one
recipe function is `dydit_jax.train.config.imagenet_finetune`.
"""
from dydit_jax.train.config import imagenet_finetune


def get_config(arg=None):
  return imagenet_finetune(arg, sizes=("S", "B"))
