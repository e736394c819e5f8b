"""optax optimizer and learning-rate schedule from `config.optim` and `config.train.steps`, and the
weight average (`optim.ema_decay`) kept in the optimizer state."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from segjax.errors import ConfigError

SCHEDULES = ("cosine", "poly", "constant")
OPTIMIZERS = ("adamw", "sgd")


def check(cfg: ml_collections.ConfigDict) -> None:
    """ConfigError for an `optim.*` setting outside what `build`, `schedule` and the weight average take."""
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r} is not valid; choose one of {list(OPTIMIZERS)}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={cfg.schedule!r} is not valid; choose one of {list(SCHEDULES)}")
    if cfg.schedule == "poly" and cfg.poly_power <= 0:
        raise ConfigError(f"optim.poly_power={cfg.poly_power} must be > 0")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"optim.ema_decay={cfg.ema_decay} must be in [0, 1) (0 = no weight average)")


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then decay to 0 at `total_steps`: cosine, or nnU-Net's polynomial
    `lr * (1 - t / T) ** poly_power` (t counted from the end of warm-up, T the steps after it);
    or constant."""
    check(cfg)
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1))
    if cfg.schedule == "poly":
        decay = optax.polynomial_schedule(cfg.lr, 0.0, cfg.poly_power, max(total_steps - warmup, 1))
        return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), decay], [warmup])
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)], [warmup]
    )


def build(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """AdamW or SGD (decoupled weight decay, momentum, optional Nesterov) on `schedule`, after
    global-norm clipping; the weight average is added by `with_weight_average`."""
    lr = schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = optax.chain(
            optax.add_decayed_weights(cfg.weight_decay), optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
        )
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt


class WeightAverageState(NamedTuple):
    count: jax.Array  # updates averaged so far
    average: Any  # the moving average of the parameters
    stats: Any = None  # the moving average of the BatchNorm statistics (`init`; None until then)


def weight_average(decay: float) -> optax.GradientTransformationExtraArgs:
    """Passes the updates through and keeps an exponential moving average of the parameters they
    produce, and of the BatchNorm statistics passed as `batch_stats=` (the averaged weights are
    evaluated with averaged statistics, as timm's model EMA does, not with the statistics of the
    current weights). Update k (k = 0, 1, ...) uses min(decay, (1 + k) / (10 + k)), as TF's
    ExponentialMovingAverage with `num_updates`, so the first updates do not drag the
    initialisation along. Kept in the optimizer state: checkpointed and resumed with it, restarted
    whenever the optimizer is (`init`, e.g. after loading a pretrained encoder)."""

    def init_fn(params):
        return WeightAverageState(jnp.zeros([], jnp.int32), jax.tree_util.tree_map(jnp.array, params))

    def update(updates, state, params=None, *, batch_stats=None, **extra):
        if params is None:
            raise ValueError("weight_average needs the parameters: call tx.update(grads, opt_state, params)")
        new = optax.apply_updates(params, updates)
        d = jnp.minimum(decay, (1.0 + state.count) / (10.0 + state.count))
        move = lambda a, x: a + (1.0 - d) * (x - a)  # noqa: E731
        average = jax.tree_util.tree_map(move, state.average, new)
        stats = state.stats
        if batch_stats is not None and stats is not None:
            stats = jax.tree_util.tree_map(move, stats, batch_stats)
        return updates, WeightAverageState(state.count + 1, average, stats)

    return optax.GradientTransformationExtraArgs(init_fn, update)


def init(tx: optax.GradientTransformation, params, batch_stats) -> optax.OptState:
    """`tx.init(params)`, with the weight average's statistics starting at `batch_stats`."""
    opt_state = tx.init(params)
    if averaged_params(opt_state) is not None:
        average = opt_state[-1]._replace(stats=jax.tree_util.tree_map(jnp.array, batch_stats))
        opt_state = (*opt_state[:-1], average)
    return opt_state


def with_weight_average(tx: optax.GradientTransformation, decay: float) -> optax.GradientTransformation:
    """`tx` followed by `weight_average(decay)` when decay > 0 (else `tx` unchanged)."""
    return optax.chain(tx, weight_average(decay)) if decay else tx


def averaged_params(opt_state) -> Any | None:
    """The weight average held by an optimizer state of `with_weight_average`, else None."""
    if isinstance(opt_state, tuple) and opt_state and isinstance(opt_state[-1], WeightAverageState):
        return opt_state[-1].average
    return None


def averaged_stats(opt_state) -> Any | None:
    """The BatchNorm statistics' average held with the weight average (`init`), else None."""
    if averaged_params(opt_state) is None:
        return None
    return opt_state[-1].stats
