"""The FID Inception: parity with torch-fidelity 0.4.0 (the PyTorch port checked against the ADM graph),
the TF1-legacy resize, and both weight converters (.pth, .pb) with their refusals.

The reference network has every tensor random, BatchNorm moving statistics included; its state dict
goes through our converter's CLI, and torch-fidelity loads the same file through its own strict loader.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx, traverse_util

import fidelity_reference as fr
from convert_helpers import rel_l2
from dydit_jax.evaluation import convert
from dydit_jax.evaluation.inception import SPATIAL_DIM, resize_tf1
from dydit_jax.evaluation.weights import load_inception
from dydit_jax.torch_files import ConversionError
from evaluation_helpers import run_tool

# fp32 parity bound, relative L2 of whole-network outputs (observed 2.5e-7 .. 8.5e-7 on CPU).
PARITY_RTOL = 1e-4
RESIZE_ATOL = 1e-3   # on the 0..255 scale (observed 3e-5)


def _state(model) -> dict:
  return {p: np.asarray(v) for p, v in traverse_util.flatten_dict(nnx.state(model).to_pure_dict()).items()}


SIZES = (32, 256, 512)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(root, our network, torch-fidelity's network, the state dict): one random state dict, converted by
  our CLI and loaded by torch-fidelity's own loader."""
  root = tmp_path_factory.mktemp("inception")
  state_dict = fr.random_state_dict(seed=0)
  torch.save(state_dict, root / "random.pth")
  code, out, err = run_tool(convert, [], f"--src={root / 'random.pth'}", f"--dst={root / 'jax'}")
  assert code == 0, err
  assert "472 tensors" in out and "num_batches_tracked" in err
  return root, load_inception(root / "jax"), fr.reference_net(root / "random.pth"), state_dict


def _images(size: int) -> torch.Tensor:
  return torch.randint(0, 256, (1, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(size))


@pytest.fixture(scope="module")
def ours(converted):
  """Our features of one image per size, in one batch: each image resized by `resize_tf1` (jitted per
  size), the network compiled once at 299 (where the resize is the identity, see below)."""
  net = converted[1]
  resized = np.concatenate([np.asarray(jax.jit(resize_tf1)(jnp.asarray(_images(s).permute(0, 2, 3, 1).numpy(),
                                                                       jnp.float32))) for s in SIZES])
  graphdef, state = nnx.split(net)
  out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, resized)
  return {size: jax.tree.map(lambda a, i=i: np.asarray(a)[i:i + 1], out) for i, size in enumerate(SIZES)}


@pytest.mark.parametrize("size", SIZES)
def test_parity_with_torch_fidelity(converted, ours, size):
  ref = converted[2]
  with torch.no_grad():
    pool, logits = ref(_images(size))                                # torch-fidelity resizes itself
  spatial = ref.spatial[:, :7].permute(0, 2, 3, 1).reshape(1, -1)     # NHWC order, as the ADM graph
  out = ours[size]
  assert out.spatial.shape == (1, SPATIAL_DIM)
  errors = {name: rel_l2(getattr(out, name), want.numpy())
            for name, want in (("pool", pool), ("logits", logits), ("spatial", spatial))}
  assert max(errors.values()) < PARITY_RTOL, errors
  assert float(torch.linalg.norm(logits)) > 1.0, "a degenerate network would make the comparison empty"


