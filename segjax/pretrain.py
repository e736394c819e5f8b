"""The classic recipe's first stage: train the encoder as a classifier of image-level labels.

The image-level label of a training image is the set of classes present among its valid pixels
(multi-hot; the weak supervision older pipelines pretrained encoders on). Every network's
`classify` method puts global average pooling and one dense layer (`classifier`) on its encoder's
deepest output; the loss is sigmoid cross-entropy. The pretrained encoder (weights and BatchNorm
statistics) then initialises the segmentation network, which trains on the pixel masks with the
encoder frozen (`model.freeze_encoder=True`, the recipe: only the decoder and head learn) or
fine-tuned (False).

Which parameters are "the encoder" is not a hand-kept list per architecture: it is every
top-level parameter scope that `classify` uses, except `classifier` (`encoder_scopes`): U-Net's
`encoder`, U-Net++'s column `X{i}_0`, V-Net's `enc{i}`/`down{i}` stages and their norms.

`train.train_and_evaluate` runs this first when `pretrain.steps > 0`, in `<workdir>/pretrain/`
(checkpointed, resumed, skipped once finished), so end-to-end training and both recipe variants
are config values apart (study axis `configs/studies/unet_ablations.py:pretraining`).
"""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from tqdm import tqdm

from segjax import checkpointing, instances, optim, parallel, state, writers
from segjax.data import pipeline
from segjax.errors import CheckpointError, ConfigError, NonFiniteLossError

CLASSIFIER = "classifier"  # the pretraining head's parameter scope, the one `classify` scope not in the encoder


def encoder_scopes(model) -> tuple[str, ...]:
    """Top-level parameter scopes of `model`'s encoder: those `model.classify` creates, but the
    classifier. Found by tracing `init` (shapes only, nothing is computed or compiled)."""
    size = (2**model.depth,) * model.spatial_dims
    init = functools.partial(model.init, train=False, method="classify")
    shapes = jax.eval_shape(init, jax.random.key(0), jax.ShapeDtypeStruct((1, *size, 1), jnp.float32))
    return tuple(k for k in shapes["params"] if k != CLASSIFIER)


def check_config(config: ml_collections.ConfigDict) -> None:
    if config.pretrain.steps < 0:
        raise ConfigError(f"pretrain.steps={config.pretrain.steps} must be >= 0")
    if config.pretrain.steps == 0 and config.model.freeze_encoder:
        raise ConfigError(
            "model.freeze_encoder=True with pretrain.steps=0 would freeze a randomly initialised encoder; "
            "set pretrain.steps > 0 (the classic recipe) or leave the encoder trainable"
        )
    if config.pretrain.steps and (config.train.num_seeds > 1 or config.parallel.mode != "jit"):
        raise ConfigError("pretrain.steps > 0 runs with train.num_seeds=1 and parallel.mode='jit'")


def image_labels(label: jax.Array, valid: jax.Array, num_classes: int) -> jax.Array:
    """Multi-hot [B, C] float32: 1 where class c occurs among the valid pixels of example b."""
    onehot = jax.nn.one_hot(label, num_classes, dtype=jnp.float32) * valid[..., None]
    return (onehot.reshape(label.shape[0], -1, num_classes).max(axis=1) > 0).astype(jnp.float32)


def train_step(st: state.TrainState, batch: dict, *, model) -> tuple[state.TrainState, dict]:
    targets = image_labels(batch["label"], batch["valid"], model.num_classes)
    has_stats = bool(st.batch_stats)
    rng, dropout_rng = jax.random.split(st.rng)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": st.batch_stats} if has_stats else {"params": params}
        logits, updates = model.apply(
            variables,
            batch["image"],
            train=True,
            method="classify",
            mutable=["batch_stats"] if has_stats else [],
            rngs={"dropout": dropout_rng},
        )
        return optax.sigmoid_binary_cross_entropy(logits, targets).mean(), updates.get("batch_stats", st.batch_stats)

    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(st.params)
    return st.apply_gradients(grads, stats, rng), {"loss": loss}


def eval_step(st: state.TrainState, batch: dict, *, model) -> jax.Array:
    """Per-class [tp, fp, fn, tn] counts [4, C] over the real (not padding) examples; a class is
    predicted present where its logit > 0."""
    targets = image_labels(batch["label"], batch["valid"], model.num_classes) > 0
    pred = model.apply(st.variables(), batch["image"], train=False, method="classify") > 0
    real = (batch["valid"].reshape(batch["valid"].shape[0], -1).max(axis=1) > 0)[:, None]
    cells = (pred & targets, pred & ~targets, ~pred & targets, ~pred & ~targets)
    return jnp.stack([jnp.sum(c & real, axis=0) for c in cells])


def scores(counts: np.ndarray, class_names) -> dict[str, float]:
    """`pretrain/val/f1/<class>` (2tp / (2tp + fp + fn); NaN for a class never present nor
    predicted), `pretrain/val/mf1` (mean over the defined ones) and `pretrain/val/accuracy`
    (fraction of right (image, class) decisions)."""
    tp, fp, fn, tn = np.asarray(counts, np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), np.nan)
    out = {f"pretrain/val/f1/{name}": float(v) for name, v in zip(class_names, f1, strict=True)}
    out["pretrain/val/mf1"] = float(np.nanmean(f1)) if np.isfinite(f1).any() else float("nan")
    out["pretrain/val/accuracy"] = float((tp + tn).sum() / (tp + fp + fn + tn).sum())
    return out


