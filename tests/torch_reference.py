"""PyTorch reference DiT / DyDiT for the parity tests, written from the papers and the public facts of the official code.

Written from the documented behaviour (dit.md §3-4, dydit.md §1-2, §6, §12), not from the official
sources, and kept deliberately plain: official module names (so `state_dict()` has the official
keys), NCHW tensors, timm-style fused-qkv attention with an explicit softmax, tanh GELU, the
adaLN chunk order (shift, scale, gate) x (msa, mlp), the (shift, scale) final layer, the official
unpatchify and `forward_with_cfg`. DyDiT routers run in eval mode only (deterministic gates,
sigmoid(logit) > 0.5 as the official eval path computes it) for both router releases, and the
forward returns the masks as well.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
  """(grid*grid, dim): [sin, cos] of the column index, then [sin, cos] of the row index (float64)."""
  def one_axis(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    angles = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  coords = np.arange(grid, dtype=np.float64)
  cols, rows = np.meshgrid(coords, coords)          # cols[i, j] = j, rows[i, j] = i
  return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def eval_gate(logits: torch.Tensor) -> torch.Tensor:
  return (torch.sigmoid(logits) > 0.5).float()


class PatchEmbed(nn.Module):
  def __init__(self, in_channels, hidden, patch):
    super().__init__()
    self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch, stride=patch, bias=True)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
  def __init__(self, hidden, freq_dim=256):
    super().__init__()
    self.freq_dim = freq_dim
    self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

  def forward(self, t):
    half = self.freq_dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return self.mlp(torch.cat([torch.cos(args), torch.sin(args)], dim=-1))


class LabelEmbedder(nn.Module):
  def __init__(self, num_classes, hidden):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, hidden)   # last row: the CFG null class

  def forward(self, y):
    return self.embedding_table(y)


class Attention(nn.Module):
  def __init__(self, hidden, heads):
    super().__init__()
    self.heads, self.head_dim = heads, hidden // heads
    self.qkv = nn.Linear(hidden, 3 * hidden)
    self.proj = nn.Linear(hidden, hidden)

  def forward(self, x, head_mask=None):
    b, n, d = x.shape
    q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
    weights = torch.softmax((q * self.head_dim ** -0.5) @ k.transpose(-2, -1), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(b, n, d)
    if head_mask is not None:
      out = out * head_mask.repeat_interleave(self.head_dim, dim=-1)[:, None, :]
    return self.proj(out)


class Mlp(nn.Module):
  def __init__(self, hidden, mlp_hidden, groups):
    super().__init__()
    self.group_size = mlp_hidden // groups
    self.fc1 = nn.Linear(hidden, mlp_hidden)
    self.fc2 = nn.Linear(mlp_hidden, hidden)

  def forward(self, x, group_mask=None):
    h = self.fc1(x)
    if group_mask is not None:
      h = h * group_mask.repeat_interleave(self.group_size, dim=-1)[:, None, :]
    return self.fc2(F.gelu(h, approximate="tanh"))


class Router(nn.Module):
  """TDW width router on the timestep embedding; `forced_first` prepends an always-on unit."""

  def __init__(self, hidden, units, forced_first):
    super().__init__()
    self.forced_first = forced_first
    self.router = nn.Linear(hidden, units - 1 if forced_first else units)

  def forward(self, t_emb):
    g = eval_gate(self.router(t_emb))
    return torch.cat([torch.ones_like(g[:, :1]), g], dim=-1) if self.forced_first else g


class TokenSelect(nn.Module):
  def __init__(self, hidden):
    super().__init__()
    self.mlp_head = nn.Sequential(nn.Linear(hidden, hidden // 16), nn.ReLU(), nn.Linear(hidden // 16, 1))

  def forward(self, x):
    return eval_gate(self.mlp_head(x))            # (B, N, 1)


class DiTBlock(nn.Module):
  def __init__(self, hidden, heads, mlp_ratio, dynamic, forced_first):
    super().__init__()
    self.dynamic = dynamic
    self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden, heads)
    self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.mlp = Mlp(hidden, int(hidden * mlp_ratio), heads)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
    if dynamic:
      self.attn_rate = Router(hidden, heads, forced_first)
      self.mlp_rate = Router(hidden, heads, forced_first)
      self.token_selection = TokenSelect(hidden)

  def forward(self, x, c, t_emb, complete=False):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    routed = self.dynamic and not complete
    b, n, _ = x.shape
    heads = self.attn.heads
    head_mask = self.attn_rate(t_emb) if routed else torch.ones(b, heads)
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa),
                                              head_mask if routed else None)
    token_mask = self.token_selection(x) if routed else torch.ones(b, n, 1)
    group_mask = self.mlp_rate(t_emb) if routed else torch.ones(b, heads)
    branch = gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp),
                                              group_mask if routed else None)
    x = x + token_mask * branch
    return x, (head_mask, group_mask, token_mask[..., 0])


class FinalLayer(nn.Module):
  def __init__(self, hidden, patch, out_channels):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden, patch * patch * out_channels)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
  """forward(x NCHW, t, y, complete=False) -> (out NCHW, masks {"head","group","token"})."""

  def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28, num_heads=16,
               mlp_ratio=4.0, num_classes=1000, learn_sigma=True, dynamic=False, router_format="forced_first"):
    super().__init__()
    self.patch_size, self.in_channels = patch_size, in_channels
    self.out_channels = 2 * in_channels if learn_sigma else in_channels
    grid = input_size // patch_size
    self.x_embedder = PatchEmbed(in_channels, hidden_size, patch_size)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size)
    table = torch.from_numpy(sincos_pos_embed(hidden_size, grid)).float()[None]
    self.pos_embed = nn.Parameter(table, requires_grad=False)
    self.blocks = nn.ModuleList(
        DiTBlock(hidden_size, num_heads, mlp_ratio, dynamic, router_format == "forced_first") for _ in range(depth))
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

  def unpatchify(self, x):
    p, c = self.patch_size, self.out_channels
    h = w = int(x.shape[1] ** 0.5)
    x = x.reshape(x.shape[0], h, w, p, p, c)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

  def forward(self, x, t, y, complete=False):
    x = self.x_embedder(x) + self.pos_embed
    t_emb = self.t_embedder(t)
    c = t_emb + self.y_embedder(y)
    masks = []
    for block in self.blocks:
      x, m = block(x, c, t_emb, complete)
      masks.append(m)
    out = self.unpatchify(self.final_layer(x, c))
    head, group, token = (torch.stack(ms, dim=1) for ms in zip(*masks))
    return out, {"head": head, "group": group, "token": token}

  def forward_with_cfg(self, x, t, y, cfg_scale, guided_channels=3, complete=False):
    half = x[: len(x) // 2]
    out, _ = self.forward(torch.cat([half, half], dim=0), t, y, complete)
    eps, rest = out[:, :guided_channels], out[:, guided_channels:]
    cond, uncond = torch.split(eps, len(eps) // 2, dim=0)
    guided = uncond + cfg_scale * (cond - uncond)
    return torch.cat([torch.cat([guided, guided], dim=0), rest], dim=1)


@torch.no_grad()
def randomize_(model: DiT, seed: int, router_gain: float = 1.0) -> DiT:
  """Random weights for every parameter (adaLN-Zero and the final layer included) except pos_embed.

  Weights ~ N(0, 1/fan_in), biases ~ N(0, 0.1^2), so activations stay O(1) and no layer is zero.
  Router weights are scaled by `router_gain` and their biases zeroed so gates split on/off.
  """
  gen = torch.Generator().manual_seed(seed)
  for name, param in model.named_parameters():
    if name == "pos_embed":
      continue
    is_router = any(part in name for part in ("attn_rate", "mlp_rate", "token_selection"))
    if param.ndim == 1:
      value = 0.0 if is_router else 0.1 * torch.randn(param.shape, generator=gen)
    else:
      fan_in = param[0].numel()
      value = torch.randn(param.shape, generator=gen) / math.sqrt(fan_in)
      if is_router:
        value = value * router_gain
    param.copy_(value)
  return model


@torch.no_grad()
def router_logits(model: DiT, x, t, y) -> dict[str, list[torch.Tensor]]:
  """Raw logits of every router, one tensor per layer, captured by forward hooks."""
  captured = {"attn_rate": [], "mlp_rate": [], "token_selection": []}
  hooks = []
  for block in model.blocks:
    for name, layer in (("attn_rate", block.attn_rate.router), ("mlp_rate", block.mlp_rate.router),
                        ("token_selection", block.token_selection.mlp_head)):
      hooks.append(layer.register_forward_hook(lambda mod, inp, out, name=name: captured[name].append(out)))
  try:
    model(x, t, y)
  finally:
    for hook in hooks:
      hook.remove()
  return captured


@torch.no_grad()
def center_token_routers_(model: DiT, x, t, y) -> DiT:
  """Shift each token router's last bias so its layer keeps about half of these tokens.

  Layer by layer, because a layer's token gates change the input of the next layer's router. The
  threshold sits halfway between the two middle logits, so no logit lands on it.
  """
  for i, block in enumerate(model.blocks):
    logits = router_logits(model, x, t, y)["token_selection"][i].flatten().sort().values
    mid = len(logits) // 2
    block.token_selection.mlp_head[2].bias -= (logits[mid - 1] + logits[mid]) / 2
  return model