@pytest.mark.parametrize("size", [32, 256, 512])
def test_resize_is_tf1_legacy(size):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  images = np.random.default_rng(size).integers(0, 256, (1, size, size, 3)).astype(np.float32)
  ours = np.asarray(jax.jit(resize_tf1)(jnp.asarray(images)))
  fidelity = fr.resize(torch.from_numpy(images).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
  tf1 = tf.compat.v1.image.resize_bilinear(images, (299, 299), align_corners=False, half_pixel_centers=False).numpy()
  assert np.abs(ours - fidelity).max() < RESIZE_ATOL
  assert np.abs(ours - tf1).max() < RESIZE_ATOL
  half_pixel = np.asarray(jax.image.resize(images, (1, 299, 299, 3), "bilinear"))
  assert np.abs(ours - half_pixel).mean() > 1.0, "the half-pixel resize must be told apart"


def test_resize_keeps_299_images():
  images = np.random.default_rng(0).integers(0, 256, (1, 299, 299, 3)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(resize_tf1(jnp.asarray(images))), images)


# The converters ----------------------------------------------------------------------------------
def _batch_norm(name: str, eps: float) -> tuple:
  """A BatchNormWithGlobalNormalization node (the 2015 graph's op) with `eps`, scaling by gamma."""
  return (name, "BatchNormWithGlobalNormalization", {"variance_epsilon": lambda a: setattr(a, "f", eps),
                                                     "scale_after_normalization": lambda a: setattr(a, "b", True)})


def _graphdef(consts: dict[str, np.ndarray], extra_nodes=()):
  """A TF1 GraphDef holding `consts` as Const nodes (plus `extra_nodes`: (name, op, attrs))."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  graph = tf.compat.v1.GraphDef()
  for name, value in consts.items():
    node = graph.node.add(name=name, op="Const")
    node.attr["dtype"].type = tf.as_dtype(value.dtype).as_datatype_enum
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))
  for name, op, attrs in extra_nodes:
    node = graph.node.add(name=name, op=op)
    for key, set_value in attrs.items():
      set_value(node.attr[key])
  return graph.SerializeToString()


def test_pb_conversion_matches_pth(converted, tmp_path):
  """A synthetic ADM GraphDef (the real Const names, HWIO kernels, 2048x1008 softmax/weights, plus a
  BatchNorm op node and unrelated constants) gives exactly the .pth conversion's variables (the
  directory writing after this point is the .pth path's, exercised through the CLI above)."""
  state = _state(converted[1])
  consts = {name: state[path] for name, path in convert.tf_table().items()}
  assert consts["mixed_6/conv/conv2d_params"].shape == (1, 1, 768, 192)
  assert consts["softmax/weights"].shape == (2048, 1008)
  consts.update({"Sub/y": np.float32(128.0), "mixed/join/concat_dim": np.int32(3)})
  (tmp_path / "graph.pb").write_bytes(_graphdef(consts, [_batch_norm("mixed_6/conv/batchnorm", 0.001)]))
  notes = []
  got = traverse_util.flatten_dict(convert.to_params(convert.read_graphdef(tmp_path / "graph.pb", notes),
                                                     {k: (p, None) for k, p in convert.tf_table().items()}))
  assert got.keys() == state.keys() and notes[0].startswith("note: read 472 parameter constants of 475")
  for path, value in state.items():
    np.testing.assert_array_equal(got[path], value, err_msg=str(path))


def test_pb_refusals(tmp_path):
  (tmp_path / "eps.pb").write_bytes(_graphdef({"conv/conv2d_params": np.zeros((3, 3, 3, 32), np.float32)},
                                              [_batch_norm("conv/batchnorm", 1e-5)]))
  with pytest.raises(ConversionError, match=r"conv/batchnorm \(variance_epsilon 1e-05"):
    convert.convert(tmp_path / "eps.pb", tmp_path / "out")
  (tmp_path / "part.pb").write_bytes(_graphdef({"conv/conv2d_params": np.zeros((3, 3, 3, 32), np.float32),
                                                "mixed_11/conv/conv2d_params": np.zeros((1, 1, 2, 2), np.float32)}))
  with pytest.raises(ConversionError, match=r"471 missing, 1 unexpected(.|\n)*mixed_11/conv/conv2d_params"):
    convert.convert(tmp_path / "part.pb", tmp_path / "out")
  (tmp_path / "junk.pb").write_bytes(b"not a graph at all")
  with pytest.raises(ConversionError, match="junk.pb"):
    convert.convert(tmp_path / "junk.pb", tmp_path / "out")
  assert not (tmp_path / "out").exists()


def test_pth_refusals(converted, tmp_path):
  state = {k: v.numpy() for k, v in converted[3].items() if not k.endswith("num_batches_tracked")}
  state["fc.extra"] = state.pop("Mixed_6d.branch1x1.bn.running_var")
  state["Conv2d_1a_3x3.conv.weight"] = state["Conv2d_1a_3x3.conv.weight"][:16]
  with pytest.raises(ConversionError) as e:
    convert.to_params(state, convert.torch_table())
  assert str(e.value).startswith("the state dict does not match the FID Inception-v3 (2015-12-05): 1 missing, "
                                 "1 unexpected, 1 mismatched"), e.value
  for name in ("Mixed_6d.branch1x1.bn.running_var", "fc.extra", "Conv2d_1a_3x3.conv.weight (16, 3, 3, 3)"):
    assert name in str(e.value)
  code, _, err = run_tool(convert, [], f"--src={tmp_path / 'absent.pth'}", f"--dst={tmp_path / 'out'}")
  assert code == 1 and "absent.pth (--src) does not exist" in err
  assert not (tmp_path / "out").exists()
