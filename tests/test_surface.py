"""Normalised surface Dice and HD95: against hand-computed cases and a brute-force reference, and
in evaluation (`eval.surface_metrics`): per image, over a split, for pmap outputs and baselines."""

from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest
from PIL import Image

from segjax import (
    baselines,
    evaluate,
    image_tables,
    metrics,
    parallel,
    predict,
    preflight,
    report,
    rescore,
    scoring,
    surface,
    train,
)
from segjax.data import sources
from segjax.errors import ConfigError, DataError
from tests.conftest import load_config
from tests.test_predict import write_images


def brute_surface(mask: np.ndarray) -> np.ndarray:
    """Mask pixels with a face neighbour (4 in 2D, 6 in 3D) outside the mask or the image."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in mask.shape)
    edge = np.zeros(mask.shape, bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            edge |= ~np.roll(padded, step, axis=axis)[inner]
    return mask & edge


def brute_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from each surface pixel of a to the nearest surface pixel of b (all pairs)."""
    pa, pb = np.argwhere(brute_surface(a)), np.argwhere(brute_surface(b))
    return np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1)).min(axis=1)


def test_shifted_square_by_hand():
    """Two 4x4 squares one pixel apart: 6 of each 12-pixel ring lie on the other ring (NSD 0.5 at
    tolerance 0) and every ring pixel is within 1 of the other ring (NSD 1, HD95 1)."""
    g = np.zeros((10, 10), bool)
    g[2:6, 2:6] = True
    p = np.roll(g, 1, axis=1)
    assert metrics.surface_dice(g, p, 0.0) == 0.5
    assert metrics.surface_dice(g, p, 1.0) == 1.0
    assert metrics.hausdorff_distance(g, p) == 1.0
    assert metrics.surface_dice(g, g, 0.0) == 1.0
    assert np.isnan(metrics.surface_dice(g & False, g & False))
    assert metrics.surface_dice(g, g & False) == 0.0 and metrics.hausdorff_distance(g & False, g) == np.inf


@pytest.mark.parametrize("shape", [(24, 20), (10, 12, 9)])
@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.5])
def test_surface_dice_and_hd95_match_brute_force(shape, tolerance):
    rng = np.random.default_rng(len(shape) * 10 + int(tolerance * 2))
    from scipy import ndimage

    a = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    b = ndimage.gaussian_filter(rng.random(shape), 2) > 0.5
    assert a.any() and b.any() and (a != b).any()
    to_b, to_a = brute_distances(a, b), brute_distances(b, a)
    want = ((to_b <= tolerance).sum() + (to_a <= tolerance).sum()) / (len(to_b) + len(to_a))
    np.testing.assert_allclose(metrics.surface_dice(a, b, tolerance), want, rtol=1e-12)
    hd95 = max(np.percentile(to_b, 95), np.percentile(to_a, 95))
    np.testing.assert_allclose(metrics.hausdorff_distance(a, b), hd95, rtol=1e-12)


def test_per_image_crops_padding_ignores_invalid_pixels_and_skips_padding_copies():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 3, (3, 12, 12))
    pred = np.where(rng.random((3, 12, 12)) < 0.2, rng.integers(0, 3, (3, 12, 12)), label)
    valid = np.ones((3, 12, 12), np.float32)
    valid[1, 8:, :] = 0  # image 1: 8x12, padded below
    valid[0, 3:5, 3:5] = 0  # an ignored patch inside image 0
    valid[2] = 0  # a padding copy
    pred[2, 0, 0] = 2  # (class 2 absent from image 2's truth: it must not count)
    outputs = [{"pred": pred[s], "label": label[s], "valid": valid[s]} for s in (slice(0, 2), slice(2, 3))]
    names = ("bg", "a", "b")
    rows = surface.per_image(outputs, names, 1.0)
    assert rows[2] is None and len(rows) == 3
    keep0 = valid[0] > 0
    for c in (1, 2):
        t0, p0 = np.where(keep0, label[0], 0) == c, np.where(keep0, pred[0], 0) == c
        assert rows[0][f"nsd/{names[c]}"] == metrics.surface_dice(t0, p0, 1.0)
        assert rows[1][f"hd95/{names[c]}"] == metrics.hausdorff_distance(label[1, :8] == c, pred[1, :8] == c)
    # the split: NSD over images with the class in truth or prediction, HD95 over images with it in both
    rows = [{"nsd/a": 0.5, "hd95/a": 2.0}, {"nsd/a": 0.0, "hd95/a": np.inf}, {"nsd/a": np.nan, "hd95/a": np.nan}, None]
    rows = [dict(r, **{"nsd/b": 1.0, "hd95/b": 0.0}) if r else None for r in rows]
    got = surface.split_scores(rows, names)
    assert got["val/nsd/a"] == 0.25 and got["val/hd95/a"] == 2.0
    assert got["val/nsd/b"] == 1.0 and got["val/mnsd"] == 0.625 and got["val/mhd95"] == 1.0


