"""Run the eval step over a whole split, sum confusion matrices, and name the scores."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import ml_collections
import numpy as np

from segjax import metrics, parallel


def evaluate(
    eval_fn: Callable, state, batches: Iterable[dict], mesh, eval_cfg: ml_collections.ConfigDict, class_names
) -> dict[str, float]:
    """Flat dict: `val/miou`, `val/mdice`, `val/accuracy`, `val/loss`, `val/<score>/<class>`, ...

    Counts are summed in int64 over the split before any score is computed (dataset average).
    """
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    losses = []
    for batch in batches:
        out = eval_fn(state, parallel.to_global(batch, mesh))
        confusion += np.asarray(jax.device_get(out["confusion"]), np.int64)
        losses.append(float(out["loss"]))
    scores = metrics.summarize(confusion, "dataset", eval_cfg.empty, eval_cfg.include_background)
    results = {"val/loss": float(np.mean(losses)) if losses else float("nan")}
    for key, value in scores.items():
        value = np.asarray(value)
        if value.ndim == 0:
            results[f"val/{key}"] = float(value)
        elif key in metrics.SCORES:
            for name, v in zip(class_names, value, strict=True):
                results[f"val/{key}/{name}"] = float(v)
    results["val/pixels"] = int(confusion.sum())
    return results
