"""configs/*.py: every variant builds, validates, documents its run command and follows the recipe."""
import importlib.util

import pytest

import train_helpers as th
from dydit_jax.train.config import build_model_config, validate


def load(name):
  spec = importlib.util.spec_from_file_location(f"config_{name}", th.REPO / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", ["demo", "imagenet", "xl", "repro_small"])
def test_docstring_gives_the_run_command(name):
  assert f"python -m dydit_jax.main --config=configs/{name}.py" in load(name).__doc__


@pytest.mark.parametrize("name,arg,model,steps,complete", [
    ("imagenet", "", "DiT-S/2", 50_000, 0), ("imagenet", "size=B,", "DiT-B/2", 100_000, 0),
    ("xl", "", "DiT-XL/2", 200_000, 30_000)])
def test_imagenet_recipe(name, arg, model, steps, complete):
  c = load(name).get_config(arg + "lam=0.5,res=256")
  assert (c.model.name, c.total_steps, c.dydit.complete_steps) == (model, steps, complete)
  assert (c.optimizer.lr, c.optimizer.weight_decay, c.batch_size, c.ema_decay) == (1e-4, 0.0, 256, 0.9999)
  assert (c.dydit.lam, c.dydit.lambda_warmup_steps, c.dydit.lambda_hold_steps) == (0.5, 1000, 100)
  assert (c.grad_clip_norm, c.stratified_t, c.dydit.flops_weight, c.dydit.flops_groups) == (200.0, True, 2.0, 8)
  with pytest.raises(ValueError, match="init_checkpoint"):
    validate(c)                                  # fine-tuning needs the converted DiT
  c.init_checkpoint = "gs://bucket/dit"
  validate(c)
  cfg = build_model_config(c.model)
  assert cfg.dynamic and cfg.input_size == 32 and cfg.num_tokens == 256 and cfg.num_classes == 1000


def test_xl_variants():
  xl = load("xl")
  c = xl.get_config("lam=0.7,res=512,bf16=1,fsdp=4")
  assert (c.optimizer.lr, c.dydit.lambda_warmup_steps, c.grad_clip_norm) == (2.5e-5, 5000, 50.0)
  assert (c.model.image_size, c.model.dtype, c.mesh.fsdp) == (512, "bfloat16", 4)
  assert build_model_config(c.model).input_size == 64
  scratch = xl.get_config("scratch=1")
  validate(scratch)
  assert not scratch.model.dynamic and scratch.grad_clip_norm == 0 and not scratch.stratified_t
  with pytest.raises(ValueError, match="lamda"):
    xl.get_config("lamda=0.5")
  with pytest.raises(ValueError, match="size must be one of XL"):
    xl.get_config("size=S")
  with pytest.raises(ValueError, match="size must be one of S, B"):
    load("imagenet").get_config("size=XL")


def test_demo_variants():
  demo = load("demo")
  full, quick = demo.get_config(), demo.get_config("quick=1")
  for c in (full, quick):
    validate(c)
    cfg = build_model_config(c.model)
    assert (cfg.input_size, cfg.in_channels, cfg.num_classes, cfg.num_tokens) == (32, 1, 10, 64)
    assert c.mode == "demo" and c.data.name == "mnist" and c.dydit.lam == 0.5
    assert cfg.prediction == "v"          # the demo's recipe; official checkpoints are eps
  assert quick.demo.dit_steps < full.demo.dit_steps and quick.total_steps < full.total_steps


def test_prediction_is_checked_where_it_is_set():
  from dydit_jax.errors import UserError
  c = load("demo").get_config()
  assert build_model_config(load("xl").get_config().model).prediction == "eps"
  c.model.prediction = "velocity"
  with pytest.raises(UserError, match="prediction must be one of"):
    build_model_config(c.model)
