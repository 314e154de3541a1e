"""Analytic multiply-accumulate (MAC) accounting for DiT and DyDiT forwards.

Units: every count here is in MACs (one multiply-add = 1), the convention of the DiT paper's "Gflops"
and of the DyDiT FLOPs table; FLOPs = 2 * MACs (`macs_to_flops`). Counts are for ONE forward of ONE
sample (no classifier-free-guidance doubling).

What is counted, for a model of width D, depth L, N tokens, patch p (DiT paper §3 and Table 4; DyDiT
paper §3.3 and the official `loss.py`):
  - per block, attention  A = 4 N D^2 + 2 N^2 D  (qkv 3ND^2, proj ND^2, QK^T N^2 D, AV N^2 D)
                MLP       M = 8 N D^2            (fc1 + fc2 at ratio 4)
    `layer_macs` gives (A, M); at N=256 they equal the constants of the official DyDiT `loss.py`.
  - per block, adaLN linear D -> 6D (per sample, not per token).
  - static parts: patch-embed conv (N * p^2 * C_in * D), timestep MLP (256 -> D -> D), label
    embedding (a lookup: 0 MACs), final adaLN (D -> 2D) and final linear (N * D * p^2 * C_out).
  - adaLN modulation x * (1 + scale) + shift, one multiply-add per element of an (N, D) activation,
    three of them per forward (before attention and before the MLP in every block, before the final
    linear). Counting them is what reproduces the DiT paper's table: with them all thirteen published
    values (twelve sizes at 256px plus XL/2 at 512px) are matched within 0.007 GMACs; without them
    (matmuls only) XL/2 at 512px misses by 0.062. The paper does not say which op its counter
    charged; the modulation is the natural MAC-sized candidate. Pass `count_modulation=False` for
    the pure-matmul count.
  - optional DyDiT router costs (`router_macs`): two width routers D -> R per block (R = H-1 or H,
    on the timestep embedding, per sample) and the token router D -> D/16 -> 1 on every token.
Not counted: biases, norms' statistics, softmax, GELU, residual/gate multiplies, sin-cos features.

DyDiT (`dydit_macs`): with per-sample masks, a block costs h*A + k*(g*M + ND) + static, where h / g
are the fractions of open heads / MLP groups and k the fraction of tokens that take the MLP branch
(a closed token skips norm2/modulate/MLP; attention always sees every token). The FLOPs loss uses
the official block-only ratio r_b = sum_l (h A + g k M) / (L (A + M)) (`macs_ratio`).

The mask functions are plain jnp and run inside jit; they accumulate in float32 (relative error
~1e-7, i.e. ~1e4 MACs on a 118 GMAC model).
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from dydit_jax.models.config import ModelConfig

# Width of the sinusoidal timestep features fed to the t-embedder MLP (DiT's frequency_embedding_size).
T_FREQ_DIM = 256


def macs_to_flops(macs):
  """FLOPs counting multiply and add separately (2 per MAC)."""
  return 2 * macs


def _tokens(cfg: ModelConfig, num_tokens: int | None) -> int:
  return cfg.num_tokens if num_tokens is None else int(num_tokens)


def layer_macs(cfg: ModelConfig, num_tokens: int | None = None) -> tuple[int, int]:
  """(A, M): attention and MLP MACs of one dense block at `num_tokens` (default: cfg.num_tokens).

  These are the quantities the DyDiT FLOPs loss scales by the head / group / token fractions.
  """
  n, d, f = _tokens(cfg, num_tokens), cfg.hidden_size, cfg.mlp_hidden
  attn = 4 * n * d * d + 2 * n * n * d
  mlp = 2 * n * d * f
  return attn, mlp


def modulation_macs(cfg: ModelConfig, num_tokens: int | None = None) -> int:
  """MACs of one adaLN modulation x * (1 + scale) + shift over all tokens."""
  return _tokens(cfg, num_tokens) * cfg.hidden_size


def block_adaln_macs(cfg: ModelConfig) -> int:
  """MACs of one block's adaLN linear (D -> 6D), run once per sample."""
  return 6 * cfg.hidden_size * cfg.hidden_size


def embed_macs(cfg: ModelConfig, num_tokens: int | None = None, *, count_modulation: bool = True) -> int:
  """MACs outside the blocks: patch embed, t-embedder, final adaLN + linear (+ final modulation)."""
  n, d, p = _tokens(cfg, num_tokens), cfg.hidden_size, cfg.patch_size
  patch = n * p * p * cfg.in_channels * d
  t_embed = T_FREQ_DIM * d + d * d
  final = 2 * d * d + n * d * p * p * cfg.out_channels
  return patch + t_embed + final + (modulation_macs(cfg, n) if count_modulation else 0)


