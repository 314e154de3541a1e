"""A tiny training config for the tests/test_train_*.py subprocess runs (not a test module).

Synthetic 8x8x1 "images", 10 classes, a depth-2 width-32 DyDiT: a step takes milliseconds, so the
tests measure the machinery (sharding, resume, preemption), not the model. Arguments: steps, every
(checkpoint interval), fsdp, dynamic, complete (complete-model loss steps), sample (periodic sample
grid interval, 0 = off).
"""
from dydit_jax.train.config import base_config, parse_arg


def get_config(arg=None):
  a = parse_arg(arg, steps=8, every=4, fsdp=1, dynamic=True, complete=2, sample=0)
  c = base_config()
  c.from_scratch = True
  c.model.name = "DiT-S/2"
  c.model.input_size = 8
  c.model.in_channels = 1
  c.model.num_classes = 10
  c.model.depth = 2
  c.model.hidden_size = 32
  c.model.num_heads = 2
  c.model.dynamic = a.dynamic
  c.data.name = "synthetic"
  c.data.shape = (8, 8, 1)
  c.data.num_classes = 10
  c.data.num_examples = 40           # not a multiple of the batch: batches straddle epochs
  c.batch_size = 16
  c.total_steps = a.steps
  c.optimizer.lr = 1e-2              # large enough that every step visibly changes the params
  c.ema_decay = 0.9
  c.dydit.lambda_hold_steps = 0
  c.dydit.lambda_warmup_steps = 4
  c.dydit.complete_steps = a.complete
  c.mesh.fsdp = a.fsdp
  c.fsdp_min_size_mb = 0.002         # ~2 KB: the block kernels are sharded, biases replicated
  c.checkpoint.every = a.every
  c.checkpoint.use_async = True
  c.log_every = 1
  c.tensorboard = False
  c.parameter_overview = False
  c.sample.every = a.sample
  c.sample.steps = "5"
  c.sample.classes = (1, 2, 3)
  c.sample.per_class = 2
  return c
