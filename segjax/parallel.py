"""Device mesh and shardings: state replicated, batch split along the `data` axis.

Under global-view `jax.jit` the batch axis spans every device of every host, so BatchNorm
statistics, losses and confusion matrices are already global; no hand-written reductions.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segjax.errors import ConfigError

# How long processes wait for each other at a host barrier (process 0 preparing a large dataset).
BARRIER_TIMEOUT_S = 6 * 3600


def coordination_client():
    """The multi-process coordination service's client (host barriers, a key-value store), or
    None: not started, or a JAX whose private module moved (the public API has neither; callers
    then fall back to device collectives)."""
    try:
        from jax._src import distributed
    except ImportError:
        return None
    return getattr(getattr(distributed, "global_state", None), "client", None)


def host_barrier(name: str) -> None:
    """Block until every process arrives. Uses the coordination service's barrier, not a device
    collective: on the CPU backend the first collective builds a Gloo context, which fails when
    the processes arrive more than 30 s apart (seen with two loopback processes under load)."""
    if jax.process_count() == 1:
        return
    client = coordination_client()
    if client is None or not hasattr(client, "wait_at_barrier"):
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, timeout_in_ms=BARRIER_TIMEOUT_S * 1000)


_decisions = itertools.count()  # one key per call: every process makes the same calls in the same order


def decided_by_process_0(name: str, value: bool) -> bool:
    """Process 0's `value` on every process, through the coordination service's key-value store
    (host-side, as `host_barrier`): a check whose inputs differ between hosts (free memory) must
    not stop one process alone, leaving the others waiting in their next collective."""
    if jax.process_count() == 1:
        return value
    client = coordination_client()
    if client is None or not hasattr(client, "blocking_key_value_get"):
        return bool(multihost_utils.broadcast_one_to_all(np.int32(value)))
    key = f"segjax/{name}/{next(_decisions)}"
    if jax.process_index() == 0:
        client.key_value_set(key, str(int(value)))
        return value
    return client.blocking_key_value_get(key, BARRIER_TIMEOUT_S * 1000) == "1"


def make_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("data",))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec("data"))


def host_batch_size(global_batch: int, what: str = "train.batch_size") -> int:
    """This host's share of a global batch; the batch must split evenly over all devices."""
    devices = jax.device_count()
    if global_batch % devices:
        raise ConfigError(
            f"{what}={global_batch} is not divisible by the {devices} devices; use a multiple of {devices}"
        )
    return global_batch // jax.process_count()


def to_global(batch: dict[str, np.ndarray], mesh: Mesh, sharding: NamedSharding | None = None) -> dict[str, jax.Array]:
    """Assemble each host's numpy slice into one global array sharded along `data`."""
    sharding = sharding or batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


# --- pmap mode (parallel.mode='pmap'): one replica of the state per local device -------------

MODES = ("jit", "pmap")
PMAP_AXIS = "batch"


def replicate(tree):
    """A copy of `tree` on every local device, stacked along a new leading axis (what
    `jax.device_put_replicated`, now removed, did). Leaves may be host arrays or replicated
    global arrays (this host's copy is used)."""
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(np.asarray(devices), (PMAP_AXIS,)), PartitionSpec(PMAP_AXIS))

    def put(x):
        x = np.asarray(x.addressable_data(0) if isinstance(x, jax.Array) else x)
        return jax.device_put(np.broadcast_to(x, (len(devices), *x.shape)), sharding)

    return jax.tree_util.tree_map(put, tree)


def unreplicate(tree):
    """Device 0's copy (the replicas are identical: gradients and batch norm are averaged)."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def unreplicate_global(tree, mesh: Mesh):
    """The pmap state as one global array per leaf, replicated over `mesh` (every host's devices):
    what a checkpoint saves. On several hosts orbax refuses host-local arrays (each process
    holds only its own devices' replicas), so every process contributes its local copy."""
    return multihost_utils.host_local_array_to_global_array(unreplicate(tree), mesh, PartitionSpec())


def split_for_devices(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This host's batch [B, ...] -> [local devices, B / local devices, ...] for pmap."""
    n = jax.local_device_count()
    return {k: v.reshape(n, v.shape[0] // n, *v.shape[1:]) for k, v in batch.items()}


def largest_over_hosts(shape: tuple[int, ...]) -> tuple[int, ...]:
    """This host's padded evaluation size -> the largest of every host's (an all-gather; every
    process calls it once per batch), so hosts evaluating images of different sizes pad their
    batches alike."""
    if jax.process_count() == 1:
        return tuple(shape)
    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(shape, np.int32)))  # [hosts, dims]
    return tuple(int(v) for v in gathered.max(axis=0))


NAME_BYTES = 255  # a file name's longest (NAME_MAX); longer names are cut to it when gathered


def gather_host_rows(host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This host's rows of one evaluation batch (host-only keys: truth maps, names, voxel spacing;
    [host_batch, ...] each) -> the global batch's rows, hosts in process order (as
    `pipeline.eval_order` and the eval step's outputs). Every process must call it with the same
    keys (an all-gather across hosts); arrays must have equal shapes on every host. Strings
    travel as NAME_BYTES bytes (longer ones are cut)."""
    if jax.process_count() == 1:
        return host
    out = {}
    for key, value in host.items():
        value = np.asarray(value)
        text = value.dtype.kind in "USO"
        if text:
            encoded = np.zeros((len(value), NAME_BYTES), np.uint8)
            for i, name in enumerate(value):
                raw = str(name).encode()[:NAME_BYTES]
                encoded[i, : len(raw)] = np.frombuffer(raw, np.uint8)
            value = encoded
        gathered = np.asarray(multihost_utils.process_allgather(value))  # [hosts, host_batch, ...]
        gathered = gathered.reshape(-1, *gathered.shape[2:])
        if text:
            gathered = np.array([bytes(row).rstrip(b"\0").decode(errors="replace") for row in gathered])
        out[key] = gathered
    return out


# eval-step outputs with one row per image
PER_IMAGE_OUTPUTS = {"confusion", "boundary_inter", "boundary_union", "pred", "label", "valid"}


def merge_eval_outputs(out: dict) -> dict:
    """pmap eval outputs -> jit's layout: per-image outputs (confusions, class maps) of all devices
    of all hosts in one batch axis (each host evaluates its own rows of every global batch); the
    loss is already global (psum over the pmap axis, which spans every host)."""
    out = jax.device_get(out)
    merged = {k: v[0] for k, v in out.items()}
    for k in sorted(PER_IMAGE_OUTPUTS & set(out)):  # every host's devices, in order (sorted: the hosts'
        # all-gathers must come in one order, and a set's order differs between processes)
        rows = out[k]
        if jax.process_count() > 1:
            rows = np.asarray(multihost_utils.process_allgather(rows))  # [hosts, local devices, B, ...]
            rows = rows.reshape(-1, *rows.shape[2:])
        merged[k] = rows.reshape(-1, *rows.shape[2:])
    return merged