def router_macs(cfg: ModelConfig, num_tokens: int | None = None) -> dict[str, int]:
  """Per-block DyDiT router MACs: {"width": both TDW routers, "token": the SDT router on all tokens}."""
  n, d, hid = _tokens(cfg, num_tokens), cfg.hidden_size, cfg.token_router_hidden
  return {"width": 2 * d * cfg.router_outputs, "token": n * (d * hid + hid)}


def dense_macs(cfg: ModelConfig, num_tokens: int | None = None, *, count_modulation: bool = True,
               include_routers: bool = False) -> int:
  """MACs of a full dense forward (a DiT, or a DyDiT with every gate open).

  `include_routers` adds the router costs (only when cfg.dynamic), for an honest DyDiT total.
  """
  n = _tokens(cfg, num_tokens)
  attn, mlp = layer_macs(cfg, n)
  block = attn + mlp + block_adaln_macs(cfg) + (2 * modulation_macs(cfg, n) if count_modulation else 0)
  if include_routers and cfg.dynamic:
    block += sum(router_macs(cfg, n).values())
  return cfg.depth * block + embed_macs(cfg, n, count_modulation=count_modulation)


def mask_fractions(masks: Mapping[str, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(h, g, k), each (B, L): fractions of open heads, open MLP groups and MLP-routed tokens.

  `masks` is the model's {"head": (B,L,H), "group": (B,L,H), "token": (B,L,N)}; the head / group
  masks include any forced-on unit, as in the official loss (so h, g >= 1/H there).
  """
  frac = lambda m: jnp.mean(jnp.asarray(m, jnp.float32), axis=-1)
  return frac(masks["head"]), frac(masks["group"]), frac(masks["token"])


def _check_masks(cfg: ModelConfig, masks: Mapping[str, jax.Array]) -> None:
  """Shapes are static under jit, so a mismatched config fails at trace time, not silently."""
  lh, lg, lt = masks["head"].shape[1:], masks["group"].shape[1:], masks["token"].shape[1:]
  want_h = (cfg.depth, cfg.num_heads)
  want_g = (cfg.depth, cfg.num_groups)
  want_t = (cfg.depth, cfg.num_tokens)
  if (lh, lg, lt) != (want_h, want_g, want_t):
    raise ValueError(f"masks (head {lh}, group {lg}, token {lt}) do not fit config "
                     f"(head {want_h}, group {want_g}, token {want_t})")


def fraction_ratio(cfg: ModelConfig, heads, groups, tokens, axis: int = -1):
  """The official ratio from open fractions (layers along `axis`): mean_l (h A + g k M) / (A + M).

  NumPy or JAX arrays; A and M are normalised first so float32 arithmetic stays O(1).
  """
  attn, mlp = layer_macs(cfg)
  a, m = attn / (attn + mlp), mlp / (attn + mlp)
  return (heads * a + groups * tokens * m).mean(axis=axis)


def macs_ratio(cfg: ModelConfig, masks: Mapping[str, jax.Array]) -> jax.Array:
  """(B,) official DyDiT ratio r_b = sum_l (h A + g k M) / (L (A + M)); blocks' A and M only.

  This is the quantity the FLOPs loss drives to lambda; 1 for all-open masks. A and M are
  normalised first so the float32 arithmetic stays O(1).
  """
  _check_masks(cfg, masks)
  return fraction_ratio(cfg, *mask_fractions(masks))


def dydit_macs(cfg: ModelConfig, masks: Mapping[str, jax.Array], *, count_modulation: bool = True,
               include_routers: bool = False) -> jax.Array:
  """(B,) float32 MACs of one DyDiT forward per sample, given the masks it used.

  Equals `dense_macs` (with the same flags) when every mask is 1. Routers, when included, cost the
  same whatever they decide (the token router scores every token).
  """
  _check_masks(cfg, masks)
  return fraction_macs(cfg, *mask_fractions(masks), count_modulation=count_modulation,
                       include_routers=include_routers)


def fraction_macs(cfg: ModelConfig, heads, groups, tokens, axis: int = -1, *, count_modulation: bool = True,
                  include_routers: bool = False):
  """MACs of one forward from open fractions (layers along `axis`), NumPy or JAX: what `dydit_macs`
  counts from masks, for callers that hold fractions (e.g. a sampling run's statistics)."""
  n = cfg.num_tokens
  # Floats: XL's per-layer MACs exceed int32, which a Python int inside a jitted product must fit.
  attn, mlp = (float(v) for v in layer_macs(cfg, n))
  mod = float(modulation_macs(cfg, n)) if count_modulation else 0.0
  dynamic = (heads * attn + tokens * (groups * mlp + mod)).sum(axis=axis)
  static_block = block_adaln_macs(cfg) + mod
  if include_routers and cfg.dynamic:
    static_block += sum(router_macs(cfg, n).values())
  static = cfg.depth * static_block + embed_macs(cfg, n, count_modulation=count_modulation)
  return dynamic + (jnp.float32(static) if isinstance(dynamic, jax.Array) else static)
