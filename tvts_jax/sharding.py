"""Device mesh, parameter partitioning and global batches. Knows nothing about TVTS.

The mesh has two axes: `data` (pure data parallelism) and `fsdp` (data parallelism whose
devices also split the parameters and optimizer state). A batch is split over both axes; a large
weight is split over `fsdp` along its largest divisible dimension (the big_vision rule), so a
model that does not fit one device's memory fits `fsdp` of them. Nothing but `config.mesh`
changes between a laptop, a GPU host and a TPU pod.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)
# Weights smaller than this stay replicated: splitting them costs more in collectives than it
# saves in memory.
MIN_FSDP_SIZE = 2**14


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
  """Builds the (data, fsdp) mesh over all devices (of all hosts).

  Args:
    mesh_config: `config.mesh` with `data` (-1: all remaining devices) and `fsdp`.
    devices: defaults to `jax.devices()`.

  Returns:
    A mesh with Auto axis types: the compiler propagates shardings from the inputs and the
    `out_shardings` we give it.
  """
  devices = jax.devices() if devices is None else devices
  n, fsdp = len(devices), mesh_config.fsdp
  data = n // fsdp if mesh_config.data == -1 else mesh_config.data
  if data * fsdp != n:
    raise ValueError(f"mesh data={mesh_config.data} x fsdp={fsdp} does not cover the "
                     f"{n} devices; set --config.mesh.data=-1 or sizes whose product is {n}")
  return jax.make_mesh((data, fsdp), (DATA, FSDP),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2, devices=devices)


def param_spec(shape: tuple[int, ...], fsdp_size: int) -> P:
  """The fsdp rule: split the largest dimension divisible by the fsdp size."""
  if fsdp_size == 1 or int(np.prod(shape)) < MIN_FSDP_SIZE:
    return P()
  for axis in np.argsort(shape)[::-1]:
    if shape[axis] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[axis] = FSDP
      return P(*spec)
  return P()


def tree_shardings(mesh: jax.sharding.Mesh, abstract_tree: Any) -> Any:
  """NamedShardings for a tree of arrays/ShapeDtypeStructs by the fsdp rule."""
  fsdp_size = mesh.shape[FSDP]
  return jax.tree.map(
      lambda x: NamedSharding(mesh, param_spec(tuple(x.shape), fsdp_size)), abstract_tree)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device; other axes whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_batch(local_batch: dict[str, np.ndarray], mesh: jax.sharding.Mesh) -> dict:
  """Turns this host's slice of the batch into global arrays on the mesh.

  Every host passes its own `batch_size // process_count` examples; the result is one array per
  key with the global batch size, sharded over all devices of all hosts.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def check_batch_size(batch_size: int, mesh: jax.sharding.Mesh) -> int:
  """Returns the per-host batch size; raises if the global batch does not split evenly."""
  if batch_size % mesh.size:
    raise ValueError(f"batch_size={batch_size} is not divisible by the {mesh.size} devices")
  return batch_size // jax.process_count()


def to_host(x: Any) -> np.ndarray:
  """A (possibly multi-host sharded) array -> the full numpy value on this host."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    if x.is_fully_replicated:
      return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))
