"""One device mesh (axes `data`, `fsdp`) and the rules that place batches and parameters on it.

* Batches: the leading axis is split over both axes (every device is a data-parallel worker).
* Parameters: replicated, or - for leaves with more than `min_size` elements - split along their
  largest axis divisible by the `fsdp` size (big_vision's shape rule; diffusers modules carry no
  logical annotations). Optimizer state follows its parameters.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

Tree = Any


# ---------------------------------------------------------------------------------------------------
# Processes and mesh
# ---------------------------------------------------------------------------------------------------
def maybe_initialize_distributed(config) -> None:
    """`jax.distributed.initialize()` when `config.multihost` or env MTOK_MULTIHOST=1 asks for it.

    Must run before anything touches the devices. On Cloud TPU / SLURM / Kubernetes it needs no
    arguments; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID.
    """
    wanted = bool(config.get("multihost", False)) or os.environ.get("MTOK_MULTIHOST", "0") == "1"
    if wanted and not jax.distributed.is_initialized():
        jax.distributed.initialize()


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
    """Mesh over `devices` (default: all, of every process) with axes ('data', 'fsdp'); one size may be -1
    (the rest). `jax.make_mesh` orders the devices by the physical topology (TPU ICI rings, GPU NVLink
    islands) with GSPMD's automatic sharding propagation on both axes.

    Sizes whose product is below the device count use the first devices (e.g. data=1, fsdp=1 runs on
    one device of many).
    """
    devices = list(jax.devices() if devices is None else devices)
    data, fsdp = int(mesh_config["data"]), int(mesh_config["fsdp"])
    n = len(devices)
    if data == -1:
        data = n // fsdp
    if fsdp == -1:
        fsdp = n // data
    if data < 1 or fsdp < 1 or data * fsdp > n:
        raise ValueError(f"mesh data={mesh_config['data']} fsdp={mesh_config['fsdp']} does not fit {n} devices")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[: data * fsdp])


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Sharding of a batch array whose axis `leading` is the example axis (split over all devices)."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def num_batch_shards(mesh: Mesh) -> int:
    """How many ways the example axis of a batch is split (= mesh size)."""
    return int(mesh.shape["data"] * mesh.shape["fsdp"])


# ---------------------------------------------------------------------------------------------------
# Parameter placement
# ---------------------------------------------------------------------------------------------------
def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int) -> P:
    """PartitionSpec of one leaf: its largest axis divisible by `fsdp_size` goes to 'fsdp' when the
    leaf has more than `min_size` elements; otherwise replicated."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) <= min_size:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp_size == 0:
            return P(*[("fsdp" if a == axis else None) for a in range(len(shape))])
    return P()


def param_shardings(mesh: Mesh, shapes: Tree, *, shard: bool, min_size: int) -> Tree:
    """Tree of NamedSharding for a tree of arrays / ShapeDtypeStructs: fsdp by size if `shard`."""
    fsdp_size = int(mesh.shape["fsdp"]) if shard else 1
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp_size, min_size)), shapes)
