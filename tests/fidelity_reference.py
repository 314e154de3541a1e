"""torch-fidelity 0.4.0's FeatureExtractorInceptionV3 (the PyTorch port checked against the TF graph) with
random weights, as the independent reference for the Inception parity tests.

torch-fidelity is installed with `pip install --no-deps torch-fidelity==0.4.0` (its declared
torchvision dependency would pull a torchvision that does not import against this torch). Its
package `__init__` imports torchvision, so the package is registered as a bare namespace over its
real directory and only the Inception module (torch + pure-Python helpers) is imported.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

INSTALL = "pip install --no-deps torch-fidelity==0.4.0"


def _module(name: str):
  if "torch_fidelity" not in sys.modules:
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
      raise ImportError(f"torch-fidelity is not installed: run `{INSTALL}` (see README, test command)")
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
  return importlib.import_module(f"torch_fidelity.{name}")


def resize(images: torch.Tensor, size: int = 299) -> torch.Tensor:
  """torch-fidelity's TF1-legacy bilinear resize of float NCHW images."""
  interp = _module("interpolate_compat_tensorflow")
  return interp.interpolate_bilinear_2d_like_tensorflow1x(images, size=(size, size), align_corners=False)


def random_state_dict(seed: int) -> dict[str, torch.Tensor]:
  """A state dict of FeatureExtractorInceptionV3 with every tensor random: He-scaled convs, BatchNorm
  affines AND moving statistics, fc weight and bias (num_batches_tracked kept, as in real files)."""
  fe = _module("feature_extractor_inceptionv3")
  load = fe.FeatureExtractorInceptionV3.load_state_dict
  fe.FeatureExtractorInceptionV3.load_state_dict = lambda self, *a, **k: None   # build without weights
  original_url_loader = fe.load_state_dict_from_url
  fe.load_state_dict_from_url = lambda *a, **k: {}
  try:
    net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
  finally:
    fe.FeatureExtractorInceptionV3.load_state_dict = load
    fe.load_state_dict_from_url = original_url_loader
  gen = torch.Generator().manual_seed(seed)
  out = {}
  for key, t in net.state_dict().items():
    if key.endswith("num_batches_tracked"):
      out[key] = t.clone()
    elif key.endswith("conv.weight"):
      out[key] = torch.randn(t.shape, generator=gen) * (2.0 / t[0].numel()) ** 0.5
    elif key.endswith(("bn.weight", "running_var")):
      out[key] = 0.5 + torch.rand(t.shape, generator=gen)
    elif key == "fc.weight":
      out[key] = torch.randn(t.shape, generator=gen) / t.shape[1] ** 0.5
    else:   # bn.bias, running_mean, fc.bias
      out[key] = 0.2 * torch.randn(t.shape, generator=gen)
  return out


def reference_net(weights: Path):
  """torch-fidelity's extractor loading `weights` through its own (strict) loader, returning
  (pool '2048', 'logits_unbiased'); its Mixed_6d.branch1x1 output is kept in `net.spatial`."""
  fe = _module("feature_extractor_inceptionv3")
  net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                       feature_extractor_weights_path=str(weights))
  net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: setattr(net, "spatial", o))
  return net
