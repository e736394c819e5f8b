"""Instance / panoptic segmentation: boundary-class targets, post-processing, PQ, training."""

from __future__ import annotations

import itertools
import json
import os

import numpy as np
import pytest

from segjax import evaluate, instances, metrics, train
from segjax.data import pipeline, sources
from segjax.errors import ConfigError, DataError
from tests.conftest import load_config


def _config(num_classes=3, width=1, things=(), min_size=1):
    c = load_config("tiny")
    c.data.num_classes = num_classes
    c.data.class_names = tuple(f"c{i}" for i in range(num_classes))
    c.instances.enabled = True
    c.instances.boundary_width = width
    c.instances.thing_classes = things
    c.instances.min_size = min_size
    return c


def _touching_rectangles():
    """Class 1: three rectangles (two of them touching), class 2: one rectangle; ids 1..4."""
    label = np.zeros((20, 24), np.int32)
    inst = np.zeros((20, 24), np.int32)
    for k, (r0, r1, c0, c1, cls) in enumerate(
        [(2, 9, 2, 10, 1), (2, 9, 10, 17, 1), (11, 18, 3, 9, 1), (11, 18, 12, 22, 2)], start=1
    ):
        label[r0:r1, c0:c1] = cls
        inst[r0:r1, c0:c1] = k
    label[11:18, 9:12] = 2  # class 2 touches instance 3 (class 1) here: another instance
    inst[11:18, 9:12] = 4
    return label, inst


@pytest.mark.parametrize("width", [1, 2])
def test_boundary_targets_mark_thing_pixels_near_another_instance(width):
    label, inst = _touching_rectangles()
    got = instances.boundary_targets(label, inst, _config(width=width))
    expected = label.copy()
    h, w = label.shape
    for y, x in itertools.product(range(h), range(w)):  # brute force: another instance within width
        if inst[y, x] == 0:
            continue
        near = [
            inst[y + dy, x + dx]
            for dy, dx in itertools.product(range(-width, width + 1), repeat=2)
            if abs(dy) + abs(dx) <= width and 0 <= y + dy < h and 0 <= x + dx < w
        ]
        if any(n not in (0, inst[y, x]) for n in near):
            expected[y, x] = 3
    np.testing.assert_array_equal(got, expected)
    assert (got == 3).sum() == 2 * 7 * width * 2  # two touching pairs, 7 rows, width on both sides


@pytest.mark.parametrize("width", [1, 2])
def test_perfect_boundary_prediction_gives_back_the_instances(width):
    label, inst = _touching_rectangles()
    config = _config(width=width)
    semantic, found = instances.to_instances(instances.boundary_targets(label, inst, config), config)
    np.testing.assert_array_equal(semantic, label)
    # same partition of the pixels (ids may differ)
    pairs = set(zip(inst.ravel().tolist(), found.ravel().tolist(), strict=True))
    assert len(pairs) == len(np.unique(inst)) == len(np.unique(found))
    pq = metrics.panoptic_quality(label, inst, semantic, found, 3)
    assert pq["mpq"] == pytest.approx(1.0)


def test_stuff_classes_small_fragments_and_unclaimed_boundary():
    config = _config(num_classes=4, things=(1,), min_size=4)
    pred = np.zeros((10, 10), np.int32)
    pred[0:4, 0:4] = 1  # an instance of thing class 1
    pred[8, 8] = 1  # a 1-pixel fragment: below min_size, dropped to background
    pred[5:10, 0:3] = 2  # stuff class 2: no instance id
    pred[0, 9] = 4  # a boundary pixel far from any seed: background
    semantic, found = instances.to_instances(pred, config)
    assert semantic[8, 8] == 0 and found[8, 8] == 0
    assert (semantic[5:10, 0:3] == 2).all() and (found[5:10, 0:3] == 0).all()
    assert semantic[0, 9] == 0 and found[0, 9] == 0
    assert len(np.unique(found[0:4, 0:4])) == 1 and found[0, 0] > 0


