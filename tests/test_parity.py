"""Converted JAX models compute what the PyTorch reference computes (fp32, CPU).

Every parameter is random (adaLN-Zero and the final layer too: a zero-initialized DiT outputs
zeros and would prove nothing). Weights travel the real path: torch.save -> converter CLI ->
model directory -> `load_model`. Tolerance: relative L2 error of the outputs <= 1e-5
(`PARITY_RTOL`); DyDiT masks must agree exactly.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import torch_reference as tr
from convert_helpers import (PARITY_RTOL, jax_forward, random_inputs, rel_l2, run_cli, save_and_convert,
                             to_jax, torch_model)
from dydit_jax import checkpoints
from dydit_jax.diffusion.guidance import forward_with_cfg
from dydit_jax.models.layers import sincos_pos_embed_2d

GEOMETRIES = {
    # head_dim 72 like XL (not a power of two).
    "head_dim_72": dict(input_size=8, patch_size=2, hidden_size=144, depth=2, num_heads=2, num_classes=10),
    # "512 px" style: a larger latent than the model above, same patch (64 tokens) ...
    "latent16_patch2": dict(input_size=16, patch_size=2, hidden_size=64, depth=2, num_heads=4, num_classes=10),
    # ... and the same latent with a coarse patch (4 tokens, 256-wide final linear).
    "latent16_patch8": dict(input_size=16, patch_size=8, hidden_size=64, depth=2, num_heads=4, num_classes=10),
    "patch4": dict(input_size=16, patch_size=4, hidden_size=96, depth=2, num_heads=3, num_classes=7),
    "no_learn_sigma": dict(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=2,
                           num_classes=5, learn_sigma=False),
}
DYDIT = dict(input_size=8, patch_size=2, hidden_size=128, depth=3, num_heads=4, num_classes=10)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_dit_parity(name, tmp_path):
  geometry = GEOMETRIES[name]
  ref = torch_model(seed=1, **geometry)
  model = save_and_convert(ref, tmp_path, "--num_heads", str(geometry["num_heads"]))
  x, t, y = random_inputs(ref, batch=3, seed=2)
  with torch.no_grad():
    want, _ = ref(x, t, y)
  got = jax_forward(model, x, t, y)
  assert got.shape == want.shape
  assert rel_l2(got, want.numpy()) <= PARITY_RTOL


def test_registry_model_through_cli(tmp_path):
  """A real registry geometry (DiT-S/2 at 256 px, 33M parameters) through the CLI subprocess."""
  ref = torch_model(seed=3, input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6)
  torch.save(ref.state_dict(), tmp_path / "s2.pt")
  result = run_cli(tmp_path / "s2.pt", tmp_path / "s2", "--model", "DiT-S/2", "--image_size", "256")
  assert result.returncode == 0, result.stderr
  model = checkpoints.load_model(tmp_path / "s2")
  assert model.config.num_heads == 6 and model.config.num_tokens == 256
  x, t, y = random_inputs(ref, batch=2, seed=4)
  with torch.no_grad():
    want, _ = ref(x, t, y)
  assert rel_l2(jax_forward(model, x, t, y), want.numpy()) <= PARITY_RTOL


def _dydit_pair(router_format: str, tmp_path):
  """A reference DyDiT whose gates split about half on for its test batch, and its conversion."""
  ref = torch_model(seed=5, dynamic=True, router_format=router_format, **DYDIT)
  x, t, y = random_inputs(ref, batch=4, seed=6)
  tr.center_token_routers_(ref, x, t, y)
  return ref, save_and_convert(ref, tmp_path, "--num_heads", str(DYDIT["num_heads"])), (x, t, y)


def _assert_decisive_gates(ref, x, t, y):
  """No router logit sits within float rounding of the threshold, so exact mask equality is fair."""
  logits = tr.router_logits(ref, x, t, y)
  assert min(float(torch.cat([l.flatten() for l in ls]).abs().min()) for ls in logits.values()) > 1e-4


@pytest.mark.parametrize("router_format", ["forced_first", "all"])
def test_dydit_parity_eval_and_complete(router_format, tmp_path):
  ref, model, (x, t, y) = _dydit_pair(router_format, tmp_path)
  assert model.config.dynamic and model.config.router_format == router_format
  _assert_decisive_gates(ref, x, t, y)
  with torch.no_grad():
    want, want_masks = ref(x, t, y)
    want_full, _ = ref(x, t, y, complete=True)
  got, got_masks = jax_forward(model, x, t, y, return_masks=True)

  first_routed = 1 if router_format == "forced_first" else 0
  for kind in ("head", "group", "token"):
    np.testing.assert_array_equal(got_masks[kind], want_masks[kind].numpy(), err_msg=kind)
    routed = want_masks[kind][..., first_routed:] if kind != "token" else want_masks[kind]
    assert 0.2 <= float(routed.mean()) <= 0.8, (kind, float(routed.mean()))
  if router_format == "forced_first":
    assert (got_masks["head"][..., 0] == 1).all() and (got_masks["group"][..., 0] == 1).all()
  assert rel_l2(got, want.numpy()) <= PARITY_RTOL

  got_full = jax_forward(model, x, t, y, complete=True)
  assert rel_l2(got_full, want_full.numpy()) <= PARITY_RTOL
  assert rel_l2(got_full, got) > 1e-3      # the routers really changed the output


@pytest.mark.parametrize("guided_channels", [3, 4])
def test_cfg_parity(guided_channels, tmp_path):
  ref, model, (x, t, y) = _dydit_pair("forced_first", tmp_path)
  half = x.shape[0] // 2
  x2, t2 = torch.cat([x[:half], x[half:]]), torch.cat([t[:half], t[:half]])
  y2 = torch.cat([y[:half], torch.full((half,), DYDIT["num_classes"])])
  _assert_decisive_gates(ref, torch.cat([x[:half], x[:half]]), t2, y2)
  with torch.no_grad():
    want = ref.forward_with_cfg(x2, t2, y2, 4.0, guided_channels=guided_channels)
  got = forward_with_cfg(model, *to_jax(x2, t2, y2), 4.0, guided_channels=guided_channels)
  got = np.asarray(got).transpose(0, 3, 1, 2)
  assert rel_l2(got, want.numpy()) <= PARITY_RTOL
  # Channels past the guided ones come from each half unguided (conditional in the first half).
  with torch.no_grad():
    plain, _ = ref(torch.cat([x[:half], x[:half]]), t2, y2)
  np.testing.assert_allclose(want[:, guided_channels:].numpy(), plain[:, guided_channels:].numpy())



@pytest.mark.parametrize("dim,grid", [(144, 4), (1152, 16), (1152, 32)])
def test_analytic_pos_embed_matches_reference(dim, grid):
  """pos_embed travels with the weights, so the output parity above cannot see the analytic table."""
  table = tr.sincos_pos_embed(dim, grid)
  # dit.md §4.1: token 1 = (row 0, col 1) and token G = (row 1, col 0); the first half encodes the column.
  assert table[1, 0] == pytest.approx(np.sin(1.0)) and table[1, dim // 2] == 0.0
  assert table[grid, 0] == 0.0 and table[grid, dim // 2] == pytest.approx(np.sin(1.0))
  np.testing.assert_array_equal(sincos_pos_embed_2d(dim, grid), table.astype(np.float32))
