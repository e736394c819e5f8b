"""Pure training and evaluation steps: no I/O, no Python side effects; `jax.jit` compiles them."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import optax

from segjax import inference, losses, metrics
from segjax.state import TrainState


def _loss_and_grads(params, batch_stats, batch, rng, model, loss_cfg, axis_name=None):
    """Loss, named terms, new BatchNorm statistics and gradients for one (micro-)batch."""
    has_stats = bool(batch_stats)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": batch_stats} if has_stats else {"params": params}
        (logits, aux), updates = model.apply(
            variables,
            batch["image"],
            train=True,
            rngs={"dropout": rng},
            mutable=["batch_stats"] if has_stats else [],
        )
        loss, terms = losses.total_loss(loss_cfg, logits, batch["label"], batch["valid"], aux, axis_name)
        return loss, (terms, updates.get("batch_stats", batch_stats))

    (loss, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    if axis_name:  # the loss already holds global sums; the mean of the per-device gradients is exact
        grads = jax.lax.pmean(grads, axis_name)
    return loss, terms, new_stats, grads


def update_by_select(state: TrainState, finite, update) -> TrainState:
    """`update(state)` where `finite`, else `state`, as an element-wise select over the state:
    on accelerators it fuses into the update's own kernels, where a branch would stall (XLA:GPU's
    conditional copies its predicate to the host and waits for it)."""
    return jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), update(state), state)


def update_by_branch(state: TrainState, finite, update) -> TrainState:
    """`update(state)` where `finite`, else `state`, as a branch: on CPU the select read both
    copies of every parameter and moment (and made XLA copy the donated old ones first), 2-3x the
    update's own time (5.6M parameters, 2 cores: 22 vs 8 ms; benchmarks/RESULTS.md, session 22)."""
    return jax.lax.cond(finite, update, lambda s: s, state)


def train_step(
    state: TrainState,
    batch: dict,
    *,
    model,
    loss_cfg: ml_collections.ConfigDict,
    grad_accum_steps: int = 1,
    axis_name: str | None = None,
):
    """One optimizer step. A non-finite loss or gradient leaves params, statistics and optimizer
    state unchanged (only the step counter and RNG advance past the bad batch); the host then
    stops or skips, per `train.nonfinite`, so a bad update never reaches a checkpoint.

    `axis_name` is for `jax.pmap` (parallel.mode='pmap'): losses reduce over the global batch,
    gradients are averaged over devices (`pmean`), dropout differs per device, and the model
    must be built with the same `norm_axis_name` (cross-replica batch norm)."""
    rng, dropout_rng = jax.random.split(state.rng)
    if axis_name:
        dropout_rng = jax.random.fold_in(dropout_rng, jax.lax.axis_index(axis_name))
    if grad_accum_steps == 1:
        loss, terms, new_stats, grads = _loss_and_grads(
            state.params, state.batch_stats, batch, dropout_rng, model, loss_cfg, axis_name
        )
    else:
        # Split the batch into micro-batches; average their gradients (BatchNorm statistics are
        # updated micro-batch by micro-batch, as they would be in separate steps).
        micro = jax.tree_util.tree_map(lambda x: x.reshape(grad_accum_steps, -1, *x.shape[1:]), batch)

        def body(carry, xs):
            stats, grad_sum = carry
            mb, key = xs
            loss, terms, stats, grads = _loss_and_grads(state.params, stats, mb, key, model, loss_cfg, axis_name)
            return (stats, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), (loss, terms)

        zeros = jax.tree_util.tree_map(jnp.zeros_like, state.params)
        keys = jax.random.split(dropout_rng, grad_accum_steps)
        (new_stats, grad_sum), (loss_all, terms_all) = jax.lax.scan(body, (state.batch_stats, zeros), (micro, keys))
        grads = jax.tree_util.tree_map(lambda g: g / grad_accum_steps, grad_sum)
        loss = jnp.mean(loss_all)
        terms = jax.tree_util.tree_map(jnp.mean, terms_all)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    update = functools.partial(TrainState.apply_gradients, grads=grads, batch_stats=new_stats, rng=rng)
    new_state = jax.lax.platform_dependent(
        state,
        finite,
        cpu=functools.partial(update_by_branch, update=update),
        default=functools.partial(update_by_select, update=update),
    ).replace(step=state.step + 1, rng=rng)
    out = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    out.update({f"loss_{k}": v for k, v in terms.items()})
    return new_state, out


def make_eval_step(config: ml_collections.ConfigDict, model, axis_name: str | None = None):
    """`eval_step` bound to a run's config (loss, classes, boundary band, inference settings)."""
    return functools.partial(
        eval_step,
        model=model,
        loss_cfg=config.loss,
        num_classes=model.num_classes,
        boundary_dilation=config.eval.boundary_dilation,
        eval_cfg=config.eval,
        axis_name=axis_name,
        return_predictions=config.instances.enabled or config.eval.surface_metrics,
        return_truth=config.eval.surface_metrics,
    )


def eval_step(
    state: TrainState,
    batch: dict,
    *,
    model,
    loss_cfg: ml_collections.ConfigDict,
    num_classes: int,
    boundary_dilation: int = 0,
    eval_cfg: ml_collections.ConfigDict | None = None,
    axis_name: str | None = None,
    return_predictions: bool = False,
    return_truth: bool = False,
):
    """Per-image confusion matrices [B, C, C] of the valid pixels, per-image boundary-band counts
    [B, C] (when `boundary_dilation` > 0) and the batch loss. Counts are summed on the host.
    `eval_cfg` (window, tta) selects sliding-window and test-time-augmented inference; with
    `axis_name` (pmap) the loss is global, the per-image counts per device.
    `return_predictions` adds the class maps (`pred` [B, ...]) for host-side instance scoring,
    `return_truth` the batch's `label` and `valid` (host-side surface metrics)."""
    variables = state.eval_variables()

    def logits_fn(images):
        return model.apply(variables, images, train=False)[0]

    images = batch["image"]
    logits = logits_fn(images) if eval_cfg is None else inference.predict(logits_fn, images, eval_cfg)
    preds = jnp.argmax(logits, axis=-1)
    confusion = metrics.per_image_confusion(batch["label"], preds, num_classes, batch["valid"])
    loss, _ = losses.total_loss(loss_cfg, logits, batch["label"], batch["valid"], axis_name=axis_name)
    out = {"confusion": confusion, "loss": loss}
    if return_predictions:
        out["pred"] = preds.astype(jnp.int32)
    if return_truth:
        out["label"], out["valid"] = batch["label"], batch["valid"]
    if boundary_dilation > 0:
        inter, union = metrics.boundary_counts(
            batch["label"], preds, num_classes, boundary_dilation, batch["valid"], per_image=True
        )
        out["boundary_inter"], out["boundary_union"] = inter, union
    return out
