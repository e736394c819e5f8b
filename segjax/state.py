"""The whole training state as one pytree, so one orbax save/restore covers all of it."""

from __future__ import annotations

import functools
from typing import Any

import flax
import jax
import optax

from segjax import optim


@flax.struct.dataclass
class TrainState:
    """step, params, BatchNorm statistics, optimizer state (holds the schedule position) and RNG."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: optax.OptState
    rng: jax.Array  # raw uint32 key data; split once per step for dropout
    tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)

    def variables(self) -> dict:
        if self.batch_stats:
            return {"params": self.params, "batch_stats": self.batch_stats}
        return {"params": self.params}

    def eval_variables(self) -> dict:
        """What evaluation (and so the best checkpoint's choice) uses: the weight average of
        `optim.ema_decay` in place of the parameters when one is kept, with the average of the
        running BatchNorm statistics kept beside it."""
        average = optim.averaged_params(self.opt_state)
        if average is None:
            return self.variables()
        stats = optim.averaged_stats(self.opt_state)
        if self.batch_stats and stats is not None:
            return {"params": average, "batch_stats": stats}
        return {**self.variables(), "params": average}

    def apply_gradients(self, grads, batch_stats, rng):
        extra = {"batch_stats": batch_stats} if optim.averaged_params(self.opt_state) is not None else {}
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **extra)
        params = optax.apply_updates(self.params, updates)
        return self.replace(step=self.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, rng=rng)


def create(model, tx: optax.GradientTransformation, sample_image: jax.Array, seed: int, **init_kwargs) -> TrainState:
    """Initialise parameters from `seed` on a sample batch shape (values are not used);
    `init_kwargs` go to `model.init` (e.g. `method='classify'` for encoder pretraining).

    One jit-compiled program: the values of an eager `model.init` bit for bit (tested), but XLA
    compiles one program instead of one per primitive and shape, which on a cold start was most
    of the time before the first step (default U-Net, fresh process, 2 CPU cores: 6.8 s eager,
    2.5 s here; 9.5 s before `blocks.kernel_init`; benchmarks/startup_bench.py)."""
    key = jax.random.PRNGKey(seed)  # outside the program: any Python int, as before (2**32 + 5 too)
    params, batch_stats, opt_state, rng = _initial_values(
        model, tx, tuple(sorted(init_kwargs.items())), key, sample_image
    )
    return TrainState(
        step=jax.numpy.zeros((), jax.numpy.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=opt_state,
        rng=rng,
        tx=tx,
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _initial_values(model, tx, init_kwargs: tuple, key, sample_image):
    init_rng, state_rng = jax.random.split(key)
    variables = model.init({"params": init_rng}, sample_image, train=False, **dict(init_kwargs))
    batch_stats = variables.get("batch_stats", {})
    return variables["params"], batch_stats, optim.init(tx, variables["params"], batch_stats), state_rng


def param_count(params) -> int:
    return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
