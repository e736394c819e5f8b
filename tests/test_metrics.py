"""Metrics against scikit-learn and hand-computed cases; every convention exercised."""

from __future__ import annotations

import doctest

import jax
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as skm

from segjax import metrics
from segjax.errors import DataError
from segjax.metrics import confusion

ZERO_DIVISION = {"nan": np.nan, "one": 1.0, "zero": 0.0}


def random_maps(seed, shape, num_classes, absent=(), ignore_fraction=0.0):
    rng = np.random.default_rng(seed)
    present = [c for c in range(num_classes) if c not in absent]
    truth = rng.choice(present, size=shape)
    pred = np.where(rng.random(shape) < 0.6, truth, rng.choice(present, size=shape))
    valid = rng.random(shape) >= ignore_fraction
    return truth, pred, valid


CASES = [
    dict(seed=0, shape=(4, 16, 16), num_classes=3),
    dict(seed=1, shape=(2, 9, 7), num_classes=5, absent=(3,), ignore_fraction=0.2),
    dict(seed=2, shape=(50,), num_classes=2, ignore_fraction=0.5),
    dict(seed=3, shape=(2, 4, 6, 5), num_classes=4, absent=(0, 2)),
]


@pytest.mark.parametrize("case", CASES)
def test_confusion_matrix_equals_sklearn(case):
    truth, pred, valid = random_maps(**case)
    c = case["num_classes"]
    ours = np.asarray(metrics.confusion_matrix(truth, pred, c, valid))
    ref = skm.confusion_matrix(truth[valid], pred[valid], labels=list(range(c)))
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("empty", ["nan", "one", "zero"])
@pytest.mark.parametrize("include_background", [True, False])
def test_dataset_scores_equal_sklearn(case, empty, include_background):
    truth, pred, valid = random_maps(**case)
    c = case["num_classes"]
    t, p = truth[valid], pred[valid]
    labels = list(range(0 if include_background else 1, c))
    zd = ZERO_DIVISION[empty]
    out = metrics.summarize(metrics.confusion_matrix(truth, pred, c, valid), "dataset", empty, include_background)
    # jaccard_score has no zero_division=nan: take 0 there and mark classes absent from both as nan
    absent = np.array([not ((t == k).any() or (p == k).any()) for k in range(c)])
    jaccard = skm.jaccard_score(t, p, labels=list(range(c)), average=None, zero_division=0 if empty == "nan" else zd)
    jaccard = np.where(absent, np.nan, jaccard) if empty == "nan" else jaccard
    per_class = {
        "iou": jaccard,
        "dice": skm.f1_score(t, p, labels=list(range(c)), average=None, zero_division=zd),
        "precision": skm.precision_score(t, p, labels=list(range(c)), average=None, zero_division=zd),
        "recall": skm.recall_score(t, p, labels=list(range(c)), average=None, zero_division=zd),
    }
    for name, ref in per_class.items():
        np.testing.assert_allclose(np.asarray(out[name]), ref, atol=1e-6, err_msg=name)
    means = {
        "miou": np.nanmean(jaccard[labels]) if empty == "nan" else np.mean(jaccard[labels]),
        "mdice": skm.f1_score(t, p, labels=labels, average="macro", zero_division=zd),
        "mprecision": skm.precision_score(t, p, labels=labels, average="macro", zero_division=zd),
        "mrecall": skm.recall_score(t, p, labels=labels, average="macro", zero_division=zd),
    }
    for name, ref in means.items():
        np.testing.assert_allclose(float(out[name]), ref, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(float(out["accuracy"]), skm.accuracy_score(t, p), atol=1e-6)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("include_background", [True, False])
def test_micro_scores_equal_sklearn(case, include_background):
    truth, pred, valid = random_maps(**case)
    c = case["num_classes"]
    t, p = truth[valid], pred[valid]
    labels = list(range(0 if include_background else 1, c))
    out = metrics.summarize(metrics.confusion_matrix(truth, pred, c, valid), "micro", "nan", include_background)
    np.testing.assert_allclose(float(out["miou"]), skm.jaccard_score(t, p, labels=labels, average="micro"), atol=1e-6)
    np.testing.assert_allclose(float(out["mdice"]), skm.f1_score(t, p, labels=labels, average="micro"), atol=1e-6)
    np.testing.assert_allclose(
        float(out["mprecision"]), skm.precision_score(t, p, labels=labels, average="micro"), atol=1e-6
    )
    np.testing.assert_allclose(float(out["mrecall"]), skm.recall_score(t, p, labels=labels, average="micro"), atol=1e-6)


def test_specificity_by_hand():
    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 1, 0, 1, 2, 2])
    out = metrics.summarize(metrics.confusion_matrix(truth, pred, 3))
    # class 1: tn = pixels with truth!=1 and pred!=1 = {0,2,5} -> 3, fp = 1 -> 3/4
    np.testing.assert_allclose(np.asarray(out["specificity"]), [3 / 3, 3 / 4, 4 / 5])


