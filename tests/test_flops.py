"""MAC accounting against published numbers and hand-computed mask sets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dydit_jax.models import flops
from dydit_jax.models.config import model_config
from model_utils import HAND_CONFIG, hand_masks

# DiT paper Table 4 "Gflops" (= GMACs), one forward of one sample.
PAPER_GMACS = {
    ("DiT-S/2", 256): 6.06, ("DiT-S/4", 256): 1.41, ("DiT-S/8", 256): 0.36,
    ("DiT-B/2", 256): 23.01, ("DiT-B/4", 256): 5.56, ("DiT-B/8", 256): 1.42,
    ("DiT-L/2", 256): 80.71, ("DiT-L/4", 256): 19.70, ("DiT-L/8", 256): 5.01,
    ("DiT-XL/2", 256): 118.64, ("DiT-XL/4", 256): 29.05, ("DiT-XL/8", 256): 7.39,
    ("DiT-XL/2", 512): 524.6,
}
# `FLOPS` table of the official DyDiT loss.py (GMACs per block at N = 256).
DYDIT_LOSS_GMACS = {
    "DiT-S/2": (0.201326592, 0.301989888),
    "DiT-B/2": (0.704643072, 1.207959552),
    "DiT-XL/2": (1.50994944, 2.717908992),
}

TINY = HAND_CONFIG


@pytest.mark.parametrize("name,image_size", sorted(PAPER_GMACS))
def test_dense_macs_match_dit_paper(name, image_size):
  got = flops.dense_macs(model_config(name, image_size)) / 1e9
  assert abs(got - PAPER_GMACS[(name, image_size)]) < 0.01


def test_matmul_only_count_misses_512px_entry():
  """Documents why modulation is counted: without it the 512px entry is off by > 0.05."""
  got = flops.dense_macs(model_config("DiT-XL/2", 512), count_modulation=False) / 1e9
  assert 0.05 < 524.6 - got < 0.07


@pytest.mark.parametrize("name", sorted(DYDIT_LOSS_GMACS))
def test_layer_macs_match_official_loss_table(name):
  attn, mlp = flops.layer_macs(model_config(name, 256))
  want_attn, want_mlp = DYDIT_LOSS_GMACS[name]
  assert abs(attn / 1e9 - want_attn) < 1e-9
  assert abs(mlp / 1e9 - want_mlp) < 1e-9


def test_layer_macs_other_token_count():
  attn, mlp = flops.layer_macs(TINY, num_tokens=4)
  assert (attn, mlp) == (4 * 4 * 64 ** 2 + 2 * 16 * 64, 8 * 4 * 64 ** 2)
  assert flops.macs_to_flops(attn) == 2 * attn


def test_all_open_masks_give_ratio_one_and_dense_macs():
  cfg = model_config("DiT-S/2", 256, dynamic=True)
  b, l, h, n = 3, cfg.depth, cfg.num_heads, cfg.num_tokens
  masks = {"head": jnp.ones((b, l, h)), "group": jnp.ones((b, l, h)), "token": jnp.ones((b, l, n))}
  np.testing.assert_allclose(flops.macs_ratio(cfg, masks), np.ones(b), rtol=1e-6)
  for routers in (False, True):
    dense = flops.dense_macs(cfg, include_routers=routers)
    np.testing.assert_allclose(flops.dydit_macs(cfg, masks, include_routers=routers), np.full(b, dense), rtol=1e-6)


def test_hand_computed_ratio():
  # Sample 0: 0.5*A + 0.25*0.5*M + A + 0.25*M = 638976; / (2 * 819200) = 0.39.
  ratio = flops.macs_ratio(TINY, hand_masks())
  np.testing.assert_allclose(ratio, [0.39, 1.0], rtol=1e-6)


def test_hand_computed_dydit_macs():
  # Sample 0 blocks: 638976 (as above) + MLP-side modulation k*N*D = (0.5 + 0.25) * 1024 = 768
  #   + static per block (adaLN 6*64^2 = 24576, attention-side modulation 1024) * 2 = 51200.
  # Outside blocks: patch 16*2*2*4*64 = 16384, t-embedder 256*64 + 64^2 = 20480,
  #   final adaLN 2*64^2 = 8192, final linear 16*64*2*2*8 = 32768, final modulation 1024 -> 78848.
  macs = flops.dydit_macs(TINY, hand_masks())
  dense = flops.dense_macs(TINY)
  np.testing.assert_allclose(macs, [638976 + 768 + 51200 + 78848, dense], rtol=1e-7)
  # Routers: width 2*64*3 = 384 and token 16*(64*4 + 4) = 4160 per block, both blocks.
  with_routers = flops.dydit_macs(TINY, hand_masks(), include_routers=True)
  np.testing.assert_allclose(with_routers - macs, [9088, 9088], rtol=1e-7)
  assert flops.router_macs(TINY) == {"width": 384, "token": 4160}


def test_dydit_macs_jit_and_shape_check():
  got = jax.jit(lambda m: flops.dydit_macs(TINY, m))(hand_masks())
  np.testing.assert_allclose(got, flops.dydit_macs(TINY, hand_masks()), rtol=1e-7)
  bad = dict(hand_masks(), token=jnp.ones((2, 2, 15)))
  with pytest.raises(ValueError, match="do not fit"):
    flops.macs_ratio(TINY, bad)


def test_dydit_macs_of_xl_under_jit():
  # XL's per-layer MLP MACs (2.7e9) overflow int32: the constants must enter the jitted product as
  # floats, or jax >= 0.11 refuses the Python int (found on an H100 through the sample CLI).
  cfg = model_config("DiT-XL/2", 256, dynamic=True)
  l, h, n = cfg.depth, cfg.num_heads, cfg.num_tokens
  masks = {"head": jnp.ones((1, l, h)), "group": jnp.ones((1, l, h)), "token": jnp.ones((1, l, n))}
  got = jax.jit(lambda m: flops.dydit_macs(cfg, m))(masks)
  np.testing.assert_allclose(got, [flops.dense_macs(cfg)], rtol=1e-6)
