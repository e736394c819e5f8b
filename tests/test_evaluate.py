"""Evaluation over a split: padded batches, counts summed before scoring, every average."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn import metrics as skm

from segjax import evaluate, image_tables, metrics, parallel, scoring
from segjax.errors import ConfigError
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
    out["boundary_inter"], out["boundary_union"] = metrics.boundary_counts(
        batch["label"], preds, 3, 1, batch["valid"], per_image=True
    )
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
    # each class's pixel counts over the split (the padding's left out): scikit-learn's one-vs-rest matrices
    for c, ((tn, fp), (fn, tp)) in enumerate(skm.multilabel_confusion_matrix(labels.ravel(), preds.ravel())):
        counts = [results[f"val/{k}/{NAMES[c]}"] for k in ("tp", "fp", "fn", "tn")]
        assert counts == [tp, fp, fn, tn] and all(isinstance(n, int) for n in counts)
    ref_b = metrics.boundary_iou(labels, preds, 3, dilation=1)  # the bands summed, whatever the average
    np.testing.assert_allclose(results["val/mbiou"], float(ref_b["mbiou"]), rtol=1e-6)
    inter, union = metrics.boundary_counts(labels, preds, 3, 1)
    assert [results[f"val/binter/{n}"] for n in NAMES] == np.asarray(inter).tolist()
    assert [results[f"val/bunion/{n}"] for n in NAMES] == np.asarray(union).tolist()


@pytest.mark.parametrize("average", ["dataset", "per_image", "micro"])
def test_scores_of_counts_alone_are_the_evaluation_s(average):
    """`count_scores` of each image's tp/fp/fn/tn (what the per-image tables hold; for 'dataset'
    and 'micro' their sums, what metrics.json holds) gives every score the evaluation of the same
    images' confusion matrices gives, class absent from some images included."""
    names = ("background", "tool", "berry")
    rng = np.random.default_rng(5)
    cms = rng.integers(0, 30, (6, 3, 3))
    cms[:2, 2, :] = cms[:2, :, 2] = 0  # berry absent from the first two images
    eval_cfg = load_config("default").eval
    eval_cfg.average, eval_cfg.boundary_dilation = average, 0
    want = evaluate.scores([{"confusion": cms, "loss": 0.0}], eval_cfg, names)
    got = scoring.count_scores(scoring.pixel_counts(cms), eval_cfg, names)
    made_of_counts = {k for k in want if k.split("/")[1] not in ("loss", "pixels", "images", "tp", "fp", "fn", "tn")}
    assert set(got) == made_of_counts
    for key in got:
        assert got[key] == pytest.approx(want[key], rel=1e-6, nan_ok=True), key
    if average == "per_image":
        with pytest.raises(ConfigError, match="one row of counts per image"):
            scoring.count_scores(scoring.pixel_counts(cms.sum(0)), eval_cfg, names)
    # with each image's boundary bands: boundary IoU of the bands summed over the images, whatever
    # the average (berry's band empty in every image: NaN, left out of the mean)
    inter = rng.integers(0, 20, (6, 3))
    union = inter + rng.integers(1, 20, (6, 3))
    inter[:, 2] = union[:, 2] = 0
    counts = {**scoring.pixel_counts(cms), "binter": inter, "bunion": union}
    got = scoring.count_scores(counts, eval_cfg, names)
    biou = inter[:, :2].sum(0) / union[:, :2].sum(0)
    np.testing.assert_allclose([got["val/biou/background"], got["val/biou/tool"]], biou, rtol=1e-6)
    assert np.isnan(got["val/biou/berry"]) and got["val/mbiou"] == pytest.approx(biou.mean(), rel=1e-6)
    assert got["val/miou"] == pytest.approx(want["val/miou"], rel=1e-6)  # the bands change no other score


@pytest.mark.parametrize("batch_size", [1, 3, 4, 7])
def test_val_loss_is_the_pixel_mean_of_cross_entropy_at_any_batch_size(batch_size):
    """With a per-pixel loss, `val/loss` is its mean over every valid pixel of the split, whatever
    the eval batch size: a padded last batch weighs what it holds (an unweighted mean of the
    batches' losses gave 7 images at batch 3 a last batch of one image worth a third)."""
    from segjax import losses
    from segjax.data import pipeline

    rng = np.random.default_rng(2)
    labels = rng.integers(0, 3, (7, 6, 6))
    source = [{"image": np.zeros((6, 6, 1), np.uint8), "label": labels[i]} for i in range(7)]
    cfg = load_config("default")
    cfg.loss.terms = "ce"

    def logits_of(label):  # confident, and wrong where noisy_prediction is
        return 3.0 * jax.nn.one_hot(noisy_prediction(label), 3)

    def eval_fn(state, batch):
        out = fake_eval_fn(state, batch)
        out["loss"] = losses.total_loss(cfg.loss, logits_of(batch["label"]), batch["label"], batch["valid"])[0]
        return out

    batches = pipeline.eval_batches(source, cfg.data, batch_size=batch_size)
    results = evaluate.evaluate(eval_fn, None, batches, parallel.make_mesh(), cfg.eval, NAMES)
    logits = np.asarray(logits_of(jnp.asarray(labels)), np.float64)
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    reference = -np.take_along_axis(log_softmax, labels[..., None], -1).mean()
    np.testing.assert_allclose(results["val/loss"], reference, rtol=1e-5)  # float32 sums