@pytest.mark.parametrize(
    ("truth", "pred", "expected"),
    [
        # class 1 absent from both -> empty policy; present in one only -> 0; in both -> real value
        ([0, 0, 0, 0], [0, 0, 0, 0], {"nan": np.nan, "one": 1.0, "zero": 0.0}),
        ([0, 1, 0, 0], [0, 0, 0, 0], {"nan": 0.0, "one": 0.0, "zero": 0.0}),
        ([0, 0, 0, 0], [0, 1, 0, 0], {"nan": 0.0, "one": 0.0, "zero": 0.0}),
        ([0, 1, 1, 0], [0, 1, 0, 0], {"nan": 0.5, "one": 0.5, "zero": 0.5}),
    ],
    ids=["absent-both", "truth-only", "pred-only", "both"],
)
def test_empty_policies_by_hand(truth, pred, expected):
    cm = metrics.confusion_matrix(np.array(truth), np.array(pred), 2)
    for policy, value in expected.items():
        out = metrics.summarize(cm, empty=policy)
        np.testing.assert_equal(float(out["iou"][1]), value)
        if policy == "nan" and np.isnan(value):
            # the class is left out of the mean: miou is the background IoU alone
            assert float(out["miou"]) == float(out["iou"][0])


def test_per_image_differs_from_dataset_as_in_textbook():
    """Image A: a large object found (IoU 1); image B: a small object missed (IoU 0).

    dataset: class-1 counts pooled -> tp=8, fn=1 -> IoU 8/9. per_image: (1 + 0) / 2 = 0.5.
    """
    truth = np.zeros((2, 3, 3), int)
    truth[0] = 1
    truth[0, 0, 0] = 1
    pred = truth.copy()
    truth[1, 1, 1] = 1  # missed in image B
    truth[0, 2, 2] = 0
    pred[0, 2, 2] = 0
    dataset = metrics.summarize(metrics.confusion_matrix(truth, pred, 2), "dataset")
    per_image = metrics.summarize(metrics.per_image_confusion(truth, pred, 2), "per_image")
    np.testing.assert_allclose(float(dataset["iou"][1]), 8 / 9)
    np.testing.assert_allclose(float(per_image["iou"][1]), 0.5)


def test_jit_gives_the_same_counts():
    truth, pred, valid = random_maps(7, (3, 8, 8), 4, ignore_fraction=0.3)
    eager = metrics.confusion_matrix(truth, pred, 4, valid)
    jitted = jax.jit(metrics.confusion_matrix, static_argnums=2)(truth, pred, 4, valid)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(jitted))


def test_ignore_label_is_excluded():
    truth = np.array([0, 1, 255, 255])
    pred = np.array([0, 1, 1, 0])
    cm = metrics.confusion_matrix(truth, pred, 2, ignore_label=255)
    np.testing.assert_array_equal(np.asarray(cm), [[1, 0], [0, 1]])


@pytest.mark.parametrize(
    ("truth", "pred", "pattern"),
    [
        (np.zeros((2, 2), int), np.zeros((2, 3), int), "differs from predictions shape"),
        (np.array([0, 255]), np.array([0, 1]), "0/255 mask"),
        (np.zeros(4, np.float32), np.zeros(4, int), "integer class-id map"),
        (np.array([0, 1]), np.array([0, 2]), r"predictions hold values \[2\]"),
    ],
)
def test_bad_inputs(truth, pred, pattern):
    with pytest.raises(DataError, match=pattern):
        metrics.confusion_matrix(truth, pred, 2)


