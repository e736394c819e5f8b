"""A run's whole config checked before any data is read or anything compiled: each module's own
checks (optim, augmentation, pretraining, instances, surface metrics, inference) and the settings
that tie them together (batch sizes vs devices, the best-checkpoint score, parallel mode vs seeds),
so a mistake fails in a second with a ConfigError naming the key, not after an hour of training."""

from __future__ import annotations

import jax

from segjax import (
    checkpointing,
    configuration,
    evaluate,
    inference,
    instances,
    metrics,
    optim,
    parallel,
    pretrain,
    surface,
)
from segjax.data import augment, class_file, validation
from segjax.errors import ConfigError

NONFINITE_POLICIES = ("stop", "skip")


def check(config) -> None:
    """Every config error that can be found before data or compilation; a folder's classes file
    (`data.folder.classes_file`) sets the classes first."""
    class_file.apply(config)
    configuration.validate(config)
    optim.check(config.optim)
    augment.check(config.data.augment)
    pretrain.check_config(config)
    instances.check_config(config)
    surface.check_config(config)
    validation.check_ignore_label(config.data.num_classes, config.data.ignore_label)
    if config.train.nonfinite not in NONFINITE_POLICIES:
        raise ConfigError(f"train.nonfinite={config.train.nonfinite!r}; choose one of {list(NONFINITE_POLICIES)}")
    if config.eval.average not in metrics.AVERAGES:
        raise ConfigError(f"eval.average={config.eval.average!r}; choose one of {list(metrics.AVERAGES)}")
    if config.eval.empty not in metrics.EMPTY_POLICIES:
        raise ConfigError(f"eval.empty={config.eval.empty!r}; choose one of {list(metrics.EMPTY_POLICIES)}")
    outputs = instances.num_outputs(config)
    if config.loss.class_weights and len(config.loss.class_weights) != outputs:
        raise ConfigError(
            f"loss.class_weights has {len(config.loss.class_weights)} values; give one per network output "
            f"({outputs}: data.num_classes, plus the boundary class under instances.enabled)"
        )
    inference.check(config.eval, config.model.spatial_dims, 2**config.model.depth)
    if config.train.best_mode not in checkpointing.BEST_MODES:
        raise ConfigError(f"train.best_mode={config.train.best_mode!r}; choose one of {list(checkpointing.BEST_MODES)}")
    keys = evaluate.run_score_keys(config)
    if config.train.best_metric not in keys:
        raise ConfigError(
            f"train.best_metric={config.train.best_metric!r} is not a validation score; choose one of {sorted(keys)}"
        )
    if config.train.num_seeds < 1:
        raise ConfigError(f"train.num_seeds={config.train.num_seeds} must be >= 1")
    if config.parallel.mode not in parallel.MODES:
        raise ConfigError(f"parallel.mode={config.parallel.mode!r}; choose one of {list(parallel.MODES)}")
    if config.parallel.mode == "pmap" and config.train.num_seeds > 1:
        raise ConfigError("train.num_seeds > 1 runs under jit; use parallel.mode='jit' with it")
    for what in ("train.batch_size", "eval.batch_size"):
        parallel.host_batch_size(config.get(what.split(".")[0])["batch_size"], what)
    accum = config.train.grad_accum_steps
    if accum < 1 or config.train.batch_size % (accum * jax.device_count()):
        raise ConfigError(
            f"train.batch_size={config.train.batch_size} must split into train.grad_accum_steps={accum} "
            f"micro-batches of a multiple of the {jax.device_count()} devices"
        )
