"""Confusion-matrix metrics (jit-compatible): IoU, Dice, precision, recall, specificity, accuracy.

Conventions (each one named, defaults = common research practice, printed with every result):
  * rows = ground truth, columns = prediction: `confusion[t, p]` counts pixels of class t
    predicted as p. Pixels with `valid == 0` (ignore label, padding) are not counted.
  * average='dataset' (default; Cityscapes/mmseg): sum the counts over the whole split, compute
    each class's score once, then average over classes. Never a mean of per-batch scores.
    average='per_image': score each image and class, average over images (per class), then over
    classes. average='micro': pool the counts of all classes, then score once.
  * empty (a score whose denominator is 0, e.g. IoU of a class absent from both truth and
    prediction): 'nan' (default: left out of the means), 'one' or 'zero'. This matches
    scikit-learn's `zero_division`.
  * include_background=True (default) keeps class 0 in the means.

Example:
    >>> import numpy as np
    >>> from segjax import metrics
    >>> truth = np.array([[0, 1], [1, 1]]); pred = np.array([[0, 1], [0, 1]])
    >>> cm = metrics.confusion_matrix(truth, pred, num_classes=2)
    >>> np.asarray(cm).tolist()
    [[1, 0], [1, 2]]
    >>> round(float(metrics.summarize(cm)["miou"]), 4)   # (1/2 + 2/3) / 2
    0.5833
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from segjax.errors import DataError

AVERAGES = ("dataset", "per_image", "micro")
EMPTY_POLICIES = {"nan": jnp.nan, "one": 1.0, "zero": 0.0}
SCORES = ("iou", "dice", "precision", "recall", "specificity")


def _is_concrete(*arrays) -> bool:
    return not any(isinstance(a, jax.core.Tracer) for a in arrays)


def _check_inputs(labels, preds, num_classes: int, valid) -> None:
    """Eager-mode checks (skipped under jit): same shape, integer maps, values in 0..C-1."""
    labels, preds = np.asarray(labels), np.asarray(preds)
    if labels.shape != preds.shape:
        raise DataError(f"labels shape {labels.shape} differs from predictions shape {preds.shape}")
    for name, a in (("labels", labels), ("predictions", preds)):
        if not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"{name} must be an integer class-id map, got dtype {a.dtype}; take argmax of scores first")
    mask = np.ones(labels.shape, bool) if valid is None else np.asarray(valid).astype(bool)
    for name, a in (("labels", labels), ("predictions", preds)):
        bad = ((a < 0) | (a >= num_classes)) & mask
        if bad.any():
            values = np.unique(a[bad])[:5].tolist()
            hint = " (a 0/255 mask? store class ids 0..C-1)" if 255 in values else ""
            raise DataError(
                f"{name} hold values {values} outside 0..{num_classes - 1}; mark them invalid or set ignore_label{hint}"
            )


def confusion_matrix(labels, preds, num_classes: int, valid=None, ignore_label: int | None = None) -> jax.Array:
    """[num_classes, num_classes] int32 counts (rows = ground truth) over all pixels of any shape.

    `valid` (same shape, bool/0-1) and `ignore_label` exclude pixels. Under `jax.jit` the value
    checks are skipped (they need concrete values); call it eagerly once to validate new data.
    """
    labels = jnp.asarray(labels)
    preds = jnp.asarray(preds)
    mask = jnp.ones(labels.shape, bool) if valid is None else jnp.asarray(valid).astype(bool)
    if ignore_label is not None:
        mask = mask & (labels != ignore_label)
    if _is_concrete(labels, preds, mask):
        _check_inputs(labels, preds, num_classes, mask)
    labels = jnp.where(mask, labels, 0).astype(jnp.int32)
    preds = jnp.where(mask, preds, 0).astype(jnp.int32)
    index = (labels * num_classes + preds).ravel()
    counts = jnp.zeros(num_classes * num_classes, jnp.int32).at[index].add(mask.ravel().astype(jnp.int32))
    return counts.reshape(num_classes, num_classes)


def per_image_confusion(labels, preds, num_classes: int, valid=None) -> jax.Array:
    """[N, C, C]: one confusion matrix per leading-axis item (for average='per_image')."""
    if valid is None:
        valid = jnp.ones(jnp.shape(labels), bool)
    return jax.vmap(lambda t, p, v: confusion_matrix(t, p, num_classes, v))(labels, preds, valid)


def counts(confusion) -> dict[str, jax.Array]:
    """Per-class tp, fp, fn, tn (float32) from a [..., C, C] confusion matrix."""
    cm = jnp.asarray(confusion, jnp.float32)  # straight to float: see `summarize_counts`
    tp = jnp.diagonal(cm, axis1=-2, axis2=-1)
    fp = jnp.sum(cm, axis=-2) - tp
    fn = jnp.sum(cm, axis=-1) - tp
    tn = jnp.sum(cm, axis=(-2, -1))[..., None] - tp - fp - fn
    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn}


def _divide(num, den, empty: str):
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), EMPTY_POLICIES[empty])


def _scores(c: dict[str, jax.Array], empty: str) -> dict[str, jax.Array]:
    tp, fp, fn, tn = c["tp"], c["fp"], c["fn"], c["tn"]
    return {
        "iou": _divide(tp, tp + fp + fn, empty),
        "dice": _divide(2 * tp, 2 * tp + fp + fn, empty),
        "precision": _divide(tp, tp + fp, empty),
        "recall": _divide(tp, tp + fn, empty),
        "specificity": _divide(tn, tn + fp, empty),
    }


def class_scores(confusion, empty: str = "nan") -> dict[str, jax.Array]:
    """Per-class `iou`, `dice`, `precision`, `recall`, `specificity` of a [..., C, C] confusion
    matrix, over any leading axes (e.g. one row per image)."""
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty={empty!r} is not valid; choose one of {list(EMPTY_POLICIES)}")
    return _scores(counts(confusion), empty)


def summarize(confusion, average: str = "dataset", empty: str = "nan", include_background: bool = True) -> dict:
    """Named scores from a confusion matrix.

    `confusion` is [C, C] for 'dataset' and 'micro', [N, C, C] for 'per_image'. Returns per-class
    arrays `iou`, `dice`, `precision`, `recall`, `specificity`, `tp`, `fp`, `fn`, `tn` (dataset
    and per_image), their class means `miou`, `mdice`, `mprecision`, `mrecall`, `mspecificity`
    (NaN classes left out), and pixel `accuracy`. With 'micro' the means are the pooled scores.
    """
    _check_options(average, empty)
    shape = jnp.shape(confusion)
    if len(shape) != (3 if average == "per_image" else 2) or shape[-1] != shape[-2]:
        want = "[N, C, C]" if average == "per_image" else "[C, C]"
        raise ValueError(f"average={average!r} needs a {want} confusion matrix, got shape {shape}")
    return summarize_counts(counts(confusion), average, empty, include_background)


def summarize_counts(c: dict, average: str = "dataset", empty: str = "nan", include_background: bool = True) -> dict:
    """`summarize` from per-class pixel counts `tp`, `fp`, `fn`, `tn` ([C]; [N, C] for
    'per_image'), e.g. counts summed over the folds of a cross-validation, as a run's metrics.json
    reports them: every score depends on the confusion matrix only through these four."""
    _check_options(average, empty)
    # straight to float32: JAX without x64 takes a numpy int64 array as int32 first, so a count of
    # 2**31 pixels or more (a large 3D split, folds summed) wrapped to a negative number
    c = {k: jnp.asarray(c[k], jnp.float32) for k in ("tp", "fp", "fn", "tn")}
    if c["tp"].ndim != (2 if average == "per_image" else 1):
        want = "[N, C]" if average == "per_image" else "[C]"
        raise ValueError(f"average={average!r} needs {want} counts, got shape {c['tp'].shape}")
    total = c["tp"][..., 0] + c["fp"][..., 0] + c["fn"][..., 0] + c["tn"][..., 0]  # every class sees every pixel
    accuracy = _divide(jnp.sum(c["tp"], -1), total, empty)
    first = 0 if include_background else 1
    if average == "micro":
        pooled = {k: jnp.sum(v[..., first:], -1) for k, v in c.items()}
        out = {f"m{k}": v for k, v in _scores(pooled, empty).items()}
        out["accuracy"] = accuracy
        return out
    per_class = _scores(c, empty)
    if average == "per_image":
        per_class = {k: jnp.nanmean(v, axis=0) for k, v in per_class.items()}
        c = {k: jnp.sum(v, axis=0) for k, v in c.items()}
        accuracy = jnp.nanmean(accuracy)
    out = dict(per_class)
    out.update(c)
    for k in SCORES:
        out[f"m{k}"] = jnp.nanmean(per_class[k][first:])
    out["accuracy"] = accuracy
    return out


def _check_options(average: str, empty: str) -> None:
    if average not in AVERAGES:
        raise ValueError(f"average={average!r} is not valid; choose one of {list(AVERAGES)}")
    if empty not in EMPTY_POLICIES:
        raise ValueError(f"empty={empty!r} is not valid; choose one of {list(EMPTY_POLICIES)}")


def convention(average: str, empty: str, include_background: bool) -> str:
    """One line stating how the numbers were computed, printed and stored with every result."""
    bg = "with" if include_background else "without"
    return f"average={average}, empty={empty} (score of a class absent from truth and prediction), {bg} background"
