"""Evaluation over a split: padded batches, counts summed before scoring, every average."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from segjax import evaluate, metrics, parallel
from tests.conftest import load_config

NAMES = ("bg", "a", "b")


def noisy_prediction(label):
    """A deterministic 'model': wrong wherever (row + col + label) % 5 == 0."""
    idx = jnp.indices(label.shape)
    wrong = (idx[-1] + idx[-2] + label) % 5 == 0
    return jnp.where(wrong, (label + 1) % 3, label)


def fake_eval_fn(state, batch):
    del state
    preds = noisy_prediction(batch["label"])
    out = {"confusion": metrics.per_image_confusion(batch["label"], preds, 3, batch["valid"]), "loss": 0.0}
    out["boundary_inter"], out["boundary_union"] = metrics.boundary_counts(batch["label"], preds, 3, 1, batch["valid"])
    return out


@pytest.mark.parametrize("average", ["dataset", "per_image", "micro"])
def test_evaluate_matches_sklearn_over_the_whole_split(average):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (7, 6, 6))
    source = [{"image": np.zeros((6, 6, 1), np.uint8), "label": labels[i]} for i in range(7)]
    cfg = load_config("default")
    cfg.eval.average = average
    from segjax.data import pipeline

    batches = pipeline.eval_batches(source, cfg.data, batch_size=3)  # 3 batches, 2 padding images
    results = evaluate.evaluate(fake_eval_fn, None, batches, parallel.make_mesh(), cfg.eval, NAMES)
    preds = np.asarray(noisy_prediction(jnp.asarray(labels)))
    assert results["val/images"] == 7 and results["val/pixels"] == 7 * 36
    if average == "dataset":
        ref = skm.jaccard_score(labels.ravel(), preds.ravel(), average="macro")
    elif average == "micro":
        ref = skm.jaccard_score(labels.ravel(), preds.ravel(), average="micro")
    else:
        ref = np.mean([np.mean(skm.jaccard_score(labels[i].ravel(), preds[i].ravel(), average=None)) for i in range(7)])
    np.testing.assert_allclose(results["val/miou"], ref, rtol=1e-6)
    np.testing.assert_allclose(results["val/accuracy"], skm.accuracy_score(labels.ravel(), preds.ravel()), rtol=1e-6)
    ref_b = metrics.boundary_iou(labels, preds, 3, dilation=1)
    np.testing.assert_allclose(results["val/mbiou"], float(ref_b["mbiou"]), rtol=1e-6)