def test_per_image_rows_match_sklearn_per_image():
    """Each image's Dice/IoU/accuracy as scikit-learn scores that image alone; a class absent from
    an image's truth and prediction is NaN (eval.empty='nan'); rows come back in split order with
    the stored names."""
    from segjax.data import pipeline

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (5, 6, 6))
    labels[2] = 0  # image 2: class 2 neither in the truth nor (errors go 0 -> 1) in the prediction
    image = np.zeros((6, 6, 1), np.uint8)
    source = [{"image": image, "label": labels[i], "name": f"img{i}"} for i in range(5)]
    cfg = load_config("default")
    batches = list(pipeline.eval_batches(source, cfg.data, batch_size=2, with_names=True))  # 1 padding copy
    outputs = [{**jax.device_get(fake_eval_fn(None, b)), "gt_name": b["gt_name"]} for b in batches]
    row_names = np.concatenate([o["gt_name"] for o in outputs])
    rows = image_tables.per_image_rows(outputs, pipeline.eval_order(5, 2), NAMES, "nan", row_names)
    preds = np.asarray(noisy_prediction(jnp.asarray(labels)))
    assert [r["index"] for r in rows] == list(range(5)) and [r["name"] for r in rows] == [f"img{i}" for i in range(5)]
    for i, row in enumerate(rows):
        y, p = labels[i].ravel(), preds[i].ravel()
        assert row["pixels"] == 36
        np.testing.assert_allclose(row["accuracy"], skm.accuracy_score(y, p), rtol=1e-6)
        present = [c for c in range(3) if (y == c).any() or (p == c).any()]
        dice = skm.f1_score(y, p, labels=present, average=None)
        iou = skm.jaccard_score(y, p, labels=present, average=None)
        for c, name in enumerate(NAMES):
            if c in present:
                np.testing.assert_allclose(row[f"dice/{name}"], dice[present.index(c)], rtol=1e-6)
                np.testing.assert_allclose(row[f"iou/{name}"], iou[present.index(c)], rtol=1e-6)
            else:
                assert np.isnan(row[f"dice/{name}"]) and np.isnan(row[f"iou/{name}"])
        matrices = skm.multilabel_confusion_matrix(y, p, labels=[0, 1, 2])  # per class [[tn, fp], [fn, tp]]
        for c, name in enumerate(NAMES):
            (tn, fp), (fn, tp) = matrices[c]
            assert [row[f"{k}/{name}"] for k in ("tp", "fp", "fn", "tn")] == [tp, fp, fn, tn]
    assert np.isnan(rows[2]["dice/b"]) and not np.isnan(rows[2]["dice/a"])
    # each image's boundary IoU and its bands, as Boundary IoU scores that image alone
    for i, row in enumerate(rows):
        inter, union = (np.asarray(v) for v in metrics.boundary_counts(labels[i : i + 1], preds[i : i + 1], 3, 1))
        alone = np.asarray(metrics.boundary_iou(labels[i : i + 1], preds[i : i + 1], 3, dilation=1)["biou"])
        for c, name in enumerate(NAMES):
            assert (row[f"binter/{name}"], row[f"bunion/{name}"]) == (inter[c], union[c])
            np.testing.assert_allclose(row[f"biou/{name}"], alone[c], rtol=1e-6)
    assert np.isnan(rows[2]["biou/b"]) and rows[2]["bunion/b"] == 0


