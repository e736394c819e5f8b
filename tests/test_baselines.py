"""Classic baselines: each method on images with a known answer, and scoring like the networks."""

from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import filters
from sklearn.metrics import jaccard_score

from segjax import baseline_levels, baselines, evaluate, intervals, matched_tables
from segjax.configuration import default_config
from segjax.data import sources
from segjax.errors import ConfigError, SegjaxError, WorkdirError
from tests.conftest import ROOT, SHARED_DATA, load_config


def method(name, **kw):
    cfg = default_config().baseline
    cfg.method = name
    cfg.update(kw)
    return cfg


def two_discs(touching=True, noise=0.05, seed=0):
    """Bright discs on a dark background; with `touching` they overlap a little (one blob)."""
    yy, xx = np.mgrid[0:64, 0:64]
    a = (yy - 32) ** 2 + (xx - 20) ** 2 < 12**2
    b = (yy - 32) ** 2 + (xx - (42 if touching else 50)) ** 2 < 12**2
    truth = a | b
    img = 0.2 + 0.6 * truth + np.random.default_rng(seed).normal(0, noise, truth.shape)
    return np.clip(img, 0, 1), truth, a, b


@pytest.mark.parametrize("name", ["otsu", "adaptive", "watershed"])
def test_threshold_methods_find_bright_objects(name):
    img, truth, _, _ = two_discs()
    kw = {"block_size": 63, "offset": -0.05} if name == "adaptive" else {}
    mask, _ = baselines.bright_mask(img, method(name, **kw))
    assert jaccard_score(truth.ravel(), mask.ravel()) > 0.85


def test_otsu_matches_skimage_threshold_by_hand():
    img, _, _, _ = two_discs(seed=1)
    mask, _ = baselines.bright_mask(img, method("otsu", smooth_sigma=0.0))
    np.testing.assert_array_equal(mask, img > filters.threshold_otsu(img))
    pred = baselines.predict((img * 255).astype(np.uint8)[..., None], method("otsu", smooth_sigma=0.0, invert=True))
    assert pred.dtype == np.int32 and set(np.unique(pred)) == {0, 1}
    assert (pred == 1).mean() == pytest.approx(1 - (img > filters.threshold_otsu(img)).mean(), abs=0.01)


@pytest.mark.parametrize("name", ["otsu", "watershed"])
def test_auto_polarity_finds_bright_and_dark_minority_objects(name):
    """The same discs bright on dark and dark on bright: auto_polarity finds them in both (the
    dark ones as the method finds them on the negated image); with invert it is an error."""
    img, truth, _, _ = two_discs(touching=False)
    cfg = method(name, auto_polarity=True)
    for image in (img, 1.0 - img):
        pred = baselines.predict((image * 255).astype(np.uint8)[..., None], cfg)
        assert jaccard_score(truth.ravel(), pred.ravel()) > 0.85
    dark = baselines.predict((255 - (img * 255).astype(np.uint8))[..., None], cfg)
    negated = baselines.bright_mask(baselines.gray((img * 255).astype(np.uint8)), method(name))[0]
    np.testing.assert_array_equal(dark, negated.astype(np.int32))
    assert not baselines.dark_objects(img, cfg) and baselines.dark_objects(1.0 - img, cfg)
    with pytest.raises(ConfigError, match=r"leave baseline\.invert=False"):
        baselines.predict(img[..., None], method(name, auto_polarity=True, invert=True))


def test_watershed_splits_touching_objects():
    img, _, a, b = two_discs(touching=True, noise=0.0)
    _, instances = baselines.bright_mask(img, method("watershed", smooth_sigma=0.0, min_distance=8))
    ids = [i for i in np.unique(instances) if i]
    assert len(ids) == 2  # Otsu alone gives one connected blob; the watershed separates the discs
    assert len(np.unique(instances[a & ~b])) == 1 and len(np.unique(instances[b & ~a])) == 1
    assert instances[a & ~b][0] != instances[b & ~a][0]