def test_eval_batches_carry_aligned_truth_and_a_perfect_prediction_scores_the_encoding_ceiling(tiny_config):
    tiny_config.instances.enabled = True
    splits = sources.open_splits(tiny_config.data, with_instances=True)
    targets, panoptic = instances.hooks(tiny_config)
    batches = list(pipeline.eval_batches(splits["validation"], tiny_config.data, 5, 0, 1, 4, targets))
    n = len(splits["validation"])
    assert sum(int(b["gt_valid"].any(axis=(1, 2)).sum()) for b in batches) == n  # padding copies flagged
    for b in batches:  # the training label is the truth with the boundary class on top
        changed = (b["label"] != b["gt_label"]) & b["gt_valid"]
        assert (b["label"][changed] == 4).all() and (b["gt_instances"][changed] > 0).all()
    outputs = [{"pred": b["label"], **{k: v for k, v in b.items() if k.startswith("gt_")}} for b in batches]
    scores = panoptic(outputs)
    assert 0.7 < scores["val/pq"] < 1  # tiny 32^2 scenes: some instances are thinner than 2 px
    assert scores["val/pq"] == pytest.approx(scores["val/sq"] * scores["val/rq"], rel=0.1)
    assert 0 < scores["val/ap75"] <= scores["val/ap50"] < 1 and scores["val/ap50_95"] <= scores["val/ap50"]
    # at IoU 0.5 the matching score is RQ written otherwise: TP / (TP + FP + FN) = RQ / (2 - RQ), per class
    res = instances.reduce_outputs(dict(outputs[0]), tiny_config)["panoptic"]
    for out in outputs[1:]:
        res.merge(instances.reduce_outputs(dict(out), tiny_config)["panoptic"])
    res = res.result()
    scored = ~np.isnan(res["rq"])
    np.testing.assert_allclose(res["ap"][scored, 0], res["rq"][scored] / (2 - res["rq"][scored]), rtol=1e-12)
    assert scores["val/ap50"] == pytest.approx(np.mean(res["ap"][scored, 0]))


def test_each_image_s_segment_counts_make_the_split_s_panoptic_quality(tiny_config):
    """The per-image table's PQ columns (`table_rows`): each image's PQ, DSB score and matches at
    each IoU threshold are that image scored alone, padding rows have none, and the split's PQ, SQ,
    RQ and AP, pooled or per image, are `scoring.count_scores` of the images' segment counts (what a
    bootstrap over images or a pooled study row sums)."""
    from segjax import scoring

    tiny_config.instances.enabled = True
    splits = sources.open_splits(tiny_config.data, with_instances=True)
    targets, _ = instances.hooks(tiny_config)
    batches = list(pipeline.eval_batches(splits["validation"], tiny_config.data, 5, 0, 1, 4, targets))
    rng = np.random.default_rng(0)
    outputs = []
    for b in batches:  # the encoded truth with a tenth of its pixels swapped for a random class: imperfect
        noise = rng.random(b["label"].shape) < 0.1
        pred = np.where(noise, rng.integers(0, 5, b["label"].shape), b["label"])
        outputs.append({"pred": pred, **{k: v for k, v in b.items() if k.startswith("gt_")}})
    rows = instances.table_rows([instances.reduce_outputs(dict(o), tiny_config) for o in outputs], tiny_config)
    valid = np.concatenate([o["gt_valid"] for o in outputs])
    assert [r is None for r in rows] == [not v.any() for v in valid]  # padding copies: no row
    names = tiny_config.data.class_names[1:4]
    preds, labels, ids = (np.concatenate([o[k] for o in outputs]) for k in ("pred", "gt_label", "gt_instances"))
    for row, pred, label, inst, v in zip(rows, preds, labels, ids, valid, strict=True):
        if row is None:
            continue
        alone = metrics.PanopticAccumulator(4)
        sem, found = instances.to_instances(pred, tiny_config)
        instances.add_image(alone, tiny_config, label, inst, sem, found, void=~v)
        res = alone.result()
        for c, name in enumerate(names, start=1):
            assert [row[f"pq_{k}/{name}"] for k in ("tp", "fp", "fn")] == [alone.tp[c], alone.fp[c], alone.fn[c]]
            assert row[f"pq/{name}"] == pytest.approx(res["pq"][c], nan_ok=True)
            assert [row[f"{k}/{name}"] for k in scoring.AP_KINDS] == list(alone.images[0][c, 3:])
            assert row[f"ap50_95/{name}"] == pytest.approx(res["ap50_95_class"][c], nan_ok=True)
    kinds = (*scoring.PQ_KINDS, *scoring.AP_KINDS)
    segments = {k: np.array([[r[f"{k}/{n}"] for n in names] for r in rows if r]) for k in kinds}
    n = len(segments["pq_tp"])
    assert segments["ap_tp95"].sum() < segments["ap_tp50"].sum() == segments["pq_tp"].sum()  # matches > 0.5
    ap = {}
    for average in ("dataset", "per_image"):
        tiny_config.eval.average = average
        split = instances.panoptic_scores(outputs, tiny_config)
        ap[average] = split["val/ap50_95"]
        counts = {**scoring.pixel_counts(np.zeros((n, 5, 5))), **segments}  # PQ's classes: those after background
        got = scoring.count_scores(counts, tiny_config.eval, instances.class_names(tiny_config))
        keys = ("val/pq", "val/sq", "val/rq", "val/ap50", "val/ap75", "val/ap50_95")
        for key in (*keys, *(f"val/{s}/{n}" for n in names for s in ("pq", "ap50_95"))):
            assert got[key] == pytest.approx(split[key], rel=1e-6, nan_ok=True), (average, key)
        assert 0.3 < got["val/pq"] < 0.9 and 0.1 < got["val/ap50_95"] < got["val/ap50"] < 1  # neither perfect nor empty
    assert ap["dataset"] != pytest.approx(ap["per_image"], rel=1e-3)  # the two averages are not the same score
    for name in names:
        for kind in kinds:
            assert segments[kind][:, names.index(name)].sum() == pytest.approx(split[f"val/{kind}/{name}"]), kind