def test_physical_units_measure_each_rows_anisotropic_voxels():
    """`physical`: row k's distances use its own `gt_spacing` (brute force on coordinates scaled by
    it); a row with unit spacing scores what pixel units score; no spacing is a clear error."""
    rng = np.random.default_rng(3)
    label = np.zeros((2, 6, 7, 8), int)
    label[:, 1:5, 2:6, 1:7] = 1
    pred = np.where(rng.random(label.shape) < 0.15, 1 - label, label)
    spacing = np.array([[3.0, 0.5, 0.8], [1.0, 1.0, 1.0]], np.float32)
    out = {"pred": pred, "label": label, "valid": np.ones(label.shape), "gt_spacing": spacing}
    rows = surface.per_image([out], ("bg", "a"), 1.0, surface.STORED)
    a, b = label[0] == 1, pred[0] == 1
    pa, pb = np.argwhere(brute_surface(a)) * spacing[0], np.argwhere(brute_surface(b)) * spacing[0]
    d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
    to_b, to_a = d.min(axis=1), d.min(axis=0)
    np.testing.assert_allclose(rows[0]["hd95/a"], max(np.percentile(to_b, 95), np.percentile(to_a, 95)), rtol=1e-6)
    want = ((to_b <= 1.0).sum() + (to_a <= 1.0).sum()) / (len(to_b) + len(to_a))
    np.testing.assert_allclose(rows[0]["nsd/a"], want, rtol=1e-6)
    assert rows[0]["hd95/a"] != surface.per_image([out], ("bg", "a"), 1.0)[0]["hd95/a"]  # spacing matters here
    assert rows[1] == surface.per_image([out], ("bg", "a"), 1.0)[1]
    one_row_each = [{k: v[i : i + 1] for k, v in out.items()} for i in range(2)]  # two batches: each its own
    assert surface.per_image(one_row_each, ("bg", "a"), 1.0, surface.STORED) == rows
    del out["gt_spacing"]
    with pytest.raises(DataError, match="carries no voxel spacing"):
        surface.per_image([out], ("bg", "a"), 1.0, surface.STORED)


def test_a_configured_pixel_size_measures_every_row_with_it():
    """2D data stores no spacing: `data.spacing` (rows, cols) scales every row's distances the
    same way (brute force on scaled coordinates); a (1, 1) spacing scores what pixels score."""
    rng = np.random.default_rng(4)
    label = np.zeros((2, 14, 11), int)
    label[:, 3:10, 2:8] = 1
    pred = np.where(rng.random(label.shape) < 0.1, 1 - label, label)
    out = {"pred": pred, "label": label, "valid": np.ones(label.shape)}
    rows = surface.per_image([out], ("bg", "a"), 1.5, (2.0, 0.5))
    for k in range(2):
        a, b = label[k] == 1, pred[k] == 1
        pa, pb = np.argwhere(brute_surface(a)) * [2.0, 0.5], np.argwhere(brute_surface(b)) * [2.0, 0.5]
        d = np.sqrt(((pa[:, None, :] - pb[None, :, :]) ** 2).sum(-1))
        to_b, to_a = d.min(axis=1), d.min(axis=0)
        hd95 = max(np.percentile(to_b, 95), np.percentile(to_a, 95))
        np.testing.assert_allclose(rows[k]["hd95/a"], hd95, rtol=1e-9)
        want = ((to_b <= 1.5).sum() + (to_a <= 1.5).sum()) / (len(to_b) + len(to_a))
        np.testing.assert_allclose(rows[k]["nsd/a"], want, rtol=1e-9)
    assert surface.per_image([out], ("bg", "a"), 1.5, (1.0, 1.0)) == surface.per_image([out], ("bg", "a"), 1.5)