def test_edges_trace_object_outlines():
    img, truth, _, _ = two_discs(touching=False, noise=0.0)
    band, _ = baselines.bright_mask(img, method("edges", edge_sigma=1.0, edge_width=1))
    outline = truth ^ np.pad(truth[1:-1, 1:-1] & truth[2:, 1:-1] & truth[:-2, 1:-1], 1)
    assert band[outline].mean() > 0.9 and band.mean() < 0.2  # the band follows the outlines only
    filled, _ = baselines.bright_mask(img, method("edges", edge_sigma=1.0, edge_width=0))
    assert jaccard_score(truth.ravel(), filled.ravel()) > 0.9


def test_bad_baseline_config():
    with pytest.raises(ConfigError, match=r"baseline\.method"):
        baselines.bright_mask(np.zeros((8, 8)), method("kmeans"))
    with pytest.raises(ConfigError, match="block_size"):
        baselines.bright_mask(np.zeros((8, 8)), method("adaptive", block_size=10))


def test_a_baseline_it_cannot_run_is_refused_before_data_is_prepared(tmp_path):
    config = load_config("vnet3d")
    config.data.tfds_dir = str(tmp_path / "tfds")
    with pytest.raises(ConfigError, match="classic baselines are 2D"):
        baselines.run(config, str(tmp_path / "run"))
    config = load_config("tiny")
    config.data.tfds_dir, config.baseline.method = str(tmp_path / "tfds"), "kmeans"
    with pytest.raises(ConfigError, match=r"baseline.method='kmeans'"):
        baselines.run(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "tfds") and not os.path.exists(tmp_path / "run")