def test_in_memory_split_rewrites_each_label_once_and_streams_the_same_batches(tiny_config):
    tiny_config.instances.enabled = True
    targets, _ = instances.hooks(tiny_config)
    calls = []

    def counted(example):
        calls.append(1)
        return targets(example)

    streams, rewrites = {}, {}
    for cache in (False, True):
        tiny_config.data.cache = cache
        split = sources.open_splits(tiny_config.data, with_instances=True)["train"]
        calls.clear()
        ds = pipeline.train_dataset(split, tiny_config.data, 4, seed=0, targets=counted)
        epochs = 2 * len(split) // 4  # two epochs of batches
        streams[cache] = [ds[j] for j in range(epochs)]
        rewrites[cache] = len(calls)
    assert rewrites[False] == 2 * len(split)  # read from disk: rewritten at every read, each epoch
    assert rewrites[True] == len(split)  # in memory: once per example, however many epochs are read
    for a, b in zip(streams[False], streams[True], strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def test_training_reports_panoptic_quality(tiny_config, tmp_path):
    tiny_config.instances.enabled = True
    tiny_config.train.best_metric = "val/pq"  # a key only the panoptic scores give
    result = train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    for key in ("val/pq", "val/sq", "val/rq", "val/pq/tool", "val/iou/instance_boundary"):
        assert 0 <= result[key] <= 1, key
    # the keys checked before training (train.best_metric, a study's --summary_keys) are the reported ones
    assert {k for k in result if k.startswith("val/")} == evaluate.run_score_keys(tiny_config)
    assert result["val/pixels"] == 12 * 32 * 32
    # the per-image table's segment counts give the run's PQ and AP back (intervals, pooled rows)
    from segjax import image_tables, scoring

    _, classes, counts, _ = image_tables.read_per_image_counts(str(tmp_path / "run" / "val_per_image.csv"))
    assert counts["pq_tp"].shape == (12, 3)  # the classes after background: tool, berry, leaf
    got = scoring.count_scores(counts, tiny_config.eval, classes)
    for key in ("val/pq", "val/sq", "val/rq", "val/pq/tool", "val/ap50", "val/ap75", "val/ap50_95", "val/ap50_95/leaf"):
        assert got[key] == pytest.approx(result[key], rel=1e-6, nan_ok=True), key
    with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
        pq = {r["step"]: r["val/pq"] for r in map(json.loads, f) if "val/pq" in r}
    (best,) = os.listdir(tmp_path / "run" / "best")  # a step of the highest PQ (6 steps: often a 0 == 0 tie)
    assert sorted(pq) == [3, 6] and pq[int(best)] == max(pq.values())


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"instances.thing_classes": (0, 2)}, "not classes 1..3"),
        ({"instances.boundary_width": 0}, ">= 1 pixel"),
        ({"data.class_names": ("background", "tool", "instance_boundary", "leaf")}, "name of the instance-boundary"),
        ({"loss.class_weights": (1.0, 1.0, 1.0, 1.0)}, "one per network output"),
        (
            {"train.best_metric": "val/pq/sky"},
            r"'val/pq/sky' is not a validation score.*'val/pq/tool'",  # before training: the keys are known
        ),
    ],
)
def test_instance_config_errors(tiny_config, tmp_path, overrides, message):
    tiny_config.instances.enabled = True
    for key, value in overrides.items():
        section, field = key.split(".")
        tiny_config[section][field] = value
    with pytest.raises(ConfigError, match=message):
        train.train_and_evaluate(tiny_config, str(tmp_path / "run"))


def test_dataset_without_instance_maps_is_an_error(tmp_path, tfds_dir):
    from PIL import Image

    for sub in ("images", "masks"):
        (tmp_path / "data" / sub).mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((32, 32), 60 * i, np.uint8)).save(tmp_path / "data" / "images" / f"{i}.png")
        Image.fromarray(np.eye(32, dtype=np.uint8)).save(tmp_path / "data" / "masks" / f"{i}.png")
    c = load_config("tiny")
    c.data.name, c.data.dir, c.data.tfds_dir, c.data.channels = "folder", str(tmp_path / "data"), tfds_dir, 1
    c.data.num_classes, c.data.class_names, c.data.folder.val_fraction = 2, ("bg", "fg"), 0.5
    c.instances.enabled = True
    with pytest.raises(DataError, match="needs instance maps"):
        train.train_and_evaluate(c, str(tmp_path / "run"))
