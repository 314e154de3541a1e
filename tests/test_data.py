"""Data tests: embedded MNIST, the shared batch iterator, latent shards, ADM crop, ImageNet prep.

Hosts are simulated by passing process_index / process_count explicitly. Latent preparation is
exercised through `encode_to_shards` with in-memory PNGs and a fake encoder (an 8x8 average pool as
the posterior mean), which is what `prepare_imagenet` / `prepare_image_folder` feed it; only the tfds
test needs TensorFlow. The real VAE and CLI run in tests/test_prepare.py.
"""
from __future__ import annotations

import io
import json
import tarfile

import grain
import numpy as np
import pytest
from PIL import Image

from dydit_jax.data import (BatchIterator, LatentShardSource, LatentShardWriter, center_crop_arr,
                            encode_to_shards, load_mnist, make_dataset, prepare_imagenet)
from dydit_jax.data import latents as latents_format
from dydit_jax.data.imagenet import LATENT_SCALE, preprocess_image


class IndexSource:
  """A tiny in-memory source whose example i is the constant image i: order is visible."""

  num_classes = 3
  shape = (1, 1, 1)
  read_threads = 0

  def __init__(self, n):
    self.n = n

  def __len__(self):
    return self.n

  def __getitem__(self, i):
    return {"x": np.full(self.shape, i, np.float32), "y": np.int32(i % 3)}


def take(iterator, steps):
  return [next(iterator) for _ in range(steps)]


def ids(batch):
  return batch["x"].reshape(len(batch["x"])).astype(int).tolist()


def image_bytes(*batches):
  """The multiset of images in some batches, as sorted raw bytes."""
  return sorted(image.tobytes() for batch in batches for image in batch)


def assert_same_batches(got, want):
  assert len(got) == len(want)
  for g, w in zip(got, want):
    np.testing.assert_array_equal(g["x"], w["x"])
    np.testing.assert_array_equal(g["y"], w["y"])


def mnist(batch, index=0, count=1, seed=0):
  return make_dataset({"name": "mnist", "global_batch_size": batch, "seed": seed},
                      process_index=index, process_count=count)


# ----------------------------------------------------------------------------- MNIST

def test_embedded_mnist_is_5000_padded_digits_in_range():
  x, y = load_mnist()
  assert x.shape == (5000, 32, 32, 1) and x.dtype == np.float32
  assert y.shape == (5000,) and y.dtype == np.int32
  assert x.min() == -1.0 and x.max() == 1.0
  border = np.concatenate([x[:, :2].ravel(), x[:, -2:].ravel(), x[:, :, :2].ravel(),
                           x[:, :, -2:].ravel()])
  assert np.all(border == -1.0)                        # the 2-pixel zero padding
  np.testing.assert_array_equal(np.bincount(y), [500] * 10)
  batch = next(mnist(64))
  assert batch["x"].shape == (64, 32, 32, 1) and batch["x"].dtype == np.float32
  assert batch["y"].dtype == np.int32


# ----------------------------------------------------------------------------- iterator

def test_every_epoch_is_a_fresh_permutation_and_seed_determines_the_stream():
  def stream(seed):
    return [i for b in take(BatchIterator(IndexSource(12), 4, seed=seed, process_index=0,
                                          process_count=1), 9) for i in ids(b)]
  order = stream(seed=5)
  epochs = [order[k * 12:(k + 1) * 12] for k in range(3)]
  for epoch in epochs:
    assert sorted(epoch) == list(range(12))
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2] and epochs[0] != list(range(12))
  assert stream(seed=5) == order
  assert stream(seed=6) != order