def run(config: ml_collections.ConfigDict, workdir: str, model, splits: dict, mesh, preempt=None) -> dict | None:
    """Pretrain (or resume, or reuse the finished run in `workdir`); return the encoder's variables
    `{'params': ..., 'batch_stats': ...}` and write `workdir/metrics.json`. None when `preempt`
    (`segjax.preemption.Preemption`) asked to stop: the step reached is saved, to resume from."""
    steps, pidx, pcount = config.pretrain.steps, jax.process_index(), jax.process_count()
    os.makedirs(workdir, exist_ok=True)
    host_batch = parallel.host_batch_size(config.train.batch_size)
    ds = pipeline.train_dataset(splits["train"], config.data, host_batch, config.train.seed, pidx, pcount)
    data_iter = pipeline.train_iterator(ds, config.data)
    sample = jnp.asarray(ds[0]["image"][:1])
    opt_cfg = config.optim.copy_and_resolve_references()
    opt_cfg.lr = config.pretrain.lr
    st = state.create(model, optim.build(opt_cfg, steps), sample, config.train.seed, method="classify")
    repl, batch_sh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
    st = jax.device_put(st, repl)
    ckpt = checkpointing.Checkpointer(workdir, keep=1)
    if ckpt.latest_step() is not None:
        try:
            st, data_state = ckpt.restore(st)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; the pretraining run in {workdir} does not fit this model") from err
        data_iter.set_state(data_state)
    step = int(st.step)
    train_fn = jax.jit(
        functools.partial(train_step, model=model), in_shardings=(repl, batch_sh), out_shardings=repl, donate_argnums=0
    )
    writer = writers.MetricWriter(workdir)
    bar = tqdm(total=steps, initial=step, desc="pretrain encoder", unit="step", disable=pidx != 0)
    unread, window = [], []  # losses still on device; this logging window's (their mean is logged)

    def read_losses() -> None:
        """Every loss since the last read, checked before anything is logged or saved."""
        values = [float(x) for x in jax.device_get(unread)]
        unread.clear()
        for k, value in enumerate(values):
            if not np.isfinite(value):
                at = step - len(values) + k + 1
                raise NonFiniteLossError(f"pretraining loss is {value} at step {at}; lower pretrain.lr")
        window.extend(values)

    try:
        while step < steps:
            st, out = train_fn(st, parallel.to_global(next(data_iter), mesh, batch_sh))
            step += 1
            bar.update(1)
            unread.append(out["loss"])
            if step % config.train.log_every == 0 or step == steps:
                read_losses()
                loss = float(np.mean(window))
                window.clear()
                writer.write(step, {"pretrain/train/loss": loss})
                bar.set_postfix(loss=f"{loss:.4f}")
            stop = preempt is not None and preempt.reached()
            if step % config.train.checkpoint_every == 0 or step == steps or stop:
                read_losses()  # no checkpoint after a step whose loss was not finite
                ckpt.save(step, st, data_iter.get_state())
            if stop:
                logging.warning("SIGTERM: saved a pretraining checkpoint at step %d; exiting (rerun to resume)", step)
                return None
        eval_fn = jax.jit(functools.partial(eval_step, model=model), in_shardings=(repl, batch_sh), out_shardings=repl)
        batches = pipeline.eval_batches(
            splits["validation"],
            config.data,
            parallel.host_batch_size(config.eval.batch_size, "eval.batch_size"),
            pidx,
            pcount,
            pad_multiple=2**config.model.depth,
            agree=parallel.largest_over_hosts,
        )
        counts = 0
        for b in batches:
            counts = counts + np.asarray(eval_fn(st, parallel.to_global(b, mesh, batch_sh)), np.int64)
            if preempt is not None and preempt.reached():  # the last step is saved: resuming evaluates again
                logging.warning("SIGTERM during the pretrained encoder's evaluation: abandoned it (rerun to resume)")
                return None
        results = {"step": step, **scores(counts, instances.class_names(config))}
        writer.write(step, results)
    finally:
        bar.close()
        ckpt.wait()
        ckpt.close()
        writer.close()
    logging.info("pretrained encoder: %s", json.dumps(results))
    if pidx == 0:
        writers.write_summary(os.path.join(workdir, writers.SUMMARY_FILE), results)
    params, stats = jax.device_get(st.params), jax.device_get(st.batch_stats)
    scopes = [k for k in params if k != CLASSIFIER]
    return {
        "params": {k: params[k] for k in scopes},
        "batch_stats": {k: stats[k] for k in scopes if k in stats} if stats else {},
    }


def load_encoder(st: state.TrainState, encoder: dict) -> state.TrainState:
    """The segmentation state with its encoder scopes replaced by the pretrained ones (the same
    scopes and shapes, checked); everything else and a fresh optimizer state are kept."""
    mine = {k: jax.tree_util.tree_map(jnp.shape, st.params[k]) for k in encoder["params"] if k in st.params}
    theirs = jax.tree_util.tree_map(jnp.shape, encoder["params"])
    if mine != theirs:
        raise CheckpointError(
            f"the pretrained encoder's parameters ({sorted(theirs)}) do not fit this model's encoder: "
            "scopes or shapes differ"
        )
    params = {**st.params, **encoder["params"]}
    stats = {**st.batch_stats, **encoder["batch_stats"]} if st.batch_stats else st.batch_stats
    return st.replace(params=params, batch_stats=stats, opt_state=optim.init(st.tx, params, stats))


def frozen_encoder_tx(tx: optax.GradientTransformation, scopes) -> optax.GradientTransformation:
    """`tx` for everything but the encoder `scopes` (`encoder_scopes`), whose parameters never
    change (no weight decay either)."""
    scopes = frozenset(scopes)

    def labels(params):
        return traverse_util.path_aware_map(lambda path, _: "frozen" if path[0] in scopes else "train", params)

    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