def test_an_image_without_valid_pixels_first_in_the_split_gets_empty_cells(tmp_path):
    """An image whose every pixel is ignored has no surface distances and no segments, and it may
    come first in the split: the table still holds the other images' columns (it failed: the
    header was the first row's keys, and the CSV writer refused the next row's distances), its
    own cells empty, and it reads back as undefined distances and no segments."""
    confusion = np.zeros((3, 2, 2), np.int64)
    confusion[1], confusion[2] = [[5, 1], [2, 8]], [[9, 0], [0, 7]]
    outputs = [{"confusion": confusion, "loss": 0.0}]
    extra = [None] + [
        {"hd95/fg": hd, "nsd/fg": 0.8, "pq_tp/fg": tp, "pq_fp/fg": 0, "pq_fn/fg": 1, "pq_iou/fg": 0.7 * tp}
        for hd, tp in ((1.5, 1), (2.5, 2))
    ]
    path = str(tmp_path / "val_per_image.csv")
    image_tables.write_per_image(path, outputs, [0, 1, 2], ("bg", "fg"), "nan", ["void", "b", "c"], extra)
    names, classes, counts, _ = image_tables.read_per_image_counts(path)
    assert names == ["void", "b", "c"] and classes == ["bg", "fg"]
    assert np.isnan(counts["hd95"][0, 0]) and counts["hd95"][1:, 0].tolist() == [1.5, 2.5]
    assert counts["pq_tp"][:, 0].tolist() == [0, 1, 2] and counts["tp"][0].tolist() == [0, 0]


def test_eval_order_names_the_rows_gathered_from_every_host():
    """With 3 processes each host evaluates its own slice; the gathered outputs (hosts' batches in
    process order) are the split indices `eval_order` lists, padding copies as None."""
    from segjax.data import pipeline

    blank = {"image": np.zeros((4, 4, 1), np.uint8), "label": np.zeros((4, 4), np.int64)}
    source = [{**blank, "name": f"n{i}"} for i in range(8)]  # names read from the examples themselves
    cfg = load_config("default")
    hosts = [list(pipeline.eval_batches(source, cfg.data, 2, p, 3, with_names=True)) for p in range(3)]
    gathered = [name for step in zip(*hosts, strict=True) for batch in step for name in batch["gt_name"]]
    order = pipeline.eval_order(8, 2, 3)
    assert gathered == ["" if i is None else f"n{i}" for i in order]
    assert sorted(i for i in order if i is not None) == list(range(8))


def test_hosts_with_images_of_mixed_sizes_pad_their_batches_alike():
    """Two hosts evaluating images of different sizes: alone, their batches differ in shape (no
    global batch can hold both); with `agree` returning the largest over the hosts (what
    `parallel.largest_over_hosts` gathers), each batch has one shape on both hosts, every image
    sits unchanged in its top-left corner and every real pixel is valid exactly once."""
    from segjax.data import pipeline

    rng = np.random.default_rng(2)
    sizes = [(8, 8), (12, 4), (4, 16), (8, 12), (6, 6)]
    source = [{"image": rng.integers(0, 255, (*s, 1), np.uint8), "label": rng.integers(0, 3, s)} for s in sizes]
    cfg = load_config("default")
    alone = [[b["image"].shape[1:3] for b in pipeline.eval_batches(source, cfg.data, 1, p, 2, 4)] for p in range(2)]
    assert alone[0] != alone[1]
    largest = [tuple(np.max(shapes, axis=0)) for shapes in zip(*alone, strict=True)]

    def agree_for(host):
        batch = iter(range(len(largest)))

        def agree(shape):
            j = next(batch)
            assert shape == alone[host][j]  # called with this host's own padded size, batch by batch
            return largest[j]

        return agree

    hosts = [list(pipeline.eval_batches(source, cfg.data, 1, p, 2, 4, agree=agree_for(p))) for p in range(2)]
    assert [b["image"].shape for b in hosts[0]] == [b["image"].shape for b in hosts[1]]
    valid_pixels = 0
    for p, batches in enumerate(hosts):
        for j, batch in enumerate(batches):
            valid_pixels += int(batch["valid"].sum())
            if batch["valid"][0].any():  # not a padding copy
                ex = source[p + 2 * j]
                h, w = ex["label"].shape
                np.testing.assert_array_equal(batch["label"][0, :h, :w], ex["label"])
                assert batch["valid"][0, :h, :w].all() and batch["valid"][0].sum() == h * w
    assert valid_pixels == sum(h * w for h, w in sizes)


