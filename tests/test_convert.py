"""The converter: input formats, the key table at full scale, and its refusals.

Numerical parity of converted models lives in test_parity.py; here a conversion is checked by
comparing restored parameters exactly, which needs no compilation.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

import torch_reference as tr
from convert_helpers import convert_main, jax_forward, random_inputs, run_cli, save_and_convert, torch_model
from dydit_jax import checkpoints, convert
from dydit_jax.models import model_config

TINY = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10)
HEADS = ("--num_heads", "4")


def _params(model) -> dict:
  return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_params(a, b):
  pa, pb = _params(a), _params(b)
  assert pa.keys() == pb.keys()
  for path in pa:
    np.testing.assert_array_equal(pa[path], pb[path], err_msg=str(path))


# Full-size key tables, checked on shapes only (a real XL conversion is too slow for unit tests) ------
@pytest.mark.parametrize("image_size,dynamic,router_format,keys", [
    (256, False, "forced_first", 292),      # the official DiT-XL-2-256x256.pt has 292 tensors
    (512, False, "forced_first", 292),
    (256, True, "forced_first", 292 + 28 * 8),
    (256, True, "all", 292 + 28 * 8),
])
def test_xl_key_table_matches_model_shapes(image_size, dynamic, router_format, keys):
  with torch.device("meta"):
    ref = tr.DiT(input_size=image_size // 8, dynamic=dynamic, router_format=router_format)
  shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
  assert len(shapes) == keys
  cfg = convert.infer_config(shapes, model="DiT-XL/2", image_size=image_size)
  assert cfg == model_config("DiT-XL/2", image_size=image_size, dynamic=dynamic, router_format=router_format)
  convert.check_keys(shapes, cfg, convert.abstract_shapes(cfg))   # raises on any difference


# Input formats ------------------------------------------------------------------------------------
def test_safetensors_and_module_prefixes_give_the_same_params(tmp_path, monkeypatch):
  ref = torch_model(seed=0, **TINY)
  from_pt = save_and_convert(ref, tmp_path, *HEADS)
  prefixed = {f"module.{k}": v.contiguous() for k, v in ref.state_dict().items()}
  save_file(prefixed, tmp_path / "model.safetensors")
  torch.save({"module": prefixed}, tmp_path / "dyflux_style.pt")
  with monkeypatch.context() as m:
    m.setitem(sys.modules, "torch", None)       # safetensors input must not need PyTorch
    assert convert_main(tmp_path / "model.safetensors", tmp_path / "st", *HEADS) == 0
  assert convert_main(tmp_path / "dyflux_style.pt", tmp_path / "wrapped", *HEADS) == 0
  _assert_same_params(checkpoints.load_model(tmp_path / "st"), from_pt)
  _assert_same_params(checkpoints.load_model(tmp_path / "wrapped"), from_pt)


def test_training_dict_uses_ema_weights(tmp_path, capsys):
  live, ema = torch_model(seed=0, **TINY), torch_model(seed=1, **TINY)
  opt = torch.optim.AdamW(live.parameters(), lr=1e-4)
  live(*random_inputs(live, 2, 0))[0].square().mean().backward()
  opt.step()
  args = argparse.Namespace(model="custom", lr=1e-4, global_batch_size=256)
  torch.save({"model": live.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": args},
             tmp_path / "0050000.pt")
  assert convert_main(tmp_path / "0050000.pt", tmp_path / "from_train", *HEADS) == 0
  err = capsys.readouterr().err
  assert "'ema'" in err and "weights_only=False" not in err     # the Namespace allowlist sufficed
  _assert_same_params(checkpoints.load_model(tmp_path / "from_train"), save_and_convert(ema, tmp_path, *HEADS, name="ema"))


class _EasyConfig(dict):
  """Stands in for the config objects (EasyDict ...) some training scripts pickle: not allowlisted."""


def test_other_pickled_objects_fall_back_with_a_note(tmp_path, capsys):
  ref = torch_model(seed=0, **TINY)
  torch.save({"ema": ref.state_dict(), "args": _EasyConfig(lr=1e-4)}, tmp_path / "ckpt.pt")
  assert convert_main(tmp_path / "ckpt.pt", tmp_path / "out", *HEADS) == 0
  assert "weights_only=False" in capsys.readouterr().err
  _assert_same_params(checkpoints.load_model(tmp_path / "out"), save_and_convert(ref, tmp_path, *HEADS, name="plain"))


def test_export_dit_equals_dydit_complete_mode(tmp_path):
  ref = torch_model(seed=2, dynamic=True, **TINY)
  torch.save({"model": ref.state_dict(), "ema": ref.state_dict()}, tmp_path / "dydit.pt")
  assert convert_main(tmp_path / "dydit.pt", tmp_path / "dydit", *HEADS) == 0
  assert convert_main(tmp_path / "dydit.pt", tmp_path / "dit", *HEADS, "--export_dit") == 0
  dydit, dit = checkpoints.load_model(tmp_path / "dydit"), checkpoints.load_model(tmp_path / "dit")
  assert dydit.config.dynamic and not dit.config.dynamic
  assert not any("rate" in str(p) or "token_selection" in str(p) for p in _params(dit))
  x, t, y = random_inputs(ref, 3, 1)
  np.testing.assert_allclose(jax_forward(dit, x, t, y), jax_forward(dydit, x, t, y, complete=True),
                             rtol=1e-6, atol=1e-6)


def test_stored_pos_embed_is_kept_with_a_warning(tmp_path, capsys):
  ref = torch_model(seed=0, **TINY)
  with torch.no_grad():
    ref.pos_embed.add_(0.5)
  model = save_and_convert(ref, tmp_path, *HEADS)
  assert "pos_embed differs" in capsys.readouterr().err
  np.testing.assert_array_equal(np.asarray(model.pos_embed[...]), ref.pos_embed.numpy())


def test_overwrite_replaces_the_directory(tmp_path):
  first, second = torch_model(seed=0, **TINY), torch_model(seed=1, **TINY)
  torch.save(first.state_dict(), tmp_path / "a.pt")
  torch.save(second.state_dict(), tmp_path / "b.pt")
  assert convert_main(tmp_path / "a.pt", tmp_path / "out", *HEADS) == 0
  assert convert_main(tmp_path / "b.pt", tmp_path / "out", *HEADS, "--overwrite") == 0
  _assert_same_params(checkpoints.load_model(tmp_path / "out"), save_and_convert(second, tmp_path, *HEADS, name="b2"))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.pt", "b.pt", "b2", "b2.pt", "out"]


# Refusals: non-zero exit, one message, nothing written -----------------------------------------------
def _state_dict(**changes):
  sd = torch_model(seed=0, **{**TINY, **changes}).state_dict()
  return {k: v.clone() for k, v in sd.items()}


def _bad_inputs(tmp_path):
  """name -> (source file, extra flags, expected words in the message)."""
  good = _state_dict()
  torch.save(good, tmp_path / "good.pt")
  cases = {"wrong_model": (tmp_path / "good.pt", ("--model", "DiT-S/2"), "--model DiT-S/2 has depth 12")}

  data = (tmp_path / "good.pt").read_bytes()
  (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
  cases["truncated"] = (tmp_path / "truncated.pt", HEADS, "truncated or corrupt")
  (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
  cases["truncated_safetensors"] = (tmp_path / "truncated.safetensors", HEADS, "truncated or corrupt")

  torch.save(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Linear(8, 2)).state_dict(),
             tmp_path / "other.pt")
  cases["not_dit"] = (tmp_path / "other.pt", HEADS, "not a DiT")

  broken = dict(good)
  del broken["blocks.1.attn.proj.bias"]
  broken["blocks.0.extra.weight"] = torch.zeros(3)
  broken["blocks.0.mlp.fc1.bias"] = torch.zeros(7)
  torch.save(broken, tmp_path / "broken.pt")
  cases["missing_unexpected_mismatched"] = (
      tmp_path / "broken.pt", HEADS,
      "1 missing, 1 unexpected, 1 mismatched\n  missing: blocks.1.attn.proj.bias\n  unexpected: blocks.0.extra.weight\n"
      "  mismatched: blocks.0.mlp.fc1.bias (7,) (expected (256,))")

  cases["wrong_image_size"] = (tmp_path / "good.pt", (*HEADS, "--image_size", "512"), "not --image_size 512")
  cases["no_head_count"] = (tmp_path / "good.pt", (), "pass --model")
  cases["heads_do_not_divide"] = (tmp_path / "good.pt", ("--num_heads", "5"), "not divisible by num_heads 5")

  dydit = _state_dict(dynamic=True)
  for i in range(TINY["depth"]):
    for name in ("attn_rate", "mlp_rate"):
      dydit[f"blocks.{i}.{name}.router.weight"] = dydit[f"blocks.{i}.{name}.router.weight"][:2]
      dydit[f"blocks.{i}.{name}.router.bias"] = dydit[f"blocks.{i}.{name}.router.bias"][:2]
  torch.save(dydit, tmp_path / "router_width.pt")
  cases["router_width"] = (tmp_path / "router_width.pt", HEADS, "has 2 outputs; with 4 heads")
  return cases


def test_bad_inputs_fail_cleanly(tmp_path, capsys):
  sources = tmp_path / "src"
  sources.mkdir()
  cases = _bad_inputs(sources)
  for name, (src, flags, words) in cases.items():
    dst = tmp_path / name
    assert convert_main(src, dst, *flags) != 0, name
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("error:") == 1 and "Traceback" not in err, (name, err)
    assert words.replace("\n  ", "; ") in err, (name, err)
    assert not dst.exists(), name
  assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]      # no temporary directories left behind


def test_existing_destination_is_refused_before_reading(tmp_path, capsys):
  dst = tmp_path / "out"
  dst.mkdir()
  (dst / "keep.txt").write_text("precious")
  assert convert_main(tmp_path / "does_not_exist.pt", dst, *HEADS) != 0
  assert "already exists and is not empty" in capsys.readouterr().err
  assert [p.name for p in dst.iterdir()] == ["keep.txt"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
  torch.save(_state_dict(), tmp_path / "good.pt")

  def fail(*args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(checkpoints.ocp.StandardCheckpointer, "save", fail)
  with pytest.raises(OSError, match="disk full"):
    convert_main(tmp_path / "good.pt", tmp_path / "out", *HEADS)
  assert [p.name for p in tmp_path.iterdir()] == ["good.pt"]


def test_cli_reports_bad_input_without_traceback(tmp_path):
  (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 not really a zip file")
  result = run_cli(tmp_path / "junk.pt", tmp_path / "out", *HEADS)
  assert result.returncode == 1
  assert result.stderr.startswith("error: ") and "Traceback" not in result.stderr, result.stderr
  assert not (tmp_path / "out").exists()

