"""One device mesh (axes `data`, `fsdp`) and the rules that place batches and parameters on it.

* Batches: the leading axis is split over both axes (every device is a data-parallel worker).
* Parameters: replicated, or - for leaves with more than `min_size` elements - split along their
  largest axis divisible by the `fsdp` size (big_vision's shape rule; diffusers modules carry no
  logical annotations). Optimizer state follows its parameters.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mtok_jax import errors

BATCH_AXES = ("data", "fsdp")

Tree = Any


# ---------------------------------------------------------------------------------------------------
# Processes and mesh
# ---------------------------------------------------------------------------------------------------
DISTRIBUTED_ENV = ("MTOK_COORDINATOR_ADDRESS", "MTOK_NUM_PROCESSES", "MTOK_PROCESS_ID")


def initialize_distributed(config, coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
    """Start JAX's distributed runtime (one process per host) before anything touches the devices.

    Explicit: `coordinator_address` ('HOST:PORT' of process 0), `num_processes`, `process_id` (the
    entry points' --coordinator_address / --num_processes / --process_id; else the env vars
    MTOK_COORDINATOR_ADDRESS, MTOK_NUM_PROCESSES, MTOK_PROCESS_ID). Auto-detected (Cloud TPU, SLURM,
    Open MPI, Kubernetes: `jax.distributed.initialize()` without arguments) when `config.multihost` or
    MTOK_MULTIHOST=1. The CPU backend's collectives are gloo's, so several processes on one machine
    work. A no-op when nothing asks for it or the runtime already runs; then :func:`check_same_config`.
    """
    env = [os.environ.get(name) for name in DISTRIBUTED_ENV]
    coordinator_address = coordinator_address or env[0]
    num_processes = num_processes if num_processes is not None else (int(env[1]) if env[1] else None)
    process_id = process_id if process_id is not None else (int(env[2]) if env[2] else None)
    explicit = coordinator_address is not None
    if explicit and (num_processes is None or process_id is None):
        raise errors.UserError("--coordinator_address needs --num_processes and --process_id (or the env vars "
                               f"{', '.join(DISTRIBUTED_ENV)})")
    auto = bool(config.get("multihost", False)) or os.environ.get("MTOK_MULTIHOST", "0") == "1"
    if not (explicit or auto) or jax.distributed.is_initialized():
        return
    if explicit and not 0 <= process_id < num_processes:
        raise errors.UserError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()
    check_same_config(config)


def config_digest(config) -> int:
    """64-bit digest of a config's values (its sorted JSON)."""
    text = config.to_json_best_effort(sort_keys=True)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def check_same_config(config) -> None:
    """Every process must run the same config (same file, same overrides): one-line error naming the
    processes that differ from process 0 otherwise, raised in every process."""
    if jax.process_count() == 1:
        return
    digests = np.asarray(multihost_utils.process_allgather(np.asarray([config_digest(config)], np.int64))).ravel()
    differ = [i for i, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise errors.UserError(f"the {len(digests)} processes disagree on the config: process(es) "
                               f"{', '.join(map(str, differ))} differ from process 0 (config digests "
                               f"{', '.join(f'{int(d) & (2**64 - 1):016x}' for d in digests)}); start every "
                               "process with the same --config file and --config.* overrides")


def make_mesh(mesh_config: Mapping[str, int], devices=None) -> Mesh:
    """Mesh over `devices` (default: all, of every process) with axes ('data', 'fsdp'); one size may be -1
    (the rest). `jax.make_mesh` orders the devices by the physical topology (TPU ICI rings, GPU NVLink
    islands) with GSPMD's automatic sharding propagation on both axes.

    Sizes whose product is below the device count use the first devices (e.g. data=1, fsdp=1 runs on
    one device of many) — on one process only: several processes need every device in the mesh.
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
    if data * fsdp < n and jax.process_count() > 1:
        raise ValueError(f"mesh data={data} × fsdp={fsdp} covers {data * fsdp} of the {n} devices of "
                         f"{jax.process_count()} processes: with several processes it must cover all of them "
                         f"(set --config.mesh.data / --config.mesh.fsdp, one of them -1)")
    return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=(AxisType.Auto,) * 2, devices=devices[: data * fsdp])


def put(tree: Tree, shardings: Tree) -> Tree:
    """Place a tree that every process holds whole (host or single-device arrays, the same values on
    every process) on global shardings: each process fills only the shards its devices hold
    (`jax.make_array_from_callback`), so this also works where `jax.device_put` would need cross-host
    transfers (several processes). PRNG key arrays keep their key type."""
    def one(x, sharding):
        if jnp.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            data = one(jax.random.key_data(x), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(one, tree, shardings)


def owned(tree: Tree) -> Tree:
    """A copy of each array in a buffer XLA allocated: what a donated argument must be. Consumes `tree`:
    each leaf is deleted once copied, so this holds one leaf more than the tree, not two trees.

    Arrays made from host memory (`put`, checkpoint restores) may wrap that memory without a copy on
    CPU (a read-only or 64-byte aligned numpy array), and donating such a buffer is silently refused:
    the training step then writes its outputs to new memory, e.g. a second copy of SD's UNet (3.2 GiB)
    on the first step."""
    def copy(x):
        y = jnp.copy(x).block_until_ready()
        x.delete()
        return y

    return jax.tree.map(copy, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of a global array on this host (gathered from every process when its shards are
    spread over several)."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def wait_for_all_processes(name: str) -> None:
    """Block until every process reaches the barrier `name` (a no-op with one process): e.g. while
    process 0 alone scores what all of them generated."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def batch_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Sharding of a batch array whose axis `leading` is the example axis (split over all devices)."""
    return NamedSharding(mesh, P(*([None] * leading), BATCH_AXES))


def process_rows(sharding: NamedSharding, shape: tuple[int, ...], axis: int = 0) -> np.ndarray:
    """int64 [k]: the indices along `axis` of a global array of `shape` placed with `sharding` that this
    process's devices hold, ascending — the rows of each global batch a host loads
    (`jax.make_array_from_process_local_data` maps them, in this order, onto its devices)."""
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(tuple(shape)).values():
        rows.update(range(*index[axis].indices(shape[axis])))
    return np.asarray(sorted(rows), np.int64)


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
