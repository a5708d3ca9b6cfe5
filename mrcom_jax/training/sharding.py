"""Data parallelism: one device mesh with a 'data' axis; batches sharded, state replicated.

The mesh may span several processes (hosts) started with `jax.distributed.initialize()`; see the
multi-host helpers at the end.

Built on `jax.make_mesh` + `NamedSharding` + `jax.jit` (never `pmap`). A jitted update given a
batch sharded along 'data' and a replicated state computes the same mean-over-batch loss and
gradients as on one device: XLA inserts the cross-device sums, so nothing here rescales them.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), axis 'data'.

  Devices are ordered by process, so each process holds one contiguous block of a batch's rows.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  n = len(devices) if num_devices is None else num_devices
  if not 0 < n <= len(devices):
    raise ValueError(f"asked for {n} devices, {len(devices)} available")
  if jax.process_count() > 1 and n != len(devices):
    raise ValueError(
      f"asked for {n} of the {len(devices)} devices of {jax.process_count()} processes: a "
      "multi-process run uses every device (set config.train.num_devices=0)"
    )
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices[:n])


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Splits an array's leading (batch) axis across the 'data' axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """The whole array on every device."""
  return NamedSharding(mesh, P())


def shard_batch(batch, mesh: Mesh):
  """Places every leaf of `batch` (leading axis B, divisible by the mesh size) on the mesh."""
  n = mesh.shape[DATA_AXIS]
  for leaf in jax.tree.leaves(batch):
    if leaf.shape[0] % n:
      raise ValueError(f"batch axis {leaf.shape[0]} is not divisible by {n} devices")
  return jax.device_put(batch, data_sharding(mesh))


def replicate(tree, mesh: Mesh):
  """Places every leaf of `tree` whole on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))


# ---- several processes (multi-host) -------------------------------------------------------------
# Under `jax.distributed.initialize()` every process runs the same program on its own devices; a
# mesh spans all of them. The helpers below are what the entry points need on top of that: which
# rows of a batch this process reads, whole arrays back on every host, and one decision or value
# shared by all processes. With one process they reduce to the single-process code paths.


def initialize_distributed(mode: str = "auto") -> bool:
  """Joins the processes of a multi-host run with `jax.distributed.initialize()`.

  Call it before anything touches a device. 'auto' initialises under Slurm with several tasks
  (JAX reads SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID) and on
  a multi-host TPU pod; 'on' always (e.g. with JAX_COORDINATOR_ADDRESS and explicit process
  ids); 'off' never. Returns whether the distributed runtime is up.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"distributed mode {mode!r}: choose auto, on or off")
  if mode == "off" or jax.distributed.is_initialized():
    return jax.distributed.is_initialized()
  multi_slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_NODELIST" in os.environ
  multi_tpu = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if mode == "on" or multi_slurm or multi_tpu:
    jax.distributed.initialize()
  return jax.distributed.is_initialized()


def is_primary() -> bool:
  """True on process 0, the one that writes logs, metrics and results."""
  return jax.process_index() == 0


def process_rows(mesh: Mesh, n: int) -> slice:
  """The rows [lo, hi) of an n-row batch that this process's devices hold under `data_sharding`.

  Each process reads and assembles only these rows (`global_batch` joins them into one array).

  Raises:
    ValueError: n is not divisible by the mesh, or this process's devices do not hold one
      contiguous block in mesh order (a mesh not built by `make_mesh`).
  """
  size = mesh.shape[DATA_AXIS]
  if n % size:
    raise ValueError(f"batch axis {n} is not divisible by {size} devices")
  per = n // size
  spans = data_sharding(mesh).addressable_devices_indices_map((n,))
  local = list(mesh.local_mesh.devices.ravel())
  starts = [spans[d][0].indices(n)[0] for d in local]
  lo = starts[0]
  if starts != [lo + k * per for k in range(len(local))]:
    raise ValueError(
      f"process {jax.process_index()}'s devices hold rows starting at {starts}, not one "
      "contiguous block; build the mesh with mrcom_jax.training.sharding.make_mesh"
    )
  return slice(lo, lo + per * len(local))


def local_sharding(mesh: Mesh) -> NamedSharding:
  """Splits a process's block of rows (`process_rows`) across its own devices, in mesh order."""
  return data_sharding(mesh.local_mesh)


def global_batch(local, mesh: Mesh, n: int):
  """Joins every process's block (leaves sharded by `local_sharding`) into n-row arrays sharded
  by `data_sharding(mesh)`; no data moves between hosts. One process: `local` is returned."""
  if not mesh.is_multi_process:
    return local
  target = data_sharding(mesh)
  return jax.tree.map(
    lambda x: jax.make_array_from_single_device_arrays(
      (n, *x.shape[1:]), target, [s.data for s in x.addressable_shards]
    ),
    local,
  )


def to_host(tree):
  """Every leaf as a whole numpy array on every process (gathered across hosts when sharded)."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))

  return jax.tree.map(one, tree)


def from_primary(tree):
  """Process 0's value of `tree` on every process (others pass any tree of the same shapes)."""
  if jax.process_count() == 1:
    return tree
  return multihost_utils.broadcast_one_to_all(tree, is_source=is_primary())


def max_over_processes(value: int) -> int:
  """The largest of the processes' integers (e.g. a stop code: one process stops, all stop)."""
  if jax.process_count() == 1:
    return int(value)
  return int(np.max(multihost_utils.process_allgather(np.int32(value))))
