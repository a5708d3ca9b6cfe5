"""Data parallelism: one device mesh with a 'data' axis; batches sharded, state replicated.

Built on `jax.make_mesh` + `NamedSharding` + `jax.jit` (never `pmap`). A jitted update given a
batch sharded along 'data' and a replicated state computes the same mean-over-batch loss and
gradients as on one device: XLA inserts the cross-device sums, so nothing here rescales them.
"""

from __future__ import annotations

import jax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices (all by default), axis 'data'."""
  devices = jax.devices()
  n = len(devices) if num_devices is None else num_devices
  if not 0 < n <= len(devices):
    raise ValueError(f"asked for {n} devices, {len(devices)} available")
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
