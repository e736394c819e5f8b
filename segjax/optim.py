"""optax optimizer and learning-rate schedule from `config.optim` and `config.train.steps`."""

from __future__ import annotations

import ml_collections
import optax

from segjax.errors import ConfigError

SCHEDULES = ("cosine", "constant")
OPTIMIZERS = ("adamw", "sgd")


def schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """Linear warm-up to `lr`, then cosine decay to 0 at `total_steps` (or constant)."""
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule={cfg.schedule!r} is not valid; choose one of {list(SCHEDULES)}")
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, warmup, max(total_steps, warmup + 1))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, cfg.lr, max(warmup, 1)), optax.constant_schedule(cfg.lr)], [warmup]
    )


def build(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    if cfg.name not in OPTIMIZERS:
        raise ConfigError(f"optim.name={cfg.name!r} is not valid; choose one of {list(OPTIMIZERS)}")
    lr = schedule(cfg, total_steps)
    if cfg.name == "adamw":
        opt = optax.adamw(lr, b1=cfg.momentum, weight_decay=cfg.weight_decay)
    else:
        opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), optax.sgd(lr, momentum=cfg.momentum))
    if cfg.grad_clip > 0:
        opt = optax.chain(optax.clip_by_global_norm(cfg.grad_clip), opt)
    return opt
