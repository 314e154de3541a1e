"""Width plan: which attention heads and MLP groups every layer opens at every step of a sampler.

DyDiT's width routers read only the timestep embedding (DyDiT paper §3.1, TDW), so at
inference (gate on <=> logit > 0) the head and group masks are a function of t alone. For a
sampler's timestep list they are computed once, from the parameters, before sampling; the engine then
runs each step with only those units' weights. Cond and uncond halves of a CFG batch share t and
therefore share one plan row. Token (SDT) masks depend on the activations and are not planned.

A plan is data: it saves to .npz (compact) or .json (readable), prints a text summary, draws a heatmap,
and counts exact integer MACs with the same accounting as `dydit_jax.models.flops`.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dydit_jax.models import flops
from dydit_jax.models.config import ModelConfig
from dydit_jax.models.dit import DiT


def _router_masks(router: nnx.Module, t_emb: jax.Array) -> np.ndarray:
  """(S, L, H) eval-mode masks of a stacked `WidthRouter` (the model's own gate rule)."""
  graphdef, state = nnx.split(router)
  masks = jax.vmap(lambda s: nnx.merge(graphdef, s)(t_emb, train=False, key=None, tau=1.0))(state)
  return np.asarray(masks).swapaxes(0, 1) > 0.5


@dataclasses.dataclass(frozen=True, eq=False)
class WidthPlan:
  """Active heads / MLP groups per (step, layer); row i is the model call of sampling step i.

  Attributes:
    config: the model geometry the plan belongs to.
    timesteps: (S,) int32 original-chain timesteps in sampling order (e.g. 999, 995, ..., 0).
    head: (S, L, H) bool, head h of layer l is open at step s.
    group: (S, L, H) bool, MLP group g (hidden units [g*F/H, (g+1)*F/H)) of layer l is open.
  """

  config: ModelConfig
  timesteps: np.ndarray
  head: np.ndarray
  group: np.ndarray

  def __post_init__(self):
    cfg = self.config
    shape = (len(self.timesteps), cfg.depth, cfg.num_heads)
    if self.head.shape != shape or self.group.shape != shape:
      raise ValueError(f"plan masks {self.head.shape} / {self.group.shape} do not match {shape}")

  # Construction ---------------------------------------------------------------------------------
  @classmethod
  def from_model(cls, model: DiT, timesteps) -> "WidthPlan":
    """Evaluates every layer's width routers at `timesteps` (original-chain values, sampling order)."""
    cfg = model.config
    if not cfg.dynamic:
      raise ValueError("a width plan needs a DyDiT (cfg.dynamic); a plain DiT has no routers")
    timesteps = np.asarray(timesteps, np.int32).reshape(-1)
    t_emb = model.t_embedder(jnp.asarray(timesteps))
    head = _router_masks(model.blocks.attn_rate, t_emb)
    group = _router_masks(model.blocks.mlp_rate, t_emb)
    return cls(cfg, timesteps, head, group)

  # Views ----------------------------------------------------------------------------------------
  @property
  def num_steps(self) -> int:
    return len(self.timesteps)

  @property
  def head_counts(self) -> np.ndarray:
    """(S, L) number of open heads."""
    return self.head.sum(-1).astype(np.int32)

  @property
  def group_counts(self) -> np.ndarray:
    """(S, L) number of open MLP groups."""
    return self.group.sum(-1).astype(np.int32)

  def row_of_t(self, num_train_timesteps: int = 1000) -> np.ndarray:
    """(T,) int32 plan row of each original timestep, -1 where the plan has no row."""
    table = np.full(num_train_timesteps, -1, np.int32)
    table[self.timesteps] = np.arange(self.num_steps, dtype=np.int32)
    return table

  def masks(self, kept: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The plan as `flops`-style masks with the steps as the batch axis ({"head","group","token"}).

    kept: optional (S, L) number of MLP-routed tokens; default all tokens (token mask of ones).
    """
    cfg = self.config
    token = np.ones((self.num_steps, cfg.depth, cfg.num_tokens), np.float32)
    if kept is not None:
      token = (np.arange(cfg.num_tokens) < np.asarray(kept)[..., None]).astype(np.float32)
    return {"head": self.head.astype(np.float32), "group": self.group.astype(np.float32), "token": token}

  # MACs -----------------------------------------------------------------------------------------
  def macs(self, kept: np.ndarray | None = None, *, count_modulation: bool = True,
           include_routers: bool = False) -> np.ndarray:
    """Exact integer MACs of one forward of one sample, per step: (S,), or (S, B) with `kept`.

    kept: (S, L, B) tokens each sample routed through each layer's MLP (the engine reports it);
    None counts every token (the SDT-free upper bound of the plan). Accounting = `flops.dydit_macs`:
    a block costs (heads/H) A + (tokens/N) ((groups/H) M + modulation) + adaLN (+ routers).
    """
    cfg = self.config
    n, heads = cfg.num_tokens, cfg.num_heads
    attn, mlp = flops.layer_macs(cfg)
    mod = flops.modulation_macs(cfg) if count_modulation else 0
    per_step = kept is None
    kept = np.full((self.num_steps, cfg.depth, 1), n, np.int64) if per_step else np.asarray(kept, np.int64)
    h = self.head_counts.astype(np.int64)[..., None]
    g = self.group_counts.astype(np.int64)[..., None]
    # A / H, M / (H N) and mod / N are integers for every DiT geometry (D is a multiple of H).
    per_layer = h * (attn // heads) + kept * (g * (mlp // (heads * n)) + mod // n)
    static_block = flops.block_adaln_macs(cfg) + mod
    if include_routers:
      static_block += sum(flops.router_macs(cfg).values())
    static = cfg.depth * static_block + flops.embed_macs(cfg, count_modulation=count_modulation)
    total = per_layer.sum(axis=1) + static
    return total[:, 0] if per_step else total

  def macs_ratio(self) -> float:
    """Official block-only ratio sum_l (h A + g M) / (L (A + M)), averaged over steps (all tokens)."""
    h = self.head_counts / self.config.num_heads
    g = self.group_counts / self.config.num_heads
    return float(np.mean(flops.fraction_ratio(self.config, h, g, 1.0)))

  # I/O ------------------------------------------------------------------------------------------
  def to_dict(self) -> dict:
    """JSON-ready: open unit indices per step and layer."""
    listing = lambda m: [[np.flatnonzero(layer).tolist() for layer in step] for step in m]
    return {"config": self.config.to_dict(), "timesteps": self.timesteps.tolist(),
            "head": listing(self.head), "group": listing(self.group)}

  @classmethod
  def from_dict(cls, d: dict) -> "WidthPlan":
    cfg = ModelConfig.from_dict(d["config"])
    shape = (len(d["timesteps"]), cfg.depth, cfg.num_heads)

    def dense(listing):
      m = np.zeros(shape, bool)
      for s, step in enumerate(listing):
        for l, units in enumerate(step):
          m[s, l, units] = True
      return m

    return cls(cfg, np.asarray(d["timesteps"], np.int32), dense(d["head"]), dense(d["group"]))

  def save(self, path) -> Path:
    """Writes .json (readable index lists) or .npz (bool arrays + config JSON), by suffix."""
    path = Path(path)
    if path.suffix == ".json":
      path.write_text(json.dumps(self.to_dict()))
    elif path.suffix == ".npz":
      np.savez_compressed(path, timesteps=self.timesteps, head=self.head, group=self.group,
                          config=np.asarray(self.config.to_json()))
    else:
      raise ValueError(f"plan files end in .json or .npz, got {path.name}")
    return path

  @classmethod
  def load(cls, path) -> "WidthPlan":
    path = Path(path)
    if path.suffix == ".json":
      return cls.from_dict(json.loads(path.read_text()))
    with np.load(path) as f:
      return cls(ModelConfig.from_json(str(f["config"])), f["timesteps"].astype(np.int32),
                 f["head"].astype(bool), f["group"].astype(bool))

  # Reporting ------------------------------------------------------------------------------------
  def summary(self, segments: int = 5) -> str:
    """Text report: overall fractions, distinct per-step widths, and mean counts per schedule segment."""
    cfg = self.config
    hc, gc = self.head_counts, self.group_counts
    signatures = {(tuple(a), tuple(b)) for a, b in zip(hc, gc)}
    lines = [
        f"width plan: depth {cfg.depth}, {cfg.num_heads} heads / groups, router format "
        f"{cfg.router_format}, {self.num_steps} steps (t {self.timesteps[0]} -> {self.timesteps[-1]})",
        f"open heads {hc.mean() / cfg.num_heads:.3f}, open groups {gc.mean() / cfg.num_heads:.3f}, "
        f"block MACs ratio with all tokens {self.macs_ratio():.3f}",
        f"distinct per-step width signatures: {len(signatures)}; layers with 0 heads: "
        f"{int((hc == 0).sum())}, with 0 groups: {int((gc == 0).sum())} (step-layer pairs)",
        f"{'steps':>11} {'t range':>11} {'heads':>6} {'groups':>6} {'MACs ratio':>10}",
    ]
    attn, mlp = flops.layer_macs(cfg)
    for chunk in np.array_split(np.arange(self.num_steps), min(segments, self.num_steps)):
      h, g = hc[chunk].mean(), gc[chunk].mean()
      ratio = (h * attn + g * mlp) / (cfg.num_heads * (attn + mlp))
      lines.append(f"{chunk[0]:>5}-{chunk[-1]:<5} {self.timesteps[chunk[0]]:>5}-{self.timesteps[chunk[-1]]:<5} "
                   f"{h:>6.2f} {g:>6.2f} {ratio:>10.3f}")
    return "\n".join(lines)

  def plot(self, path) -> Path:
    """Heatmaps (layer x step) of open heads and open groups, saved to `path` (png, pdf, ...)."""
    import matplotlib  # Lazy: plotting is optional and slow to import.
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for ax, counts, name in zip(axes, (self.head_counts, self.group_counts), ("heads", "MLP groups")):
      im = ax.imshow(counts.T, aspect="auto", origin="lower", vmin=0, vmax=self.config.num_heads,
                     cmap="viridis", interpolation="nearest")
      ax.set_ylabel("layer")
      ax.set_title(f"open {name} per layer and sampling step")
      fig.colorbar(im, ax=ax)
    ticks = np.linspace(0, self.num_steps - 1, min(6, self.num_steps)).astype(int)
    axes[-1].set_xticks(ticks, [f"{i}\nt={self.timesteps[i]}" for i in ticks])
    axes[-1].set_xlabel("sampling step (original timestep)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
