"""Pure training and evaluation steps: no I/O, no Python side effects; `jax.jit` compiles them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import optax

from segjax import losses, metrics
from segjax.state import TrainState


def train_step(state: TrainState, batch: dict, *, model, loss_cfg: ml_collections.ConfigDict):
    """One optimizer step. A non-finite loss or gradient leaves params, statistics and optimizer
    state unchanged (only the step counter and RNG advance past the bad batch); the host then
    stops or skips, per `train.nonfinite`, so a bad update never reaches a checkpoint."""
    rng, dropout_rng = jax.random.split(state.rng)
    has_stats = bool(state.batch_stats)

    def loss_fn(params):
        variables = {"params": params, "batch_stats": state.batch_stats} if has_stats else {"params": params}
        (logits, aux), updates = model.apply(
            variables,
            batch["image"],
            train=True,
            rngs={"dropout": dropout_rng},
            mutable=["batch_stats"] if has_stats else [],
        )
        loss, terms = losses.total_loss(loss_cfg, logits, batch["label"], batch["valid"], aux)
        return loss, (terms, updates)

    (loss, (terms, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grad_norm = optax.global_norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = state.apply_gradients(grads, updates.get("batch_stats", state.batch_stats), rng)
    new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    new_state = new_state.replace(step=state.step + 1, rng=rng)
    out = {"loss": loss, "grad_norm": grad_norm, "finite": finite}
    out.update({f"loss_{k}": v for k, v in terms.items()})
    return new_state, out


def eval_step(
    state: TrainState,
    batch: dict,
    *,
    model,
    loss_cfg: ml_collections.ConfigDict,
    num_classes: int,
    boundary_dilation: int = 0,
):
    """Per-image confusion matrices [B, C, C] of the valid pixels, boundary-band counts [C]
    (when `boundary_dilation` > 0) and the batch loss. Counts are summed on the host."""
    logits, _ = model.apply(state.variables(), batch["image"], train=False)
    preds = jnp.argmax(logits, axis=-1)
    confusion = metrics.per_image_confusion(batch["label"], preds, num_classes, batch["valid"])
    loss, _ = losses.total_loss(loss_cfg, logits, batch["label"], batch["valid"])  # of the inference output
    out = {"confusion": confusion, "loss": loss}
    if boundary_dilation > 0:
        out["boundary_inter"], out["boundary_union"] = metrics.boundary_counts(
            batch["label"], preds, num_classes, boundary_dilation, batch["valid"]
        )
    return out
