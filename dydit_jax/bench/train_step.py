"""Train-step throughput: `python -m dydit_jax.bench.train_step --model DiT-XL/2 --batch 32 --dtype bfloat16`.

Times the real jitted train step (`train.step.make_train_step`: dynamic forward with Gumbel gates,
MSE+VB, FLOPs loss, optional complete-model forward, clip-then-skip, AdamW, EMA) on synthetic
latents, on all devices with the trainer's placement (a (data, fsdp) mesh, FSDP rule for the state,
batch over both axes). Reports steps/s, images/s and model FLOPs utilization against a bf16 matmul
rate measured in the same process.

Model FLOPs per image = 2 x 3 x dense MACs (forward + backward ~ 3 forwards) x (2 with the
complete-model loss): training computes masked dense, so routers save no training FLOPs.
No clu / TensorFlow import: this runs on a bare GPU image.
"""
from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
from absl import flags

from dydit_jax import cli
from dydit_jax.bench.measure import matmul_rate
from dydit_jax.models import model_config
from dydit_jax.models.flops import dense_macs
from dydit_jax.train import sharding
from dydit_jax.train.config import base_config
from dydit_jax.train.state import abstract_state, make_optimizer, model_graphdef, scratch_state
from dydit_jax.train.step import make_train_step


def run(model: str, batch: int, dtype: str, steps: int, complete: bool, remat: bool,
        attention: str = "xla", matmul_size: int = 8192, fsdp: int = 1) -> dict:
  config = base_config()
  cfg = model_config(model, 256, dynamic=True, dtype=dtype, remat=remat, attention_impl=attention)
  tx = make_optimizer(config.optimizer)
  mesh = sharding.make_mesh(fsdp=fsdp)
  shardings = sharding.tree_shardings(abstract_state(cfg, tx), mesh, config.fsdp_min_size_mb * 2 ** 20)
  state = jax.jit(lambda: scratch_state(cfg, tx, 0), out_shardings=shardings)()
  step_fn = jax.jit(make_train_step(cfg, model_graphdef(cfg), tx, config, with_complete=complete),
                    donate_argnums=0, out_shardings=(shardings, None))
  data = sharding.batch_sharding(mesh)
  shape = (batch, cfg.input_size, cfg.input_size, cfg.in_channels)
  batch_arrays = {"x": jax.device_put(jax.random.normal(jax.random.key(0), shape), data),
                  "y": jax.device_put(jnp.arange(batch, dtype=jnp.int32) % cfg.num_classes, data)}
  t0 = time.perf_counter()
  state, metrics = step_fn(state, batch_arrays)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(steps):
    state, metrics = step_fn(state, batch_arrays)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - t0) / steps
  flops_per_image = 2 * 3 * dense_macs(cfg, count_modulation=False) * (2 if complete else 1)
  achieved = flops_per_image * batch / step_s / 1e12
  peak = matmul_rate(matmul_size) * jax.device_count()
  return {"device": jax.devices()[0].device_kind, "devices": jax.device_count(), "mesh": dict(mesh.shape),
          "model": model, "batch": batch, "dtype": dtype, "complete_loss": complete, "remat": remat,
          "attention": cfg.attention_impl, "compile_s": round(compile_s, 1),
          "steps_per_s": round(1 / step_s, 3), "images_per_s": round(batch / step_s, 1),
          "model_tflops": round(achieved, 1), "matmul_tflops": round(peak, 1),
          "mfu": round(achieved / peak, 3), "loss": float(metrics["loss"])}


FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string("model", "DiT-XL/2", "registry name")
  flags.DEFINE_integer("batch", 32, "global batch (images)")
  flags.DEFINE_string("dtype", "bfloat16", "compute dtype")
  flags.DEFINE_integer("steps", 10, "timed steps")
  flags.DEFINE_bool("complete", False, "add the complete-model forward")
  flags.DEFINE_bool("remat", False, "rematerialize blocks in the backward pass")
  flags.DEFINE_enum("attention", "xla", ["xla", "cudnn"], "attention implementation")
  flags.DEFINE_integer("matmul_size", 8192, "n of the n^3 matmul rate")
  flags.DEFINE_integer("fsdp", 1, "FSDP axis size of the mesh (as mesh.fsdp)")


def main(argv):
  del argv  # positional words: refused by cli.guarded
  print(json.dumps(run(FLAGS.model, FLAGS.batch, FLAGS.dtype, FLAGS.steps, FLAGS.complete, FLAGS.remat,
                       FLAGS.attention, FLAGS.matmul_size, FLAGS.fsdp)))


if __name__ == "__main__":
  cli.run(main, define_flags)
