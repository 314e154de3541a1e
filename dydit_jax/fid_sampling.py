"""N samples for FID as one ADM-format .npz, sampled in chunks that survive interruption.

  plan = run_plan(num_samples=50000, chunk=256, seed=0, sampler=sampler, model_id=..., vae_id=...)
  check_run("samples.npz", plan)          # before sampling: refuses what cannot (re)start, creates nothing
  summary = sample_run(sampler, "samples.npz", plan, decoder=BatchedVAE(vae, 16))

What lands on disk, and why:

* `samples.chunks/` next to the output holds `plan.json` (every setting that changes a single bit of
  the images) and `chunk-NNNNN.npz` files, chunk c holding samples [c K, (c+1) K) of N (the last one
  shorter). A chunk is written under a temporary name and renamed when complete, so a chunk under its
  final name is the completion record: a run killed anywhere (mid-chunk included) leaves only whole
  chunks, and rerunning the same command samples the missing ones. A rerun with other settings would
  mix two sample sets in one file, so it is refused naming the fields that differ (`check_run`),
  before anything is written. The chunk size is one of them: it names the files, though the images
  do not depend on it.
* Host h of P samples chunks h, h + P, ... into a folder every host sees (a local or mounted file
  system, for its atomic renames), each on its own local devices
  (`Sampler` splits a chunk over them when they divide it); after a barrier host 0 streams the chunks
  into `samples.npz` (`arr_0`: (N, H, W, C) uint8 NHWC, the layout of ADM's reference batches and of
  DiT's sample_ddp.py; `arr_1`: the labels, as ADM's image_sample.py stores them), writes the JSON
  summary next to it (N, seed, options, engine, MACs ratios, images/s, times) and removes the chunks.
  Both files are renamed into place; an existing output is refused rather than overwritten.

Labels and noise are functions of (seed, sample index) alone: label i is uniform over the classes,
drawn from fold_in(label key, i); image i's noise is drawn by the Sampler from (noise key, i)
(`Sampler.generate(first_id=...)`). So the images do not depend on the chunk size, the number of hosts
or devices (up to float rounding of differently shaped programs), or on where a run was interrupted.
DiT's sample_ddp.py also draws labels uniformly (torch.randint per batch) but from a per-rank
generator seeded with seed * world_size + rank and consumed batch after batch, so its samples change
with the number of GPUs and the batch size, and it rounds N up to a multiple of the global batch and
keeps the first N files; here nothing depends on the split, and exactly N samples are kept.

Every chunk is sampled as a full batch of K images (the last one padded with the next ids, whose
images are dropped), so the chain compiles once for the whole run; the MACs ratios count every image
computed.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
import zipfile
from typing import Any

import jax
import numpy as np
from absl import logging

from dydit_jax import files, images
from dydit_jax.errors import UserError
from dydit_jax.sampler import Sampler
from dydit_jax.vae.batched import BatchedVAE, decode_to_images

PLAN_FILE = "plan.json"
FORMAT = "dydit_jax.fid_sampling/1"
LABELS = "uniform: label i = randint(fold_in(split(PRNGKey(seed))[0], i), 0, num_classes)"
# Plan fields that say where things came from, not what the samples are: the fingerprints decide, so
# a moved model or VAE directory may resume its run.
INFORMATIONAL = ("sources",)


def run_keys(seed: int) -> tuple[jax.Array, jax.Array]:
  """(label key, noise key) of a run."""
  label_key, noise_key = jax.random.split(jax.random.PRNGKey(seed))
  return label_key, noise_key


def sample_labels(seed: int, ids: np.ndarray, num_classes: int) -> np.ndarray:
  """The class label of each sample id: uniform, a function of (seed, id) only (module docstring)."""
  label_key, _ = run_keys(seed)
  draw = jax.vmap(lambda i: jax.random.randint(jax.random.fold_in(label_key, i), (), 0, num_classes))
  return np.asarray(draw(np.asarray(ids, np.int32)), np.int32)


def chunks_dir(out: str | os.PathLike) -> str:
  return os.path.splitext(os.fspath(out))[0] + ".chunks"


def summary_path(out: str | os.PathLike) -> str:
  return os.path.splitext(os.fspath(out))[0] + ".json"


def run_plan(*, num_samples: int, chunk: int, seed: int, sampler: Sampler, model_id: str, vae_id: str | None,
             decode_batch: int | None, sources: dict[str, Any] | None = None) -> dict[str, Any]:
  """Everything the samples depend on. model_id / vae_id: weight fingerprints (`vae.checkpoints.
  fingerprint`), so that the same weights resume wherever they are loaded from; sources: where they
  were loaded from (informational). The sizes are checked by `check_run`."""
  return {"format": FORMAT, "num_samples": int(num_samples), "chunk": int(min(chunk, num_samples)),
          "seed": int(seed), "labels": LABELS, "options": dataclasses.asdict(sampler.options),
          "model_config": sampler.config.to_dict(), "model_fingerprint": model_id, "vae_fingerprint": vae_id,
          "decode_batch": decode_batch, "sources": sources or {}}


def check_output(out: str | os.PathLike, num_samples: int, chunk: int) -> None:
  """The refusals that need no model: sizes, a non-.npz name, a finished output (never overwritten)."""
  out = os.fspath(out)
  if num_samples <= 0:
    raise UserError(f"--num_samples must be positive, got {num_samples}")
  if chunk <= 0:
    raise UserError(f"--chunk must be positive, got {chunk}")
  if not out.endswith(".npz"):
    raise UserError(f"--out must name a .npz file for FID samples, got {out!r}")
  if "://" in out:   # the atomic renames this relies on are a file system's
    raise UserError(f"--out must be a local or mounted path, got {out!r}; copy the .npz to the bucket afterwards")
  if os.path.exists(out):
    raise UserError(f"{out} exists already; delete it (and {os.path.basename(summary_path(out))}) to sample again, "
                    "or choose another --out")


def check_run(out: str | os.PathLike, plan: dict[str, Any]) -> bool:
  """Raises a UserError when `out` cannot be (re)started with `plan`; creates nothing. True when an
  unfinished run with the same plan is there to resume."""
  out = os.fspath(out)
  check_output(out, plan["num_samples"], plan["chunk"])
  path = os.path.join(chunks_dir(out), PLAN_FILE)
  if not os.path.exists(path):
    if os.path.isdir(chunks_dir(out)) and any(n.startswith("chunk-") for n in os.listdir(chunks_dir(out))):
      raise UserError(f"{chunks_dir(out)} holds chunks but no {PLAN_FILE}; delete it or choose another --out")
    return False
  with open(path) as f:
    old = json.load(f)
  new = json.loads(json.dumps(plan))
  differ = _differences(old, new)
  if differ:
    raise UserError(f"{chunks_dir(out)} holds an unfinished run with other settings (different: {', '.join(differ)}; "
                    f"see {PLAN_FILE}); rerun it with its settings, or delete the folder or choose another --out "
                    "to start afresh")
  return True


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
  """Dotted names of the differing fields (options.cfg_scale, not just options)."""
  out = []
  for k in sorted(set(old) | set(new)):
    if not prefix and k in INFORMATIONAL:
      continue
    a, b = old.get(k), new.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f"{prefix}{k}.")
    elif a != b:
      out.append(f"{prefix}{k}")
  return out


def chunk_bounds(plan: dict[str, Any]) -> list[tuple[int, int]]:
  n, k = plan["num_samples"], plan["chunk"]
  return [(start, min(start + k, n)) for start in range(0, n, k)]


def chunk_path(out: str | os.PathLike, c: int) -> str:
  return os.path.join(chunks_dir(out), f"chunk-{c:05d}.npz")


def to_images(samples: np.ndarray, decoder: BatchedVAE | None) -> np.ndarray:
  """Model-space samples -> uint8 NHWC images: pixel models directly, latent models through the VAE
  (DiT's pixel mapping, `vae.batched.dit_uint8`)."""
  return images.to_uint8(samples) if decoder is None else decode_to_images(decoder, samples)


def sample_run(sampler: Sampler, out: str | os.PathLike, plan: dict[str, Any], *, decoder: BatchedVAE | None = None,
               process_index: int | None = None, process_count: int | None = None) -> dict[str, Any]:
  """Samples every missing chunk of this host, then (host 0) assembles `out` and its JSON summary;
  returns the summary on host 0, None on the others. See the module docstring."""
  out = os.fspath(out)
  host = jax.process_index() if process_index is None else process_index
  hosts = jax.process_count() if process_count is None else process_count
  wall = time.perf_counter()
  if plan["model_config"] != sampler.config.to_dict() or plan["options"] != dataclasses.asdict(sampler.options):
    raise ValueError("plan was made for another sampler (run_plan(sampler=...))")
  resumed = check_run(out, plan)
  _write_plan(out, plan, host)
  bounds = chunk_bounds(plan)
  mine = [c for c in range(host, len(bounds), hosts) if not os.path.exists(chunk_path(out, c))]
  logging.info("host %d of %d: %d of %d chunks to sample into %s%s", host, hosts, len(mine), len(bounds),
               chunks_dir(out), " (resuming)" if resumed else "")
  devices = jax.local_device_count()
  if devices > 1 and plan["chunk"] % devices:
    logging.warning("chunk %d is not a multiple of the %d local devices: each chunk runs on one device",
                    plan["chunk"], devices)
  compile_s = sampler.compile(plan["chunk"]) if mine else 0.0
  _, noise_key = run_keys(plan["seed"])
  start = time.perf_counter()
  for done, c in enumerate(mine, 1):
    _sample_chunk(sampler, decoder, plan, out, c, bounds[c], noise_key)
    rate = done / (time.perf_counter() - start)
    eta = int((len(mine) - done) / rate)
    logging.info("chunk %d of %d written (%d / %d of this host's in this run), %.2f images/s, ETA %d:%02d:%02d",
                 c + 1, len(bounds), done, len(mine), rate * plan["chunk"], eta // 3600, eta // 60 % 60, eta % 60)
  _barrier(hosts, "chunks written")
  summary = None
  if host == 0:
    summary = _assemble(out, plan, compile_s=compile_s, wall_s=time.perf_counter() - wall, hosts=hosts)
  _barrier(hosts, "samples assembled")
  return summary


def _write_plan(out: str, plan: dict[str, Any], host: int) -> None:
  os.makedirs(chunks_dir(out), exist_ok=True)
  path = os.path.join(chunks_dir(out), PLAN_FILE)
  if not os.path.exists(path):
    files.atomic_write_json(path, plan, tmp_suffix=f".tmp-{host}")


def _atomic_write(path: str, write, host: int = 0) -> None:
  files.atomic_write(path, write, tmp_suffix=f".tmp-{host}")


def _sample_chunk(sampler: Sampler, decoder, plan, out: str, c: int, bounds: tuple[int, int], noise_key) -> None:
  first, stop = bounds
  ids = np.arange(first, first + plan["chunk"])          # a full batch; ids past `stop` are dropped
  begin = time.perf_counter()
  labels = sample_labels(plan["seed"], ids, sampler.config.num_classes)
  result = sampler.generate(labels, noise_key, first_id=first)
  pixels = to_images(result.samples[:stop - first], decoder)
  seconds = time.perf_counter() - begin
  _atomic_write(chunk_path(out, c), lambda f: np.savez(
      f, images=pixels, labels=labels[:stop - first], first=first, computed=len(ids), seconds=seconds,
      flops_ratio=result.flops_ratio, macs_ratio=result.macs_ratio))


def _assemble(out: str, plan: dict[str, Any], *, compile_s: float, wall_s: float, hosts: int) -> dict[str, Any]:
  """Streams the chunks into `out` (one chunk in memory at a time: 50k ImageNet-256 samples are
  9.8 GB), writes the summary, removes the chunks."""
  bounds = chunk_bounds(plan)
  missing = [c for c in range(len(bounds)) if not os.path.exists(chunk_path(out, c))]
  if missing:
    raise UserError(f"{len(missing)} chunks of {chunks_dir(out)} are missing (e.g. chunk {missing[0]}: did a host "
                    "stop?); rerun the same command to sample them")
  stats = {"computed": 0, "seconds": 0.0, "flops": 0.0, "macs": 0.0}
  labels = []
  with np.load(chunk_path(out, 0)) as z:
    shape = z["images"].shape[1:]

  def read(c: int) -> np.ndarray:
    with np.load(chunk_path(out, c)) as z:
      pixels, lab = z["images"], z["labels"]
      if (int(z["first"]) != bounds[c][0] or len(pixels) != len(lab) or len(lab) != bounds[c][1] - bounds[c][0]
          or pixels.shape[1:] != shape or pixels.dtype != np.uint8):
        raise UserError(f"{chunk_path(out, c)} does not hold samples {bounds[c][0]}..{bounds[c][1] - 1} as uint8 "
                        f"images of shape {shape}; delete it and rerun the same command")
      n = int(z["computed"])
      stats["computed"] += n
      stats["seconds"] += float(z["seconds"])
      stats["flops"] += n * float(z["flops_ratio"])
      stats["macs"] += n * float(z["macs_ratio"])
    labels.append(lab)
    return pixels

  def write(f):
    with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
      with archive.open("arr_0.npy", "w", force_zip64=True) as member:
        np.lib.format.write_array_header_1_0(
            member, {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
                     "shape": (plan["num_samples"], *shape)})
        for c in range(len(bounds)):
          member.write(np.ascontiguousarray(read(c)).tobytes())
      with archive.open("arr_1.npy", "w") as member:
        np.lib.format.write_array(member, np.concatenate(labels).astype(np.int64))

  _atomic_write(out, write)
  summary = {
      "out": out, "num_samples": plan["num_samples"], "seed": plan["seed"], "chunk": plan["chunk"],
      "labels": plan["labels"], "options": plan["options"], "engine": plan["options"]["engine"],
      "dynamic": plan["model_config"]["dynamic"], "image_shape": list(shape),
      "numerics": {k: plan["model_config"][k] for k in ("dtype", "residual_dtype", "attention_impl")},
      # Block MACs (the official DyDiT ratio) and whole-forward MACs relative to the dense model, over
      # every image computed (CFG's unconditional half included, as it is computed).
      "flops_ratio": stats["flops"] / stats["computed"], "macs_ratio": stats["macs"] / stats["computed"],
      # One host's sampling + decoding rate, compile excluded; `hosts` of them ran in parallel.
      "images_per_s": plan["num_samples"] / stats["seconds"], "sampling_s": stats["seconds"],
      # This invocation's compile and wall seconds (a resumed run: since it resumed).
      "compile_s": compile_s, "wall_s": wall_s, "hosts": hosts, "local_devices": jax.local_device_count(),
      "model_fingerprint": plan["model_fingerprint"], "vae_fingerprint": plan["vae_fingerprint"],
      "sources": plan["sources"]}
  files.atomic_write_json(summary_path(out), summary, tmp_suffix=".tmp-0")
  shutil.rmtree(chunks_dir(out))
  logging.info("wrote %s: %d samples %s, block-MACs ratio %.4f, %.2f images/s", out, plan["num_samples"],
               tuple(shape), summary["flops_ratio"], summary["images_per_s"])
  return summary


def _barrier(hosts: int, name: str) -> None:
  if hosts > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(f"dydit_jax.fid_sampling: {name}")
