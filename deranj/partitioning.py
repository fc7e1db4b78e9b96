"""A device mesh and logical-axis rules for parameters and batches (T5X's partitioning.py).

Parameters carry logical axis names (`deranj.models.axes`: VOCAB, EMBED, ...; see
`EncoderDecoderModel.logical_axes`). The rules below map each name to a mesh axis, so
one model definition runs data-parallel, model-parallel or both:

    partitioner = Partitioner(MeshConfig(data=2, model=4))
    axes = model.logical_axes()
    params = partitioner.shard_params(params, axes)
    batch = partitioner.shard_batch(numpy_batch)
    loss = jax.jit(model.loss_fn)(params, batch)  # XLA's SPMD partitioner does the rest

The mesh has two axes: "data" (batch split, parameters replicated) and "model"
(parameters split, Megatron-style). In gin, set `MeshConfig.data` / `MeshConfig.model`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
from jax.experimental import mesh_utils
import numpy as np

from deranj.models import axes as axis_names

PartitionSpec = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

DATA, MODEL = "data", "model"
BATCH = "batch"

LogicalRules = tuple[tuple[str, Optional[str]], ...]

# T5X's 1-D parameter partitioning: every weight matrix is split on its "wide" side over
# "model" and replicated over "data".
DEFAULT_RULES: LogicalRules = (
    (BATCH, DATA),
    # The output softmax and embedding rows: the largest matrices at small d_model.
    (axis_names.VOCAB, MODEL),
    # MLP in: [embed, mlp], out: [mlp, embed]; attention in: [embed, heads, kv], out:
    # [heads, kv, embed]. Splitting the inner dimension keeps each block's two matmuls
    # local, with one all-reduce at its output.
    (axis_names.MLP, MODEL),
    (axis_names.HEADS, MODEL),
    # d_model is contracted in every layer; splitting it would add an all-reduce per
    # matmul. Sharding it over "data" instead would be 2-D (ZeRO-like) partitioning,
    # which needs gathers in every step; not worth it at DeRa's model sizes.
    (axis_names.EMBED, None),
    # Heads already take "model" in every tensor that has kv; a mesh axis may split
    # only one dimension of an array.
    (axis_names.KV, None),
    # [heads, buckets] position tables are tiny; heads already splits them over "model".
    (axis_names.RELPOS, None),
)


class PartitioningError(ValueError):
  """A mesh that does not fit the devices, or an array that does not fit the mesh."""


@gin.configurable
@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """The device mesh ("data", "model").

  Attributes:
    data: devices splitting the batch; -1 takes all devices `model` leaves.
    model: devices splitting each parameter (heads, MLP width, vocabulary).
    coordinator_address: multi-host only: "host:port" of process 0. When set,
      `jax.distributed.initialize` is called (once per process) before devices are listed.
    num_processes: multi-host only: total number of processes.
    process_id: multi-host only: this process's index.
  """
  data: int = -1
  model: int = 1
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  def mesh_shape(self, num_devices: int) -> tuple[int, int]:
    """(data, model) for `num_devices` devices, -1 resolved; raises PartitioningError."""
    if self.model < 1:
      raise PartitioningError(f"MeshConfig.model={self.model}: must be >= 1.")
    if self.data != -1 and self.data < 1:
      raise PartitioningError(f"MeshConfig.data={self.data}: must be >= 1, or -1 for all "
                              "devices not used by MeshConfig.model.")
    if self.data == -1:
      if num_devices % self.model:
        raise PartitioningError(
            f"MeshConfig.model={self.model} does not divide the {num_devices} devices; set "
            f"MeshConfig.model to a divisor of {num_devices}.")
      return num_devices // self.model, self.model
    if self.data * self.model != num_devices:
      raise PartitioningError(
          f"mesh data={self.data} x model={self.model} = {self.data * self.model} devices, "
          f"but there are {num_devices}; change MeshConfig.data or MeshConfig.model so that "
          f"their product is {num_devices} (MeshConfig.data=-1 takes the rest).")
    return self.data, self.model


def _maybe_initialize_distributed(config: MeshConfig) -> None:
  # Must precede the first device query; a second Partitioner must not call it again.
  if config.coordinator_address is None or jax.distributed.is_initialized():
    return
  jax.distributed.initialize(coordinator_address=config.coordinator_address,
                             num_processes=config.num_processes,
                             process_id=config.process_id)


def _path_str(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator="/")


def _shape(x) -> tuple[int, ...]:
  return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


class Partitioner:
  """Places parameters and batches on a ("data", "model") mesh by logical-axis rules.

  Args:
    config: the mesh; None builds `MeshConfig()` at call time, so gin bindings apply.
    rules: (logical axis, mesh axis or None) pairs, in priority order (flax semantics:
      a mesh axis splits at most one dimension of an array).
    devices: the devices to use (default: all, arranged by `mesh_utils` to follow the
      physical topology).
  """

  def __init__(self, config: Optional[MeshConfig] = None, rules: LogicalRules = DEFAULT_RULES,
               devices: Optional[Sequence[jax.Device]] = None):
    self.config = MeshConfig() if config is None else config
    self.rules = tuple(tuple(r) for r in rules)
    _maybe_initialize_distributed(self.config)
    given = devices is not None
    devices = list(jax.devices() if devices is None else devices)
    shape = self.config.mesh_shape(len(devices))
    if given:  # a caller's subset: their order is the mesh order
      device_array = np.asarray(devices, dtype=object).reshape(shape)
    else:
      device_array = mesh_utils.create_device_mesh(shape, devices)
    self.mesh = jax.sharding.Mesh(device_array, (DATA, MODEL))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())

  @property
  def data_size(self) -> int:
    return self.mesh.shape[DATA]

  @property
  def model_size(self) -> int:
    return self.mesh.shape[MODEL]

  # --------------------------------------------------------------------------- params

  def _check_names(self, logical_axes) -> None:
    # flax silently replicates a dimension whose name has no rule; a typo would then
    # cost memory without any error.
    known = {name for name, _ in self.rules}
    for path, spec in jax.tree_util.tree_leaves_with_path(
        logical_axes, is_leaf=lambda x: isinstance(x, PartitionSpec)):
      for name in spec:
        if isinstance(name, str) and name not in known:
          raise PartitioningError(f"parameter {_path_str(path)} has logical axis {name!r}, "
                                  f"which no rule maps; known: {sorted(known)}.")

  def param_specs(self, logical_axes) -> Any:
    """Logical PartitionSpecs -> mesh PartitionSpecs (same tree)."""
    self._check_names(logical_axes)
    return nn.logical_to_mesh(logical_axes, self.rules)

  def param_shardings(self, logical_axes) -> Any:
    """A pytree like `logical_axes` (from `model.logical_axes()`) of NamedShardings."""
    self._check_names(logical_axes)
    return nn.logical_to_mesh_sharding(logical_axes, self.mesh, self.rules)

  def _check_divisible(self, path: str, shape, spec: PartitionSpec, names=None) -> None:
    for dim, mesh_axes in enumerate(spec):
      if mesh_axes is None:
        continue
      axes = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
      size = int(np.prod([self.mesh.shape[a] for a in axes]))
      if shape[dim] % size:
        logical = f" ({names[dim]!r})" if names is not None else ""
        bindings = " / ".join(f"MeshConfig.{a}" for a in axes)
        raise PartitioningError(
            f"parameter {path} has shape {tuple(shape)}: dimension {dim}{logical} of size "
            f"{shape[dim]} is not divisible by mesh axis {'x'.join(axes)} of size {size}; "
            f"change {bindings} to a divisor of {shape[dim]}, or the rules.")

  def shard_params(self, params, logical_axes) -> Any:
    """Places `params` (host or device arrays) on the mesh by the logical-axis rules."""
    shardings = self.param_shardings(logical_axes)
    jax.tree_util.tree_map_with_path(
        lambda path, x, s, names: self._check_divisible(_path_str(path), _shape(x), s.spec,
                                                        names),
        params, shardings, logical_axes)
    return jax.device_put(params, shardings)

  # --------------------------------------------------------------------------- batches

  def batch_sharding(self) -> NamedSharding:
    """Leading (batch) dimension split over "data", the rest replicated over "model"."""
    return NamedSharding(self.mesh, PartitionSpec(DATA))

  def shard_batch(self, batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays [B, ...] -> global arrays split over "data".

    With several processes, each passes its own rows; the global batch is their
    concatenation (process order), B * process_count rows.
    """
    sharding = self.batch_sharding()
    # Each process holds data_size / process_count of the data shards.
    local_data = max(self.data_size // jax.process_count(), 1)
    out = {}
    for name, x in batch.items():
      shape = np.shape(x)
      if not shape:
        raise PartitioningError(f"batch feature {name!r} is a scalar; batch features need a "
                                "leading batch dimension.")
      if shape[0] % local_data:
        raise PartitioningError(
            f"batch size {shape[0]} (feature {name!r}) is not divisible by the data-axis "
            f"size {local_data}; change the batch size or MeshConfig.data (mesh "
            f"data={self.data_size} x model={self.model_size}).")
      out[name] = jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return out