def test_scores_equal_scikit_learn_on_the_synthetic_split(tiny_config, tmp_path):
    """4-class scenes are scored as foreground vs background; IoU per class == scikit-learn's,
    over the split and (the per-image table) image by image."""
    source = sources.open_splits(tiny_config.data)["validation"]
    results = baselines.evaluate_split(source, tiny_config, str(tmp_path / "per_image.csv"))
    with open(tmp_path / "per_image.csv", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(source)
    for i in range(3):
        y = (source[i]["label"] > 0).ravel().astype(int)
        p = baselines.predict(source[i]["image"], tiny_config.baseline).ravel()
        assert int(table[i]["index"]) == i
        assert float(table[i]["iou/foreground"]) == pytest.approx(jaccard_score(y, p), abs=1e-6)
    truth = np.concatenate([(source[i]["label"] > 0).ravel() for i in range(len(source))]).astype(int)
    preds = np.concatenate(
        [baselines.predict(source[i]["image"], tiny_config.baseline).ravel() for i in range(len(source))]
    )
    ref = jaccard_score(truth, preds, average=None)
    assert results["val/iou/background"] == pytest.approx(ref[0], abs=1e-6)
    assert results["val/iou/foreground"] == pytest.approx(ref[1], abs=1e-6)
    assert results["val/accuracy"] == pytest.approx((truth == preds).mean(), abs=1e-6)
    assert results["val/pixels"] == len(truth)


def test_cli_writes_metrics_and_never_overwrites_a_trained_run(tiny_config, tmp_path):
    workdir = tmp_path / "otsu"

    def cli(*extra):
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "segjax.baselines",
                "--config=configs/tiny.py",
                f"--workdir={workdir}",
                f"--config.data.tfds_dir={tiny_config.data.tfds_dir}",
                *extra,
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )

    done = cli("--config.baseline.method=watershed")
    assert done.returncode == 0, done.stderr[-2000:]
    with open(workdir / "metrics.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["baseline"] == "watershed" and 0.0 <= saved["val/miou"] <= 1.0
    refused = cli("--config.baseline.method=otsu")  # another baseline: refused, nothing touched
    assert refused.returncode == 2 and "different config (differs in: baseline.method)" in refused.stderr
    assert "--allow_config_changes" not in refused.stderr  # a baseline cannot resume
    with open(workdir / "metrics.json", encoding="utf-8") as f:
        assert json.load(f) == saved
    (workdir / "metrics.json").write_text(json.dumps({"step": 6, "val/miou": 0.9}))  # a network's run
    refused = cli()
    assert refused.returncode == 2 and "holds a trained run" in refused.stderr


def test_a_baseline_of_another_config_moves_the_earlier_one_aside_only_when_told(tiny_config, tmp_path):
    workdir = str(tmp_path / "base")
    tiny_config.baseline.method = "otsu"
    tiny_config.eval.interval_resamples = 300
    first = baselines.run(tiny_config, workdir)
    # its intervals over the images, as a trained run's: printed and kept (foreground vs background)
    names, classes, counts, cfg = matched_tables.load([workdir], intervals.DEFAULT_TABLE)
    with open(os.path.join(workdir, "intervals.json"), encoding="utf-8") as f:
        kept = json.load(f)["intervals"]
    assert classes == ["background", "foreground"] and list(kept) == ["val/miou", "val/accuracy", "val/mbiou"]
    assert len(names) == tiny_config.data.synthetic.num_val
    assert kept == intervals.bootstrap(counts, cfg, classes, list(kept), resamples=300)
    assert kept["val/miou"]["estimate"] == pytest.approx(first["val/miou"], abs=1e-6)
    assert baselines.run(tiny_config, workdir)["val/miou"] == first["val/miou"]  # the same config: rerun
    tiny_config.baseline.method = "watershed"
    with pytest.raises(WorkdirError, match=r"differs in: baseline\.method"):
        baselines.run(tiny_config, workdir)
    second = baselines.run(tiny_config, workdir, overwrite=True)
    (aside,) = [p for p in os.listdir(tmp_path) if p.startswith("base.replaced-")]
    with open(os.path.join(tmp_path, aside, "metrics.json"), encoding="utf-8") as f:
        assert json.load(f)["baseline"] == "otsu"
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["baseline"] == "watershed" == second["baseline"]
    assert saved["metrics_convention"] == evaluate.convention(tiny_config)  # as a trained run states it
    os.makedirs(os.path.join(workdir, "checkpoints"))  # a network training there (no metrics.json yet)
    os.remove(os.path.join(workdir, "metrics.json"))
    with pytest.raises(SegjaxError, match="holds a trained run"):
        baselines.run(tiny_config, workdir)
    assert not os.path.exists(os.path.join(workdir, "metrics.json"))


@pytest.mark.slow  # the real ISBI images, prepared and scored (~10 s warm); CI runs it
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "isbi2012_membrane")), reason="no ../shared/data")
def test_isbi_membranes_otsu_baseline(tfds_dir):
    config = load_config("isbi")
    config.data.tfds_dir = tfds_dir
    config.baseline.invert = True  # membranes are dark
    results = baselines.evaluate_split(sources.open_splits(config.data)["validation"], config)
    assert 0.3 < results["val/dice/membrane"] < 0.9 and results["val/images"] == 5


def test_multiotsu_gives_each_intensity_level_its_class():
    """Three flat vertical bands, dark (0.1) | mid (0.46) | bright (0.9). (scikit-image puts each
    threshold at the centre of a histogram bin, so a value in the upper half of the bin holding
    the lower class's brightest pixels goes up a level; 0.46 lies in the lower half of its bin.)"""
    band = np.repeat(np.arange(3), 12)[None, :].repeat(24, 0)
    img = np.array([0.1, 0.46, 0.9])[band]
    cfg = method("multiotsu", smooth_sigma=0.0, level_classes=(2, 0, 1))
    pred = baselines.predict(img[..., None], cfg)
    np.testing.assert_array_equal(pred, np.array([2, 0, 1])[band])  # dark -> 2, mid -> 0, bright -> 1
    np.testing.assert_array_equal(baselines.predict(img[..., None], cfg, level_classes=(0, 0, 1)), band == 2)
    flat = baselines.predict(np.full((8, 8, 1), 0.3), cfg)  # no thresholds exist: all the darkest level
    np.testing.assert_array_equal(flat, np.full((8, 8), 2))
    with pytest.raises(ConfigError, match="level_classes is empty"):
        baselines.predict(img[..., None], method("multiotsu"))
    with pytest.raises(ConfigError, match="gives classes, not a mask"):
        baselines.bright_mask(img, cfg)