def test_bad_summarize_options():
    cm = np.eye(2, dtype=int)
    with pytest.raises(ValueError, match="average="):
        metrics.summarize(cm, average="weighted")
    with pytest.raises(ValueError, match="empty="):
        metrics.summarize(cm, empty="skip")
    with pytest.raises(ValueError, match=r"needs a \[N, C, C\]"):
        metrics.summarize(cm, average="per_image")


@pytest.mark.parametrize("average", metrics.AVERAGES)
def test_scores_from_counts_alone_equal_the_confusion_matrix_s(average):
    """Every score depends on a confusion matrix only through each class's tp, fp, fn, tn (what a
    run's metrics.json reports), per image too: the two routes agree; wrong shapes are refused."""
    rng = np.random.default_rng(1)
    cms = rng.integers(0, 50, (5, 4, 4)) * (rng.random((5, 4, 4)) < 0.7)
    cms[:, 3, :] = cms[:, :, 3] = 0  # class 3 absent from every image: empty scores
    cm = cms if average == "per_image" else cms.sum(0)
    counts = {k: np.asarray(v).astype(np.int64) for k, v in metrics.counts(cm).items()}
    for empty in metrics.EMPTY_POLICIES:
        for background in (True, False):
            want = metrics.summarize(cm, average, empty, background)
            got = metrics.summarize_counts(counts, average, empty, background)
            assert sorted(got) == sorted(want)
            for key in want:
                np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=1e-6, equal_nan=True)
    with pytest.raises(ValueError, match=r"needs .* counts, got shape"):
        metrics.summarize_counts(metrics.counts(cms.sum(0) if average == "per_image" else cms), average)


@pytest.mark.parametrize("average", metrics.AVERAGES)
def test_counts_of_billions_of_pixels_score_as_in_float64(average):
    """A split of 3D volumes (or folds summed) counts 2**31 pixels and more: int64 counts scored
    through the confusion matrix, the counts alone and `scoring.count_scores` give numpy float64's
    scores (they wrapped to negative int32 before: NaN IoU, negative accuracy)."""
    from segjax import scoring

    cm = np.array([[3_000_000_000, 1_000_000_000], [100_000_000, 2_500_000_000]], np.int64)
    other = np.array([[500_000_000, 200_000_000], [300_000_000, 1_000_000_000]], np.int64)  # other ratios
    cms = np.stack([cm, other]) if average == "per_image" else cm
    per_image = cms if average == "per_image" else cms[None]
    tp = np.diagonal(per_image, axis1=1, axis2=2).astype(np.float64)
    fp, fn = per_image.sum(1) - tp, per_image.sum(2) - tp
    if average == "micro":
        tp, fp, fn = tp.sum(-1), fp.sum(-1), fn.sum(-1)
    iou = (tp / (tp + fp + fn)).mean(0)
    accuracy = (np.trace(per_image, axis1=1, axis2=2) / per_image.sum((1, 2))).mean()
    counts = {k: np.asarray(v).astype(np.int64) for k, v in scoring.pixel_counts(cms).items()}
    for got in (metrics.summarize(cms, average), metrics.summarize_counts(counts, average)):
        np.testing.assert_allclose(float(got["accuracy"]), accuracy, rtol=1e-6)
        np.testing.assert_allclose(float(got["miou"]), np.mean(iou), rtol=1e-6)
        if average != "micro":
            np.testing.assert_allclose(np.asarray(got["iou"]), iou, rtol=1e-6)

    eval_cfg = ml_collections.ConfigDict({"average": average, "empty": "nan", "include_background": True})
    named = scoring.count_scores(counts, eval_cfg, ["a", "b"])
    np.testing.assert_allclose([named["val/accuracy"], named["val/miou"]], [accuracy, np.mean(iou)], rtol=1e-6)


def test_module_example_runs():
    failures, tried = doctest.testmod(confusion)
    assert tried > 0 and failures == 0