def test_seed_replicas_share_the_batchs_host_only_keys():
    """num_seeds=2: each replica is scored (host-side scores too: `reduce_batch`, `extra_scores`)
    from its own slice of the step's outputs, while host-only keys (here a NIfTI batch's
    `gt_spacing`, one row at eval batch 1) belong to the batch and are not sliced by replica
    (which failed: a [1, 3] array has no row 1)."""
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, (3, 6, 6))
    source = [{"image": np.zeros((6, 6, 1), np.uint8), "label": labels[i], "spacing": np.ones(3)} for i in range(3)]
    cfg = load_config("default")
    from segjax.data import pipeline

    def two_replicas(state, batch):  # replica 0: the noisy model; replica 1: perfect
        noisy = fake_eval_fn(state, batch)
        perfect = {"confusion": metrics.per_image_confusion(batch["label"], batch["label"], 3, batch["valid"])}
        perfect["boundary_inter"], perfect["boundary_union"] = noisy["boundary_inter"], noisy["boundary_union"]
        return {k: jnp.stack([noisy[k], perfect.get(k, noisy[k])]) for k in noisy}

    batches = list(pipeline.eval_batches(source, cfg.data, batch_size=1))
    assert batches[0]["gt_spacing"].shape == (1, 3)
    put = lambda b: b  # noqa: E731

    def reduce(out):  # per batch, per replica: the batch's wrong pixels (as a host-side score would)
        cms = np.asarray(out["confusion"])
        return {**out, "wrong": int(cms.sum() - np.trace(cms, axis1=1, axis2=2).sum())}

    def extra(outputs):
        return {"val/wrong": sum(o["wrong"] for o in outputs)}

    noisy, perfect = evaluate.evaluate(
        two_replicas,
        None,
        batches,
        None,
        cfg.eval,
        NAMES,
        num_seeds=2,
        put=put,
        extra_scores=extra,
        reduce_batch=reduce,
    )
    preds = np.asarray(noisy_prediction(jnp.asarray(labels)))
    np.testing.assert_allclose(noisy["val/accuracy"], skm.accuracy_score(labels.ravel(), preds.ravel()), rtol=1e-6)
    assert perfect["val/accuracy"] == 1.0 and perfect["val/images"] == noisy["val/images"] == 3
    assert noisy["val/wrong"] == int((preds != labels).sum()) > 0 and perfect["val/wrong"] == 0


def test_per_image_scores_by_group_join_on_names(tmp_path):
    """report.by_group: a run's per-image table joined with a metadata CSV, means per group over
    the images where a score is defined (hand computed); an unknown image is an error."""
    from segjax import report

    per_image = tmp_path / "val_per_image.csv"
    per_image.write_text("index,name,dice/fg,hd95/fg\n0,a,0.5,2.0\n1,b,0.7,inf\n2,c,0.9,4.0\n3,d,0.2,1.0\n4,e,,\n")
    groups = tmp_path / "index.csv"
    groups.write_text("id,modality\nd,he\nc,fluo\nb,fluo\na,fluo\nz,he\ne,he\n")
    got = report.by_group(str(per_image), str(groups), "modality", ("dice/fg", "hd95/fg"))
    assert [g["group"] for g in got] == ["fluo", "he"] and [g["n"] for g in got] == [3, 2]
    assert got[0]["dice/fg"] == pytest.approx((0.5 + 0.7 + 0.9) / 3) and got[0]["hd95/fg"] == pytest.approx(3.0)
    assert got[1]["dice/fg"] == pytest.approx(0.2) and got[1]["hd95/fg"] == pytest.approx(1.0)
    with pytest.raises(KeyError, match=r"has no columns \['nsd/fg'\]"):
        report.by_group(str(per_image), str(groups), "modality", ("nsd/fg",))
    with pytest.raises(KeyError, match="no 'id' or 'site'"):
        report.by_group(str(per_image), str(groups), "site", ("dice/fg",))
    groups.write_text("id,modality\na,fluo\n")
    with pytest.raises(KeyError, match="image 'b' has no 'id' row"):
        report.by_group(str(per_image), str(groups), "modality", ("dice/fg",))


def test_the_convention_line_names_the_grid_a_resized_run_is_scored_on():
    """Scores of a run with data.resize are counted on the resized images, not the files' own
    sizes (e.g. DSB nuclei at 256x256); the line stored with every result says so."""
    config = load_config("nuclei")
    rules = metrics.convention(config.eval.average, config.eval.empty, config.eval.include_background)
    assert (
        evaluate.convention(config) == f"{rules}, on images resized to 256x256 (data.resize), not the files' own sizes"
    )
    config.data.resize = 0
    assert evaluate.convention(config) == rules


def test_replicas_need_one_per_image_table_each():
    """With K replicas each writes its own table (`seed_<s>/...`): K paths, or none; a single path
    for several replicas would have had every replica overwrite the one before."""
    config = load_config("tiny")
    with pytest.raises(ValueError, match="1 per-image tables for 2 replicas"):
        evaluate.evaluate_split(config, None, None, [], None, per_image_csv="val_per_image.csv", num_seeds=2)
    with pytest.raises(ValueError, match="3 per-image tables for 2 replicas"):
        evaluate.evaluate_split(config, None, None, [], None, per_image_csv=["a", "b", "c"], num_seeds=2)