@pytest.mark.parametrize("count", [2, 4])
def test_hosts_hold_disjoint_parts_that_cover_each_global_batch(count):
  reference = take(BatchIterator(IndexSource(40), 8, seed=1, process_index=0,
                                 process_count=1), 7)
  hosts = [take(BatchIterator(IndexSource(40), 8, seed=1, process_index=p,
                              process_count=count), 7) for p in range(count)]
  for step, global_batch in enumerate(reference):
    parts = [ids(host[step]) for host in hosts]
    assert all(len(part) == 8 // count for part in parts)
    flat = [i for part in parts for i in part]
    assert len(set(flat)) == len(flat)                 # disjoint
    assert sorted(flat) == sorted(ids(global_batch))   # covering

  # The same on real MNIST images (compared as multisets of image bytes).
  full = take(mnist(64), 3)
  per_host = [take(mnist(64, p, count), 3) for p in range(count)]
  for step in range(3):
    assert image_bytes(*[h[step]["x"] for h in per_host]) == image_bytes(full[step]["x"])
    assert per_host[0][step]["x"].shape == (64 // count, 32, 32, 1)


def test_restored_state_continues_with_identical_batches():
  data = mnist(768, seed=3)
  take(data, 7)                                        # 5376 examples: into epoch 1
  state = json.loads(json.dumps(data.get_state()))
  assert state == {"seed": 3, "epoch": 1, "index": 376}
  want = take(data, 4)
  resumed = mnist(768, seed=3)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 4), want)
  with pytest.raises(ValueError, match="seed"):
    mnist(768, seed=4).set_state(state)


def test_state_restores_onto_another_host_count():
  single = BatchIterator(IndexSource(30), 6, seed=2, process_index=0, process_count=1)
  take(single, 4)
  state = single.get_state()
  want = [ids(b) for b in take(single, 3)]
  hosts = [BatchIterator(IndexSource(30), 6, seed=2, process_index=p, process_count=3)
           for p in range(3)]
  for host in hosts:
    host.set_state(state)
  got = [take(host, 3) for host in hosts]
  for step in range(3):
    assert sorted(i for host in got for i in ids(host[step])) == sorted(want[step])
  assert hosts[0].get_state() == single.get_state()


def test_synthetic_data_is_seeded_and_shaped():
  config = {"name": "synthetic", "global_batch_size": 6, "shape": (4, 4, 3),
            "num_classes": 7, "num_examples": 20, "seed": 9}
  first, second = take(make_dataset(config, process_index=0, process_count=1), 2)
  assert first["x"].shape == (6, 4, 4, 3) and first["y"].dtype == np.int32
  assert first["y"].min() >= 0 and first["y"].max() < 7
  data = make_dataset(config, process_index=0, process_count=1)
  assert data.num_classes == 7 and data.shape == (4, 4, 3)
  np.testing.assert_array_equal(next(data)["x"], first["x"])
  other = next(make_dataset({**config, "seed": 10}, process_index=0, process_count=1))
  assert not np.array_equal(other["x"], first["x"])
  state = data.get_state()
  resumed = make_dataset(config, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 1), [second])
  with pytest.raises(ValueError, match="Unknown dataset"):
    make_dataset({**config, "name": "cifar"})


# ----------------------------------------------------------------------------- latent shards

@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_latent_shards_roundtrip_through_grain(tmp_path, dtype):
  rng = np.random.default_rng(0)
  latents = rng.standard_normal((11, 4, 4, 2)).astype(np.float32)
  labels = np.arange(11)                               # unique: label identifies the latent
  with LatentShardWriter(str(tmp_path), 3, num_classes=11, image_size=32,
                         dtype=dtype) as writer:
    writer.write(latents[:5], labels[:5])
    writer.write(latents[5:], labels[5:])
  meta = json.loads((tmp_path / "metadata.json").read_text())
  assert meta["count"] == 11 and meta["shape"] == [4, 4, 2] and meta["dtype"] == dtype
  assert meta["scale"] == 0.18215 and meta["image_size"] == 32 and len(meta["shards"]) == 3

  source = LatentShardSource(str(tmp_path))
  assert len(source) == 11
  stored = latents.astype(dtype).astype(np.float32)
  for i in range(11):
    example = source[i]
    np.testing.assert_array_equal(example["x"], stored[example["y"]])

  config = {"name": "latents", "path": str(tmp_path), "global_batch_size": 4, "seed": 1}
  data = make_dataset(config, process_index=0, process_count=1)
  assert data.shape == (4, 4, 2) and data.num_classes == 11
  batches = take(data, 6)                              # 24 examples: 2+ epochs
  seen = np.concatenate([b["y"] for b in batches])
  assert sorted(seen[:11]) == list(range(11))
  for b in batches:
    assert b["x"].dtype == np.float32 and b["y"].dtype == np.int32
    np.testing.assert_array_equal(b["x"], stored[b["y"]])
  assert_same_batches(take(make_dataset(config, process_index=0, process_count=1), 6), batches)
  state = data.get_state()
  want = take(data, 3)
  resumed = make_dataset(config, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 3), want)


