"""The training config schema: every field a run may set, with the DyDiT recipe as defaults.

`configs/*.py` start from `base_config()`, which comes LOCKED, and change values; main.py loads them
through `config_flags` (locked too), so a field that is not defined here (a typo) is an error, both
in a config file and on the command line (`--config.optimizer.lr=2e-5`).

Recipe defaults (DyDiT paper §4 and Table 6, the official lambda=0.5 XL scripts): AdamW, constant
lr 1e-4, betas (0.9, 0.999), no weight decay, global batch 256, EMA 0.9999 every step (routers
included), lambda ramp 1000 steps after a 100-step hold at 1, FLOPs-loss weight 2, complete-model
auxiliary loss for the first 30k steps, clip-then-skip at grad norm 200, stratified timesteps.
"""
from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from dydit_jax.errors import UserError
from dydit_jax.models.config import MODEL_NAMES, ModelConfig, model_config
from dydit_jax.train.dydit_objectives import FLOPS_LOSS_WEIGHT, LAMBDA_HOLD_STEPS


def base_config() -> ml_collections.ConfigDict:
  """All fields with the recipe defaults (fine-tune DiT-XL/2 at 256 px into DyDiT, lambda=0.5)."""
  c = ml_collections.ConfigDict()
  c.mode = "train"                 # "train" (one run in --workdir), "demo" (train/demo.py), "sweep" (train/sweep.py)
  c.seed = 0                       # params init (scratch), noise, timesteps, gates, label dropout
  # Where the weights come from when the workdir holds no checkpoint yet (a checkpoint always wins:
  # that is the automatic resume). Exactly one of the two must be set.
  c.init_checkpoint = ""           # a converted model dir (convert.py) or a dydit_jax workdir
  c.from_scratch = False           # random init (DiT pre-training, tests)
  c.reorder_units = False          # sort heads / MLP units by magnitude before adding routers
  # Resume even when the config changes what the workdir's saved state means (train/resume.py).
  c.allow_config_change = False

  c.model = ml_collections.ConfigDict()
  c.model.name = "DiT-XL/2"        # registry name; the fields below override its geometry if > 0
  c.model.image_size = 256
  c.model.input_size = 0           # model side (latent side); 0 = image_size // 8
  c.model.in_channels = 0
  c.model.num_classes = 0
  c.model.depth = 0
  c.model.hidden_size = 0
  c.model.num_heads = 0
  c.model.dynamic = True           # DyDiT (routers); False trains a plain DiT
  c.model.router_format = "forced_first"
  c.model.class_dropout_prob = 0.1
  c.model.prediction = "eps"       # what the model predicts: "eps" (DiT's checkpoints), "x0", "v"
  c.model.dtype = "float32"        # compute dtype; "bfloat16" for speed (params stay float32)
  c.model.attention_impl = ""      # "" = XLA, "cudnn" = fused GPU attention
  c.model.remat = False            # rematerialize blocks in the backward pass (saves memory)

  c.data = ml_collections.ConfigDict()
  c.data.name = "latents"          # "latents" | "mnist" | "synthetic" (dydit_jax.data.make_dataset)
  c.data.path = ""                 # latents: the folder `prepare` wrote
  c.data.seed = 0                  # shuffle seed: the example stream is a function of it
  c.data.num_threads = config_dict.placeholder(int)
  c.data.shape = (32, 32, 4)       # synthetic only
  c.data.num_classes = 1000        # synthetic only
  c.data.num_examples = 1024       # synthetic only

  c.batch_size = 256               # global, summed over all hosts and devices
  c.total_steps = 200_000

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.lr = 1e-4            # constant, no warm-up
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.ema_decay = 0.9999
  c.grad_clip_norm = 200.0         # clip to this global norm; <= 0 disables clipping and skipping
  c.grad_skip_norm = 0.0           # skip the update at raw norm >= this; <= 0: grad_clip_norm

  c.dydit = ml_collections.ConfigDict()
  c.dydit.lam = 0.5                # target FLOPs ratio lambda
  c.dydit.lambda_warmup_steps = 1000
  c.dydit.lambda_hold_steps = LAMBDA_HOLD_STEPS
  c.dydit.flops_weight = FLOPS_LOSS_WEIGHT
  # The official loss squares each GPU's batch-mean ratio (8 GPUs x 32). flops_groups cuts the
  # global batch into that many contiguous groups, reproducing it on any mesh; 1 = whole batch.
  c.dydit.flops_groups = 1
  c.dydit.complete_steps = 30_000  # complete-model loss while step < this; -1 = whole run, 0 = never
  c.dydit.complete_weight = 1.0
  c.stratified_t = True            # sample i draws t from quarter i % 4 of [0, 1000)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                 # -1 = all devices not used by fsdp
  c.mesh.fsdp = 1
  c.fsdp_min_size_mb = 4.0         # arrays smaller than this stay replicated

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every = 5000
  c.checkpoint.keep = 3
  c.checkpoint.use_async = True

  c.log_every = 50
  c.tensorboard = True             # clu writers (TensorBoard + console); False: console + JSONL only
  c.parameter_overview = True

  c.sample = ml_collections.ConfigDict()
  c.sample.every = 0               # periodic class-conditional grid (PNG + image summary); 0 = off
  c.sample.sampler = "ddpm"        # "ddpm" | "ddim"
  c.sample.steps = "250"           # respacing of the sampling chain
  c.sample.cfg_scale = 4.0         # 1 = no guidance
  c.sample.classes = (207, 360, 387, 974, 88, 979, 417, 279)
  c.sample.per_class = 1
  c.sample.seed = 0
  c.sample.use_ema = True

  c.demo = ml_collections.ConfigDict()   # mode "demo" only: stage 1 (plain DiT) of train/demo.py
  c.demo.dit_steps = 600
  c.demo.dit_lr = 2e-3
  c.demo.dit_ema_decay = 0.99
  c.demo.judge_steps = 1200        # training steps of the digit judge (dydit_jax.judge), cached in DIR/judge

  # mode "sweep" only (train/sweep.py): the demo's stages at several lambdas plus a dense control, each
  # model scored by the digit judge and timed. The fine-tune length of every model is total_steps.
  c.sweep = ml_collections.ConfigDict()
  c.sweep.lams = (0.9, 0.7, 0.5, 0.3)   # one DyDiT per target FLOPs ratio
  c.sweep.samplers = ("ddpm", "ddim")
  c.sweep.sampling_steps = 50      # steps of each sampler ("50" for DDPM, "ddim50" for DDIM)
  c.sweep.num_samples = 2000       # class-balanced samples per model and sampler (a multiple of the classes)
  c.sweep.batch = 500              # images per sampling call
  c.sweep.engine = "buckets"       # the fast engine the DyDiTs sample with ("buckets" | "segments")
  c.sweep.bootstrap = 20           # resamples of the samples for the spread of each metric
  c.sweep.grid_per_class = 8       # columns of each sample grid PNG
  c.lock()                         # a typo in a config file is an error, as on the command line
  return c


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """`"lam=0.5,res=256"` -> ConfigDict, each value converted to its default's type.

  `configs/xl.py:lam=0.5,res=256` passes "lam=0.5,res=256" to get_config; an unknown key or a
  malformed pair is an error, like an unknown config field.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or key not in defaults:
      raise ValueError(f"bad config argument {item!r}; known keys: {sorted(defaults)} (as key=value)")
    kind = type(defaults[key])
    if kind is bool:
      if value.lower() not in ("1", "0", "true", "false"):
        raise ValueError(f"config argument {key} wants true/false, got {value!r}")
      out[key] = value.lower() in ("1", "true")
    else:
      out[key] = kind(value)
  return out


def build_model_config(model: ml_collections.ConfigDict) -> ModelConfig:
  """The `ModelConfig` a `config.model` section describes (registry name + non-zero overrides)."""
  overrides = {k: model[k] for k in ("input_size", "in_channels", "num_classes", "depth", "hidden_size",
                                     "num_heads") if model[k] > 0}
  return model_config(model.name, image_size=model.image_size, dynamic=model.dynamic,
                      router_format=model.router_format, class_dropout_prob=model.class_dropout_prob,
                      prediction=model.prediction,
                      dtype=model.dtype, attention_impl=model.attention_impl or None, remat=model.remat,
                      **overrides)


def convert_command(model: ml_collections.ConfigDict) -> str:
  """The command that makes config.init_checkpoint for `model` from the official PyTorch weights."""
  res = model.image_size
  return (f"python -m dydit_jax.convert --src {model.name.replace('/', '-')}-{res}x{res}.pt --dst DIR "
          f"--model {model.name}")


def prepare_command(model: ml_collections.ConfigDict) -> str:
  """The command that makes config.data.path (ImageNet latents) for `model`."""
  return (f"python -m dydit_jax.prepare --vae VAE_DIR --manual_dir IMAGENET_TARS_DIR --out_dir DIR "
          f"--image_size {model.image_size}")


def validate(config: ml_collections.ConfigDict, *, resuming: bool = False) -> None:
  """Errors a run would otherwise hit late (or never, silently): check them before any work.

  Each is a `UserError` naming the field, its value and what is allowed. `resuming`: the workdir
  holds a checkpoint, which the run starts from, so neither init_checkpoint nor from_scratch is needed.
  """
  def need(ok: bool, message: str) -> None:
    if not ok:
      raise UserError(message)

  need(config.mode in ("train", "demo", "sweep"),
       f"config.mode must be 'train', 'demo' or 'sweep', got {config.mode!r}")
  need(not (config.init_checkpoint and config.from_scratch),
       "set exactly one of config.init_checkpoint (a converted DiT dir or a workdir to fine-tune from) "
       "and config.from_scratch=True, not both")
  need(resuming or bool(config.init_checkpoint) or config.from_scratch,
       "set exactly one of config.init_checkpoint (a converted DiT dir or a workdir to fine-tune from: "
       f"{convert_command(config.model)}, then --config.init_checkpoint=DIR) and config.from_scratch=True")
  positive = {"batch_size": config.batch_size, "total_steps": config.total_steps,
              "log_every": config.log_every, "checkpoint.every": config.checkpoint.every,
              "checkpoint.keep": config.checkpoint.keep, "dydit.flops_groups": config.dydit.flops_groups}
  for field, value in positive.items():
    need(value > 0, f"config.{field} must be positive, got {value}")
  need(config.sample.every >= 0, f"config.sample.every must be >= 0 (0 = off), got {config.sample.every}")
  need(0.0 < config.dydit.lam <= 1.0, f"config.dydit.lam must lie in (0, 1], got {config.dydit.lam}")
  need(0.0 <= config.ema_decay <= 1.0, f"config.ema_decay must lie in [0, 1], got {config.ema_decay}")
  need(config.optimizer.lr >= 0, f"config.optimizer.lr must be >= 0, got {config.optimizer.lr}")
  need(config.dydit.complete_steps >= -1,
       f"config.dydit.complete_steps must be >= -1 (-1 = whole run), got {config.dydit.complete_steps}")
  need(config.batch_size % config.dydit.flops_groups == 0,
       f"config.batch_size {config.batch_size} is not divisible by config.dydit.flops_groups "
       f"{config.dydit.flops_groups}")
  need(config.mesh.fsdp >= 1 and (config.mesh.data == -1 or config.mesh.data >= 1),
       f"config.mesh wants fsdp >= 1 and data >= 1 (or -1 = the rest), got data={config.mesh.data} "
       f"fsdp={config.mesh.fsdp}")
  need(config.sample.sampler in ("ddpm", "ddim"),
       f"config.sample.sampler must be 'ddpm' or 'ddim', got {config.sample.sampler!r}")
  # Imported here: the data package pulls in grain, which config files (imported by flag parsing) skip.
  from dydit_jax.data.factory import SOURCES  # pylint: disable=g-import-not-at-top
  need(config.data.name in SOURCES, f"config.data.name must be one of {', '.join(sorted(SOURCES))}, "
       f"got {config.data.name!r}")
  need(config.model.name in MODEL_NAMES,
       f"config.model.name: unknown model {config.model.name!r}; choose one of {', '.join(MODEL_NAMES)}")
  try:
    build_model_config(config.model)
  except ValueError as e:   # UserError included: the geometry the config.model fields describe
    raise UserError(f"config.model: {e}") from e


# DiT -> DyDiT fine-tuning per model size (DyDiT paper Table 6): steps, and the steps of the
# complete-model warm-up loss (0 for S and B; 30k for XL).
FINETUNE_RECIPES = {"S": dict(steps=50_000, complete_steps=0), "B": dict(steps=100_000, complete_steps=0),
                    "XL": dict(steps=200_000, complete_steps=30_000)}


def imagenet_finetune(arg: str | None, sizes: tuple[str, ...]) -> ml_collections.ConfigDict:
  """DiT -> DyDiT fine-tuning on ImageNet latents, the one recipe of configs/imagenet.py and xl.py.

  `arg` keys: size (one of `sizes`, default the first: the DiT-<size>/2 model), lam (target FLOPs
  ratio), res (256 | 512 pixels), bf16 (compute dtype), fsdp (size of the fsdp mesh axis), scratch
  (train a plain DiT from scratch instead: DiT's own recipe).
  """
  a = parse_arg(arg, size=sizes[0], lam=0.5, res=256, bf16=False, fsdp=1, scratch=False)
  if a.size not in sizes:
    raise UserError(f"config argument size must be one of {', '.join(sizes)} here, got {a.size!r}")
  c = base_config()
  c.model.name = f"DiT-{a.size}/2"
  c.model.image_size = a.res
  c.model.dtype = "bfloat16" if a.bf16 else "float32"
  c.mesh.fsdp = a.fsdp
  c.data.name = "latents"
  c.total_steps = FINETUNE_RECIPES[a.size]["steps"]
  c.dydit.lam = a.lam
  c.dydit.complete_steps = FINETUNE_RECIPES[a.size]["complete_steps"]
  c.dydit.flops_groups = 8           # the official loss: per-GPU squares over 8 GPUs x 32 samples
  if a.size == "XL" and a.lam >= 0.7 and not a.scratch:
    # The released lambda=0.7 script (DyDiT/train0.7.sh): lower lr, longer ramp, tighter skip.
    c.optimizer.lr = 2.5e-5
    c.dydit.lambda_warmup_steps = 5000
    c.grad_clip_norm = 50.0
  if a.scratch:
    # DiT (Peebles & Xie): same AdamW / batch / EMA, no clipping, uniform t, no routers; 400k steps
    # is the paper's ablation length (XL/2 reached 7M).
    c.from_scratch = True
    c.model.dynamic = False
    c.grad_clip_norm = 0.0
    c.stratified_t = False
    c.total_steps = 400_000
  c.sample.every = 10_000
  return c
