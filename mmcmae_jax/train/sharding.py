"""The device mesh and how the train state and batches are laid out on it.

One mesh with two axes, ("data", "fsdp"). Batches are split over both (every device gets a slice of
the global batch). Parameters and optimizer state are replicated by default (data parallel); with
fsdp > 1 each large leaf is split along one of its dimensions over the "fsdp" axis (FSDP / ZeRO-3
style: XLA gathers a layer's weights for the matmul and reduce-scatters its gradient).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
    """A (data, fsdp) mesh over all devices; fsdp must divide the device count."""
    devices = np.asarray(jax.devices() if devices is None else devices)
    if fsdp < 1 or devices.size % fsdp:
        raise ValueError(f"config.mesh.fsdp={fsdp} must be >= 1 and divide the {devices.size} devices")
    # jax.sharding.Mesh keeps the axes in the default (auto) mode: XLA propagates shardings itself.
    return Mesh(devices.reshape(devices.size // fsdp, fsdp), BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape, fsdp: int, min_size: int = 2 ** 14) -> P:
    """Split the largest dimension divisible by `fsdp`; small leaves (norms, biases) stay replicated."""
    if fsdp == 1 or int(np.prod(shape)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp == 0:
            spec = [None] * len(shape)
            spec[dim] = "fsdp"
            return P(*spec)
    return P()


def state_shardings(abstract_state, mesh: Mesh):
    """NamedSharding for every leaf of a (abstract) train state."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda leaf: NamedSharding(mesh, fsdp_spec(leaf.shape, fsdp)), abstract_state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble each process's slice of the batch into one global array sharded over the mesh."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()}


def put_global(host_tree, shardings):
    """Host arrays, identical on every process, as global arrays with the given shardings.

    (jax.device_put only reaches this process's devices; each device here takes its own slice.)"""
    def put(host, target):
        host = np.asarray(host)
        return jax.make_array_from_callback(host.shape, target, lambda index: host[index])
    return jax.tree.map(put, host_tree, shardings)