def test_format_v1_folders_still_read_as_frozen_samples(tmp_path):
  latents = np.random.default_rng(1).standard_normal((4, 2, 2, 4)).astype(np.float32)
  with LatentShardWriter(str(tmp_path), 2, num_classes=4, image_size=16) as writer:
    writer.write(latents, np.arange(4))
  meta = json.loads((tmp_path / "metadata.json").read_text())
  assert meta["format"] == "dydit_jax.latents.v2" and meta["content"] == "sample"
  del meta["content"]
  (tmp_path / "metadata.json").write_text(json.dumps({**meta, "format": "dydit_jax.latents.v1"}))
  source = LatentShardSource(str(tmp_path))
  assert not source.posterior
  for i in range(4):
    example = source[i]
    np.testing.assert_array_equal(example["x"], latents[example["y"]])
    assert source.draw(example, seed=0, epoch=3, index=i) is example


def test_missing_or_empty_latent_folder_names_the_folder(tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  for folder in (empty, tmp_path / "absent"):
    with pytest.raises(FileNotFoundError, match=str(folder)):
      make_dataset({"name": "latents", "path": str(folder), "global_batch_size": 2})


# ----------------------------------------------------------------------------- ADM crop

def blocky(grid, block):
  """An RGB image whose every block x block square is one colour from `grid` (h, w, 3)."""
  return np.repeat(np.repeat(grid, block, axis=0), block, axis=1)


def test_center_crop_halves_with_box_then_crops_the_centre():
  rng = np.random.default_rng(0)
  grid = rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)     # H=16, W=24 colours
  image = Image.fromarray(blocky(grid, 4))                      # 64 x 96 pixels
  # 64 >= 32 -> 32x48; 32 >= 32 -> 16x24 (BOX of uniform 4x4 blocks is exact);
  # short side 16 == size, so no resize; centre crop of width 24 starts at 4.
  out = center_crop_arr(image, 16)
  np.testing.assert_array_equal(out, grid[:, 4:20])


def test_center_crop_without_resize_is_a_plain_centre_cut():
  pixels = np.random.default_rng(1).integers(0, 256, (21, 16, 3), dtype=np.uint8)
  np.testing.assert_array_equal(center_crop_arr(Image.fromarray(pixels), 16), pixels[2:18])


@pytest.mark.parametrize("width,height", [(300, 200), (127, 333), (64, 64)])
def test_center_crop_output_is_square_uint8(width, height):
  image = Image.new("RGB", (width, height), (10, 200, 30))
  out = center_crop_arr(image, 64)
  assert out.shape == (64, 64, 3) and out.dtype == np.uint8
  assert np.all(out == [10, 200, 30])                  # resampling keeps a flat colour


# ----------------------------------------------------------------------------- ImageNet prep

def test_prepare_imagenet_without_encoder_says_the_vae_is_missing(tmp_path):
  with pytest.raises(ValueError, match="VAE.*encoder="):
    prepare_imagenet(str(tmp_path / "manual"), str(tmp_path / "out"), 256)


class PngImages:
  """An in-memory ImageSource: five random PNGs of several sizes, image i labelled i."""

  def __init__(self):
    rng = np.random.default_rng(2)
    self.files = []
    for w, h in [(40, 24), (24, 24), (33, 50), (70, 30), (24, 31)]:
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, format="PNG")
      self.files.append(buffer.getvalue())

  def __len__(self):
    return len(self.files)

  def read(self, start, stop):
    for i in range(start, stop):
      yield f"image{i}.png", self.files[i], i


def pool_encoder(calls=None):
  """(B,16,16,3) -> mean: (B,2,2,3) 8x8 average pool; std: 0.1 + |mean| (a fake posterior)."""
  def encoder(batch):
    if calls is not None:
      calls.append(batch.shape)
    mean = batch.reshape(len(batch), 2, 8, 2, 8, 3).mean(axis=(2, 4))
    return mean, 0.1 + np.abs(mean)
  return encoder