def test_pmap_outputs_keep_every_devices_images():
    """pmap eval outputs [devices, per device, ...] -> one row per image, devices in order."""
    out = {
        "confusion": np.arange(2 * 3 * 4).reshape(2, 3, 2, 2),
        "pred": np.arange(2 * 3 * 5).reshape(2, 3, 5),
        "label": np.arange(2 * 3 * 5).reshape(2, 3, 5) + 100,
        "valid": np.ones((2, 3, 5)),
        "loss": np.array([0.5, 0.5]),
    }
    merged = parallel.merge_eval_outputs(out)
    np.testing.assert_array_equal(merged["pred"], out["pred"].reshape(6, 5))
    np.testing.assert_array_equal(merged["label"], out["label"].reshape(6, 5))
    assert merged["confusion"].shape == (6, 2, 2) and merged["loss"] == 0.5


def number(cell: str) -> float:
    return float(cell) if cell else float("nan")  # the tables leave nan cells empty


def test_a_run_reports_what_its_written_masks_score(tfds_dir, tmp_path, capsys):
    """`eval.surface_metrics`: the per-image NSD/HD95 of the last evaluation equal those of the
    masks `segjax.predict` writes for the validation images, scored here against their labels;
    rescored with a pixel size in the config, they are those masks' distances in that unit."""
    config = load_config("tiny")
    config.data.tfds_dir = tfds_dir
    config.eval.surface_metrics, config.eval.nsd_tolerance = True, 1.5
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(config, workdir)
    names = config.data.class_names
    assert {f"val/nsd/{n}" for n in names[1:]} <= set(final) and "val/mhd95" in final
    assert {k for k in final if k.startswith("val/")} == evaluate.run_score_keys(config)  # known before training
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        assert json.load(f)["val/mnsd"] == pytest.approx(final["val/mnsd"])
    assert f"surface Dice   {final['val/mnsd']:6.4f} (HD95 {final['val/mhd95']:6.4f} px)" in report.results_table(
        final, names
    )
    val = sources.open_splits(config.data)["validation"]
    examples = [val[i] for i in range(len(val))]
    images = write_images(tmp_path / "images", [e["image"] for e in examples])
    paths = predict.predict_folder(config, workdir, images, str(tmp_path / "out"), "latest")
    with open(os.path.join(workdir, "val_per_image.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(examples)
    scored = 0
    for row, path, e in zip(rows, paths, examples, strict=True):
        mask = np.asarray(Image.open(path))
        for c, name in enumerate(names[1:], start=1):
            want = metrics.surface_dice(e["label"] == c, mask == c, 1.5)
            np.testing.assert_allclose(number(row[f"nsd/{name}"]), want, rtol=1e-9)
            hd = metrics.hausdorff_distance(e["label"] == c, mask == c)
            np.testing.assert_allclose(number(row[f"hd95/{name}"]), hd, rtol=1e-9)
            scored += 0 < want < 1
    assert scored > 0  # not only 0/1/nan cases
    # the table's distances give the run's means back (what intervals over images and pooled rows draw)
    _, classes, counts, _ = image_tables.read_per_image_counts(os.path.join(workdir, "val_per_image.csv"))
    got = scoring.count_scores(counts, config.eval, classes)
    for key in ("val/mnsd", "val/mhd95", *(f"val/{k}/{n}" for k in ("nsd", "hd95") for n in names[1:])):
        assert got[key] == pytest.approx(final[key], rel=1e-5, nan_ok=True), key

    config.eval.surface_units, config.data.spacing, config.data.spacing_unit = "physical", (2.0, 0.5), "um"
    results = rescore.evaluate_checkpoint(config, workdir, "latest")
    assert results["eval_settings"]["distance_unit"] == "um"
    assert f"(HD95 {results['val/mhd95']:6.4f} um)" in capsys.readouterr().out
    with open(os.path.join(workdir, "eval_latest_per_image.csv"), encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for row, path, e in zip(rows, paths, examples, strict=True):
        mask = np.asarray(Image.open(path))
        for c, name in enumerate(names[1:], start=1):
            want = metrics.surface_dice(e["label"] == c, mask == c, 1.5, spacing=(2.0, 0.5))
            np.testing.assert_allclose(number(row[f"nsd/{name}"]), want, rtol=1e-9)
            hd = metrics.hausdorff_distance(e["label"] == c, mask == c, spacing=(2.0, 0.5))
            np.testing.assert_allclose(number(row[f"hd95/{name}"]), hd, rtol=1e-9)


def test_baselines_report_surface_metrics_per_image(tmp_path):
    config = load_config("tiny")
    config.eval.surface_metrics = True
    image = np.zeros((16, 16, 1), np.uint8)
    image[4:12, 3:10] = 200
    label = np.zeros((16, 16), np.int64)
    label[5:12, 3:11] = 1
    source = [{"image": image, "label": label, "name": "a"}]
    config.data.num_classes, config.data.class_names = 2, ("bg", "fg")
    results = baselines.evaluate_split(source, config, str(tmp_path / "rows.csv"))
    pred = baselines.predict(image, config.baseline)
    assert results["val/nsd/fg"] == metrics.surface_dice(label == 1, pred == 1, config.eval.nsd_tolerance)
    with open(tmp_path / "rows.csv", encoding="utf-8") as f:
        row = next(csv.DictReader(f))
    assert float(row["hd95/fg"]) == metrics.hausdorff_distance(label == 1, pred == 1)
    # with a pixel size in the config: physical distances, that size along each axis
    config.eval.surface_units, config.data.spacing = "physical", (3.0, 1.0)
    results = baselines.evaluate_split(source, config)
    hd = metrics.hausdorff_distance(label == 1, pred == 1, spacing=(3.0, 1.0))
    assert results["val/hd95/fg"] == hd != metrics.hausdorff_distance(label == 1, pred == 1)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"eval.nsd_tolerance": -1.0}, r"eval\.nsd_tolerance=-1\.0 must be >= 0"),
        ({"instances.enabled": True}, r"surface_metrics scores semantic runs"),
        ({"eval.surface_units": "mm"}, r"eval\.surface_units='mm'; choose one of \['pixels', 'physical'\]"),
        (
            {"eval.surface_units": "physical"},
            r"needs voxel spacing stored with the data \(data\.name='nifti'\) or a pixel",
        ),
        ({"data.spacing": (1.0,)}, r"data\.spacing=\(1\.0,\) must be 2 positive sizes, one per spatial axis"),
        ({"data.spacing": (1.0, 0.0)}, r"data\.spacing=\(1\.0, 0\.0\) must be 2 positive sizes"),
        ({"data.spacing": (1.0, 1.0), "data.name": "nifti"}, r"NIfTI volumes carry their own voxel spacing"),
        (
            {"data.spacing": (1.0, 1.0), "data.resize": 32, "eval.surface_units": "physical"},
            r"data\.resize=32 changes each image's pixel size",
        ),
    ],
)
def test_bad_surface_settings_are_config_errors(tiny_config, change, message):
    tiny_config.eval.surface_metrics = True
    for key, value in change.items():
        section, name = key.split(".")
        tiny_config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        preflight.check(tiny_config)
