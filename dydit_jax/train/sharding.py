"""Where arrays live: the (data, fsdp) mesh, the FSDP rule, batch placement, joining the hosts.

One rule, applied leaf by leaf to any pytree (params, EMA, Adam moments alike): an array of at least
`min_size_bytes` is split over the `fsdp` axis along its largest dimension that the axis size
divides; everything else is replicated. Because the rule looks only at shapes, the optimizer state
inherits the sharding of the params it mirrors, and a checkpoint restores onto any mesh by
evaluating the rule for the new mesh (see checkpointing.py). The batch is split over both axes, so
the (data, fsdp) devices together are the data-parallel width; XLA inserts the FSDP all-gathers.
"""
from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from dydit_jax.errors import UserError

DATA_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices=None) -> Mesh:
  """A ("data", "fsdp") mesh over `devices` (default all); data=-1 takes what fsdp leaves."""
  devices = jax.devices() if devices is None else list(devices)
  n = len(devices)
  if fsdp <= 0 or n % fsdp:
    raise UserError(f"mesh.fsdp={fsdp} must be positive and divide the {n} devices")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise UserError(f"mesh data={data} x fsdp={fsdp} does not cover the {n} devices")
  # Auto axes: XLA's sharding propagation places the activations (the model code has no sharding
  # annotations), as opposed to JAX's explicit-sharding mode.
  return jax.make_mesh((data, fsdp), DATA_AXES, devices=devices, axis_types=(AxisType.Auto,) * 2)


def fsdp_spec(shape: tuple[int, ...], itemsize: int, fsdp_size: int, min_size_bytes: float) -> P:
  """The PartitionSpec of one array under the FSDP rule (see module docstring)."""
  if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) * itemsize < min_size_bytes:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def tree_shardings(tree, mesh: Mesh, min_size_bytes: float):
  """NamedShardings for every array (or ShapeDtypeStruct) leaf of `tree` under the FSDP rule."""
  fsdp_size = mesh.shape["fsdp"]

  def rule(leaf):
    shape, dtype = np.shape(leaf), leaf.dtype
    itemsize = np.dtype(dtype).itemsize if not jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) else 8
    return NamedSharding(mesh, fsdp_spec(shape, itemsize, fsdp_size, min_size_bytes))

  return jax.tree.map(rule, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(DATA_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def host_rows(mesh: Mesh, global_batch_size: int) -> tuple[int, int]:
  """(block, blocks): this host's devices hold rows block*L .. (block+1)*L - 1 of every global batch.

  The data pipeline then reads that block only (`BatchIterator(process_index=block,
  process_count=blocks)`). A mesh whose processes do not own contiguous, equal, aligned blocks of the
  batch axis gives (0, 1): every host reads the whole global batch (correct, P times the reads).
  """
  held = sorted((s[0].start or 0, global_batch_size if s[0].stop is None else s[0].stop)
                for s in batch_sharding(mesh).addressable_devices_indices_map((global_batch_size,)).values())
  first, last = held[0][0], held[-1][1]
  contiguous = all(a == b for (_, a), (b, _) in zip(held, held[1:]))
  rows, blocks = last - first, jax.process_count()
  if contiguous and rows * blocks == global_batch_size and first % rows == 0:
    return first // rows, blocks
  return 0, 1


def global_batch(batch: dict[str, np.ndarray], mesh: Mesh, block: tuple[int, int] = (0, 1)
                 ) -> dict[str, jax.Array]:
  """This host's block of a global batch -> global arrays split by `batch_sharding`.

  block: (index, count) from `host_rows`; the batch holds rows index*L .. (index+1)*L - 1 of a global
  batch of count*L rows. The global batch (row i: its timestep stratum, noise and gates) does not
  depend on the host count, so multi-host runs reproduce single-host ones and resume across layouts.
  """
  index, count = block
  sharding = batch_sharding(mesh)

  def to_global(v):
    local = v.shape[0]
    offset, shape = index * local, (count * local,) + v.shape[1:]

    def rows_of(where):
      start, stop = (where[0].start or 0) - offset, (shape[0] if where[0].stop is None else where[0].stop) - offset
      if start < 0 or stop > local:
        raise ValueError(f"a local device holds global rows {where[0]}, outside this host's block {block}")
      return v[(slice(start, stop),) + tuple(where[1:])]

    return jax.make_array_from_callback(shape, sharding, rows_of)

  return {k: to_global(v) for k, v in batch.items()}


def initialize_distributed(coordinator: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Joins the hosts of a multi-host run through `jax.distributed.initialize()`.

  Arguments win over the environment variables DYDIT_COORDINATOR (host:port of process 0),
  DYDIT_NUM_PROCESSES and DYDIT_PROCESS_ID. Without any of them JAX's own cluster detection runs
  (Cloud TPU slices, SLURM, ...); where it finds nothing, one process runs on its own.
  """
  coordinator = coordinator or os.environ.get("DYDIT_COORDINATOR", "")
  num_processes = num_processes or int(os.environ.get("DYDIT_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(os.environ.get("DYDIT_PROCESS_ID", "-1"))
  if coordinator or num_processes:
    if not (coordinator and num_processes > 0 and 0 <= process_id < num_processes):
      raise UserError("a multi-host run needs all of coordinator (host:port), num_processes and "
                       f"process_id; got {coordinator!r}, {num_processes}, {process_id}")
    # Cross-process collectives between CPU devices (tests, CPU clusters) need gloo; GPUs and TPUs
    # do not use this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
  else:
    try:
      # Auto-detection: a Cloud TPU slice (required there), SLURM, Open MPI, Kubernetes.
      jax.distributed.initialize()
    except ValueError as e:  # No cluster detected: a single process.
      logging.info("single process (jax.distributed: %s)", e)
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def describe(tree) -> str:
  """One line on where a tree of arrays lives: how many arrays are split, bytes per device vs total."""
  leaves = jax.tree.leaves(tree)
  total = sum(a.nbytes for a in leaves)
  per_device = sum(a.addressable_shards[0].data.nbytes for a in leaves)
  split = sum(a.addressable_shards[0].data.shape != a.shape for a in leaves)
  return (f"{split} of {len(leaves)} arrays sharded; {per_device / 2**20:.2f} MiB per device of "
          f"{total / 2**20:.2f} MiB")