@pytest.mark.parametrize("content", ["posterior", "sample"])
def test_encode_to_shards_stores_the_posterior_of_cropped_flipped_images(tmp_path, content):
  source, calls = PngImages(), []
  encoder = pool_encoder(calls)
  meta = encode_to_shards(source, str(tmp_path), encoder, image_size=16, num_shards=2, num_classes=5,
                          content=content, flip=True, seed=0, batch_size=2, num_workers=2)
  # One probe call, then shard 0 = images 0-1 (one batch), shard 1 = images 2-4 (two, the last padded).
  assert calls == [(2, 16, 16, 3)] * 4
  assert meta["count"] == 5 and meta["shape"] == [2, 2, 3] and meta["flip"] is True
  assert meta["content"] == content and meta["shard_counts"] == [2, 3]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["latents-00000-of-00002.array_record",
                                                         "latents-00001-of-00002.array_record", "metadata.json"]
  flips = np.random.default_rng([latents_format.STREAM_FLIP, 0]).random(5) < 0.5
  assert 0 < flips.sum() < 5                           # seed 0 flips some, not all
  source_out = LatentShardSource(str(tmp_path))
  for i in range(5):
    example = source_out[i]                            # contiguous shards: record i is image i
    assert int(example["y"]) == i
    mean, std = (a[0] * LATENT_SCALE for a in encoder(preprocess_image(source.files[i], 16, flips[i])[None]))
    if content == "posterior":
      np.testing.assert_allclose(example["x"], mean, rtol=1e-6)
      np.testing.assert_allclose(example["std"], std, rtol=1e-6)
    else:
      noise = latents_format.posterior_noise((2, 2, 3), latents_format.STREAM_FROZEN, 0, i)
      np.testing.assert_allclose(example["x"], mean + std * noise, rtol=1e-5, atol=1e-7)
      assert "std" not in example


def test_posterior_latents_are_sampled_per_visit_and_resume_exactly(tmp_path):
  encode_to_shards(PngImages(), str(tmp_path), pool_encoder(), image_size=16, num_shards=2, num_classes=5,
                   batch_size=2, num_workers=1)
  source = LatentShardSource(str(tmp_path))
  config = {"name": "latents", "path": str(tmp_path), "global_batch_size": 2, "seed": 7, "num_threads": 0}
  data = make_dataset(config, process_index=0, process_count=1)
  batches = take(data, 10)                             # 20 examples: 4 epochs
  order = grain.MapDataset.range(5).shuffle(seed=7).repeat(None)
  seen = {}
  for g, (x, y) in enumerate((x, y) for b in batches for x, y in zip(b["x"], b["y"])):
    index, epoch = int(order[g]), g // 5
    assert int(y) == index                             # label i is record i
    mean, std = source[index]["x"], source[index]["std"]
    noise = latents_format.posterior_noise(mean.shape, latents_format.STREAM_READ, 7, epoch, index)
    np.testing.assert_allclose(x, mean + std * noise, rtol=1e-6, atol=1e-7)
    seen.setdefault(index, []).append(x)
  for draws in seen.values():                          # a new sample at every visit
    assert len(draws) == 4 and not np.allclose(draws[0], draws[1])
  state = data.get_state()
  want = take(data, 3)
  resumed = make_dataset(config, process_index=0, process_count=1)
  resumed.set_state(state)
  assert_same_batches(take(resumed, 3), want)