def test_fitted_level_classes_are_the_best_training_miou_of_every_assignment():
    """By hand: every level holds more background than anything else (a majority vote would call
    all of it background, mIoU 500/590/3 = 0.282; dark -> 0 too: 0.315, bright -> 0 too: 0.377);
    the best assignment is dark -> 1, mid -> 0, bright -> 2."""
    counts = np.array([[100, 60, 0], [300, 0, 0], [100, 0, 30]])
    classes, miou = baseline_levels.best_assignment(counts)
    assert classes == (1, 0, 2) and miou == pytest.approx((300 / 500 + 60 / 160 + 30 / 130) / 3)

    def reference(counts):  # every assignment in turn, IoU per class by its definition
        best, best_miou = None, -1.0
        for way in itertools.product(range(counts.shape[1]), repeat=counts.shape[0]):
            ious = []
            for c in range(counts.shape[1]):
                if counts[:, c].sum() == 0:
                    continue  # a class the split does not hold is not averaged
                tp = sum(counts[lv, c] for lv in range(len(way)) if way[lv] == c)
                pred = sum(counts[lv].sum() for lv in range(len(way)) if way[lv] == c)
                ious.append(tp / (pred + counts[:, c].sum() - tp))
            if np.mean(ious) > best_miou + 1e-12:
                best, best_miou = way, float(np.mean(ious))
        return best, best_miou

    rng = np.random.default_rng(0)
    for shape in ((3, 3), (4, 4), (2, 5), (4, 3)):
        counts = rng.integers(0, 50, shape) * (rng.random(shape) < 0.7)
        counts[:, -1] = 0 if shape == (2, 5) else counts[:, -1]  # a class absent from the split
        classes, miou = baseline_levels.best_assignment(counts)
        ref_classes, ref_miou = reference(counts)
        assert classes == ref_classes and miou == pytest.approx(ref_miou)


def test_a_multiotsu_baseline_fits_its_classes_on_training_images_and_scores_every_class(tmp_path, tfds_dir):
    """A 3-class folder whose classes differ in brightness (1 dark, 0 mid, 2 bright): the fitted
    levels are (1, 0, 2), scored per class (not as foreground vs background) as scikit-learn scores
    the levels scikit-image gives; given classes are used as they are; a rerun is allowed."""
    from tests.test_folder import folder_config

    rng = np.random.default_rng(0)
    for d in ("images", "masks"):
        os.makedirs(tmp_path / "data" / d)
    for i in range(6):
        mask = rng.integers(0, 3, (4, 4)).repeat(8, 0).repeat(8, 1).astype(np.uint8)  # 8x8 blocks
        img = np.array([0.5, 0.1, 0.9])[mask] + rng.normal(0, 0.02, mask.shape)
        Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(tmp_path / "data" / "images" / f"{i}.png")
        Image.fromarray(mask).save(tmp_path / "data" / "masks" / f"{i}.png")
    (tmp_path / "data" / "split.csv").write_text(
        "id,split\n" + "".join(f"{i},{'val' if i > 3 else 'train'}\n" for i in range(6))
    )
    config = load_config("tiny")
    config.data = folder_config(tmp_path / "data", tfds_dir, channels=1, split_file="split.csv")
    config.baseline.method, config.baseline.smooth_sigma = "multiotsu", 0.0
    results = baselines.run(config, str(tmp_path / "fitted"))
    with open(tmp_path / "fitted" / "metrics.json", encoding="utf-8") as f:
        saved = json.load(f)
    assert saved["baseline_level_classes"] == [1, 0, 2] and saved["baseline_fit_train_miou"] > 0.95
    val = sources.open_splits(config.data)["validation"]
    truth = np.concatenate([val[i]["label"].ravel() for i in range(len(val))])

    def scikit(classes):  # each validation image's levels by scikit-image, then the classes given
        levels = [val[i]["image"][..., 0] / 255 for i in range(len(val))]
        levels = [np.digitize(x, filters.threshold_multiotsu(x, classes=3)) for x in levels]
        return jaccard_score(truth, np.concatenate([np.array(classes)[x].ravel() for x in levels]), average=None)

    assert [results[f"val/iou/c{k}"] for k in range(3)] == pytest.approx(scikit((1, 0, 2)), abs=1e-6)
    assert results["val/miou"] > 0.95 and results["val/pixels"] == 2 * 32 * 32
    assert baselines.run(config, str(tmp_path / "fitted"))["val/miou"] == results["val/miou"]  # the same config
    config.baseline.level_classes = (0, 1, 2)  # given: used as they are (dark pixels called class 0, ...)
    given = baselines.run(config, str(tmp_path / "given"))
    assert [given[f"val/iou/c{k}"] for k in range(3)] == pytest.approx(scikit((0, 1, 2)), abs=1e-6)
    assert given["val/iou/c0"] < 0.05 and "baseline_level_classes" not in given


