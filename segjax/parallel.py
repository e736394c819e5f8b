"""Device mesh and shardings: state replicated, batch split along the `data` axis.

Under global-view `jax.jit` the batch axis spans every device of every host, so BatchNorm
statistics, losses and confusion matrices are already global; no hand-written reductions.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segjax.errors import ConfigError


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
