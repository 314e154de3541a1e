"""Test setup and shared fixtures: jax stays on the CPU; tiny random DiT / DyDiT models.

Tests import helpers from this folder (`model_utils`, `train_helpers`, ...). Models are random in
every parameter (`dydit_jax.models.random_weights`, shared with the benchmark): an adaLN-Zero DiT at
init outputs zeros and would make any comparison pass. `pytest -m "not slow"` skips the end-to-end
tests (subprocess runs, demo, benchmark) for a quick development loop; CI runs everything.
"""
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from dydit_jax.models import DiT, ModelConfig  # noqa: E402
from dydit_jax.models.random_weights import randomize, randomize_routers  # noqa: E402

# 8x8x1 inputs, 16 tokens, width 32, 4 heads / groups, 4 classes: a chain of 25 steps takes ~1 s.
TINY = ModelConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=4,
                   num_classes=4)


@pytest.fixture(scope="session")
def tiny_dit() -> DiT:
  """A plain DiT (TINY), every parameter ~ N(0, 0.05^2). Do not modify it: clone it (`nnx.clone`)."""
  return randomize(DiT(TINY, rngs=nnx.Rngs(0)), scale=0.05)


@pytest.fixture(scope="session")
def tiny_dydit() -> DiT:
  """A DyDiT (TINY) with random weights and routers that open about half the units and tokens, varying
  with t and the input (router weights ~ N(0, 9 / fan_in)). Do not modify it: clone it."""
  return randomize_routers(randomize(DiT(TINY.replace(dynamic=True), rngs=nnx.Rngs(2)), scale=0.05),
                           weight_scale=3.0)