def test_multiotsu_scores_equal_scikit_learn_on_the_synthetic_split(tiny_config):
    """4-class scenes, 4 levels: the fitted classes are the best of all 256 assignments on counts
    made here from scikit-image's thresholds, and the per-class IoU are scikit-learn's."""
    tiny_config.baseline.method = "multiotsu"
    splits = sources.open_splits(tiny_config.data)

    def levels(ex):
        smooth = filters.gaussian(baselines.gray(ex["image"]), sigma=tiny_config.baseline.smooth_sigma)
        return np.digitize(smooth, filters.threshold_multiotsu(smooth, classes=4))

    counts = np.zeros((4, 4), np.int64)
    for i in range(len(splits["train"])):
        ex = splits["train"][i]
        np.add.at(counts, (levels(ex).ravel(), ex["label"].ravel()), 1)
    classes, _ = baselines.fit_level_classes(splits["train"], tiny_config)
    assert classes == baseline_levels.best_assignment(counts)[0]
    results = baselines.evaluate_split(splits["validation"], tiny_config, level_classes=classes)
    val = splits["validation"]
    truth = np.concatenate([val[i]["label"].ravel() for i in range(len(val))])
    preds = np.concatenate([np.array(classes)[levels(val[i])].ravel() for i in range(len(val))])
    ref = jaccard_score(truth, preds, average=None, labels=range(4))
    names = tiny_config.data.class_names
    assert [results[f"val/iou/{n}"] for n in names] == pytest.approx(ref, abs=1e-6)
    assert results["val/accuracy"] == pytest.approx((truth == preds).mean(), abs=1e-6)


def test_multiotsu_settings_it_cannot_use_are_refused(tiny_config):
    def refused(match, **kw):
        config = copy.deepcopy(tiny_config)
        config.baseline.method = "multiotsu"
        config.baseline.update(kw)
        with pytest.raises(ConfigError, match=match):
            baselines.check_config(config)

    refused(r"with 5 levels .* takes 2\.\.4 levels", levels=5)
    refused(r"leave baseline\.invert", invert=True)
    refused(r"leave baseline\.invert and baseline\.auto_polarity", auto_polarity=True)
    refused(r"level_classes=\(0, 1\) must give one class id in 0\.\.3 to each of the 4 levels", level_classes=(0, 1))
    refused(r"level_classes=\(0, 1, 4\) must give", levels=3, level_classes=(0, 1, 4))
    config = copy.deepcopy(tiny_config)
    config.data.num_classes, config.data.class_names = 20, tuple(f"c{i}" for i in range(20))
    config.baseline.method, config.baseline.levels = "multiotsu", 4
    with pytest.raises(ConfigError, match=r"searches 20\^4 assignments"):
        baselines.check_config(config)
    config.baseline.level_classes = (0, 3, 7, 19)  # given: nothing to search
    baselines.check_config(config)
