"""K independent replicas of one small model trained in one compiled step (`train.num_seeds`).

Replica k is exactly the run with `train.seed = seed + k` (its own initialisation, data order,
augmentation and dropout); `jax.vmap` over a leading replica axis turns K small, overhead-bound
steps into one larger step. Everything per replica (state, iterator position, metrics) is
stacked or listed in replica order.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from segjax import state


def replica_seeds(seed: int, num_seeds: int) -> list[int]:
    return [seed + k for k in range(num_seeds)]


def create_states(model, tx, sample, seeds: list[int]) -> state.TrainState:
    """TrainStates of every seed stacked along a new leading axis (identical to K separate inits)."""
    states = [state.create(model, tx, sample, s) for s in seeds]
    return jax.tree_util.tree_map(lambda *leaves: np.stack([np.asarray(x) for x in leaves]), *states)


def replica(tree, k: int):
    """Replica k of a stacked pytree."""
    return jax.tree_util.tree_map(lambda x: x[k], tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """[K, B, ...] batches: replicas side by side, each replica's batch split along `data`."""
    return NamedSharding(mesh, PartitionSpec(None, "data"))


class StackedIterator:
    """One grain iterator per replica; yields their batches stacked along a new axis 0."""

    def __init__(self, iterators: list):
        self.iterators = iterators

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self.iterators]
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict:
        return {"replicas": [it.get_state() for it in self.iterators]}

    def set_state(self, saved: dict) -> None:
        for it, s in zip(self.iterators, saved["replicas"], strict=True):
            it.set_state(s)


def mean_and_spread(per_seed: list[dict]) -> dict:
    """Mean over replicas of every numeric key, plus `<key>_std` (sample std over replicas)."""
    out = {}
    for key in per_seed[0]:
        values = np.array([r[key] for r in per_seed], dtype=np.float64)
        out[key] = float(np.mean(values))
        if len(values) > 1:
            out[f"{key}_std"] = float(np.std(values, ddof=1))
    return out