def test_encode_to_shards_resumes_and_refuses_other_settings(tmp_path):
  out = str(tmp_path / "latents")
  kwargs = dict(image_size=16, num_shards=3, num_classes=5, batch_size=2, num_workers=1)
  assert encode_to_shards(PngImages(), out, pool_encoder(), max_shards=2, **kwargs) is None
  names = sorted(p.name for p in (tmp_path / "latents").iterdir())
  assert names == ["latents-00000-of-00003.array_record", "latents-00001-of-00003.array_record",
                   "prepare_plan.json"]
  with pytest.raises(ValueError, match="other settings .*different: seed"):
    encode_to_shards(PngImages(), out, pool_encoder(), seed=1, **kwargs)
  calls = []
  meta = encode_to_shards(PngImages(), out, pool_encoder(calls), **kwargs)
  assert len(calls) == 2 and meta["count"] == 5         # the probe and the one missing shard
  whole = str(tmp_path / "whole")
  assert encode_to_shards(PngImages(), whole, pool_encoder(), **kwargs) == meta
  for name in meta["shards"] + ["metadata.json"]:
    assert (tmp_path / "latents" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
  with pytest.raises(ValueError, match="already holds prepared latents"):
    encode_to_shards(PngImages(), out, pool_encoder(), **kwargs)


def test_hosts_encode_every_other_shard_and_host_0_finishes(tmp_path):
  """Two simulated hosts (one process: the end barrier is trivial) write what one host writes."""
  kwargs = dict(image_size=16, num_shards=4, num_classes=5, batch_size=2, num_workers=1)
  one = encode_to_shards(PngImages(), str(tmp_path / "one"), pool_encoder(), **kwargs)
  two = str(tmp_path / "two")
  assert encode_to_shards(PngImages(), two, pool_encoder(), process_index=1, process_count=2, **kwargs) is None
  assert sorted(p.name for p in (tmp_path / "two").glob("latents-*")) == [one["shards"][1], one["shards"][3]]
  assert encode_to_shards(PngImages(), two, pool_encoder(), process_index=0, process_count=2, **kwargs) == one
  for name in one["shards"]:
    assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()


def test_a_corrupt_image_leaves_no_partial_shard(tmp_path):
  source = PngImages()
  source.files[3] = source.files[3][:200]              # truncated PNG, in shard 1
  out = tmp_path / "latents"
  with pytest.raises(ValueError, match="cannot read image image3.png"):
    encode_to_shards(source, str(out), pool_encoder(), image_size=16, num_shards=2, num_classes=5,
                     batch_size=2, num_workers=1)
  assert sorted(p.name for p in out.iterdir()) == ["latents-00000-of-00002.array_record", "prepare_plan.json"]
  source.files[0] = source.files[0][:200]              # in the first shard: nothing is left at all
  with pytest.raises(ValueError, match="cannot read image image0.png"):
    encode_to_shards(source, str(tmp_path / "other"), pool_encoder(), image_size=16, num_shards=2,
                     num_classes=5, batch_size=2, num_workers=1)
  assert not (tmp_path / "other").exists()


def add_to_tar(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def test_prepare_imagenet_reads_tfds_manual_dir_end_to_end(tmp_path):
  """A two-class fake ILSVRC2012 manual download through tfds; pixels must equal PIL's."""
  pytest.importorskip("tensorflow_datasets")
  rng = np.random.default_rng(3)
  manual = tmp_path / "manual"
  manual.mkdir()
  jpegs = {}
  with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as train:
    for label, synset in enumerate(["n01440764", "n01443537"]):  # sorted wnids -> 0, 1
      buffer = io.BytesIO()
      Image.fromarray(rng.integers(0, 256, (300, 520, 3), dtype=np.uint8)).save(buffer, "JPEG")
      jpegs[label] = buffer.getvalue()
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as synset_tar:
        add_to_tar(synset_tar, f"{synset}_1.JPEG", jpegs[label])
      add_to_tar(train, f"{synset}.tar", inner.getvalue())
  with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as val:  # tfds reads it eagerly
    add_to_tar(val, "ILSVRC2012_val_00000001.JPEG", jpegs[0])

  def encoder(batch):                                  # (B,256,256,3) -> (B,32,32,3), twice
    mean = batch.reshape(len(batch), 32, 8, 32, 8, 3).mean(axis=(2, 4))
    return mean, mean

  meta = prepare_imagenet(str(manual), str(tmp_path / "latents"), 256, encoder=encoder,
                          num_shards=2, flip=False, data_dir=str(tmp_path / "tfds"),
                          batch_size=2, num_workers=1)
  assert meta["count"] == 2 and meta["split"] == "train" and meta["num_classes"] == 1000
  source = LatentShardSource(str(tmp_path / "latents"))
  for i in range(2):
    example = source[i]
    want = encoder(preprocess_image(jpegs[int(example["y"])], 256, False)[None])[0][0]
    np.testing.assert_array_equal(example["x"], want * LATENT_SCALE)


def test_host_blocks_are_contiguous_rows_of_the_global_batch():
  # The trainer uploads host p's batch as rows pL .. (p+1)L - 1 of the global batch (sharding.host_rows).
  reference = take(BatchIterator(IndexSource(40), 8, seed=1, process_index=0, process_count=1), 7)
  hosts = [take(BatchIterator(IndexSource(40), 8, seed=1, process_index=p, process_count=4), 7)
           for p in range(4)]
  for step, global_batch in enumerate(reference):
    assert [i for host in hosts for i in ids(host[step])] == ids(global_batch)
