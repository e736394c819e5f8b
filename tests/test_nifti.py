"""The NIfTI volume-folder builder on small volumes written here with nibabel."""

from __future__ import annotations

import csv
import os
import re

import nibabel as nib
import numpy as np
import pytest

from segjax import metrics, predict, rescore, score_masks, train
from segjax.data import nifti, sources
from segjax.errors import DataError
from tests.conftest import load_config

AFFINE = np.diag([1.5, 1.5, 2.0, 1.0])


def write_volumes(root, shapes, num_classes=3, channels=1, seed=0, label_dtype=np.uint8, suffix=".nii.gz"):
    """NIfTI files in (x, y, z[, c]) order; intensities on a scanner-like scale (not 0..1)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, "masks"), exist_ok=True)
    for i, shape in enumerate(shapes):
        data = rng.normal(400.0 + 100 * i, 50.0 + 10 * i, (*shape, channels) if channels > 1 else shape)
        nib.save(nib.Nifti1Image(data.astype(np.float32), AFFINE), os.path.join(root, "images", f"case{i}{suffix}"))
        label = rng.integers(0, num_classes, shape).astype(label_dtype)
        nib.save(nib.Nifti1Image(label, AFFINE), os.path.join(root, "masks", f"case{i}{suffix}"))
    return str(root)


def nifti_config(root, tfds_dir, num_classes=3, channels=1, normalize="percentile", **folder_knobs):
    cfg = load_config("default").data
    cfg.name, cfg.dir, cfg.tfds_dir, cfg.channels = "nifti", str(root), tfds_dir, channels
    cfg.num_classes, cfg.class_names = num_classes, tuple(f"c{i}" for i in range(num_classes))
    cfg.nifti.normalize = normalize
    for k, v in folder_knobs.items():
        setattr(cfg.folder, k, v)
    return cfg


def test_volumes_are_read_in_dhw_order_normalised_and_split(tmp_path, tfds_dir):
    shapes = [(12, 10, 8), (14, 10, 6), (12, 12, 8), (10, 10, 10)]
    root = write_volumes(tmp_path / "vols", shapes)
    splits = sources.open_splits(nifti_config(root, tfds_dir, num_folds=4, fold=3))
    assert len(splits["train"]) == 3 and len(splits["validation"]) == 1
    ex = splits["validation"][0]  # case3, the last name
    assert ex["name"] == "case3"
    np.testing.assert_array_equal(ex["spacing"], [2.0, 1.5, 1.5])  # AFFINE's (x, y, z) sizes as (D, H, W)
    raw = np.asarray(nib.load(os.path.join(root, "images", "case3.nii.gz")).dataobj)
    label = np.asarray(nib.load(os.path.join(root, "masks", "case3.nii.gz")).dataobj)
    assert ex["image"].shape == (10, 10, 10, 1) and ex["image"].dtype == np.float32
    np.testing.assert_array_equal(ex["label"], label.transpose(2, 1, 0))  # (x,y,z) -> (z,y,x) = [D,H,W]
    lo, hi = np.percentile(raw, [0.5, 99.5])
    expected = (np.clip(raw, lo, hi) - lo) / (hi - lo)
    np.testing.assert_allclose(ex["image"][..., 0], expected.transpose(2, 1, 0), atol=1e-5)
    assert ex["image"].min() == 0.0 and ex["image"].max() == pytest.approx(1.0)
    shapes_seen = sorted(splits["train"][i]["label"].shape for i in range(3))
    assert shapes_seen == sorted(s[::-1] for s in shapes[:3])  # mixed sizes kept


@pytest.mark.parametrize("unit, mm", [("mm", 1.0), ("unknown", 1.0), ("micron", 0.001), ("meter", 1000.0)])
def test_voxel_spacing_in_mm_along_the_array_axes(tmp_path, unit, mm):
    """Spacing = the length of each array axis's affine column (a rotated grid keeps its voxel
    sizes), in the header's unit converted to mm, listed as (D, H, W) = (z, y, x)."""
    affine = np.eye(4)
    affine[:3, :3] = [[0.0, 0.7, 0.0], [0.5, 0.0, 0.0], [0.0, 0.0, 3.0]]  # x and y axes swapped in space
    img = nib.Nifti1Image(np.zeros((4, 5, 6), np.float32), affine)
    img.header.set_xyzt_units(xyz=unit)
    path = str(tmp_path / "v.nii.gz")
    nib.save(img, path)
    _, _, spacing = nifti.load_with_spacing(path)
    np.testing.assert_allclose(spacing, np.array([3.0, 0.7, 0.5]) * mm, rtol=1e-6)


@pytest.mark.parametrize("mode", ["zscore", "minmax"])
def test_normalisations_per_volume_and_channel(mode):
    rng = np.random.default_rng(1)
    vol = np.stack([rng.normal(1000, 200, (4, 5, 6)), rng.normal(-3, 0.1, (4, 5, 6))], -1)
    out = nifti.normalize(vol, mode)
    for c in range(2):
        if mode == "zscore":
            assert out[..., c].mean() == pytest.approx(0.0, abs=1e-5)
            assert out[..., c].std() == pytest.approx(1.0, abs=1e-4)
        else:
            assert out[..., c].min() == 0.0 and out[..., c].max() == pytest.approx(1.0)
    ref = (vol[..., 0] - vol[..., 0].min()) / (vol[..., 0].max() - vol[..., 0].min())
    if mode == "minmax":
        np.testing.assert_allclose(out[..., 0], ref, atol=1e-6)


def test_two_channel_volumes_and_float_labels(tmp_path, tfds_dir):
    root = write_volumes(tmp_path / "mc", [(8, 8, 8)] * 3, channels=2, label_dtype=np.float32, suffix=".nii")
    splits = sources.open_splits(nifti_config(root, tfds_dir, channels=2, normalize="zscore", num_folds=3))
    assert splits["train"][0]["image"].shape == (8, 8, 8, 2)
    assert splits["train"][0]["label"].dtype == np.int32


def _damage_label_range(root):
    label = np.full((8, 8, 8), 255, np.uint8)
    nib.save(nib.Nifti1Image(label, AFFINE), os.path.join(root, "masks", "case1.nii.gz"))


def _damage_shape(root):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 6), np.uint8), AFFINE), os.path.join(root, "masks", "case1.nii.gz"))


def _damage_affine(root):
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.uint8), np.eye(4)), os.path.join(root, "masks", "case1.nii.gz"))


def _damage_corrupt(root):
    with open(os.path.join(root, "images", "case1.nii.gz"), "wb") as f:
        f.write(b"\x1f\x8b not really gzip")


def _damage_fractional(root):
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), 0.5, np.float32), AFFINE), os.path.join(root, "masks", "case1.nii.gz"))


def _damage_missing(root):
    os.remove(os.path.join(root, "masks", "case1.nii.gz"))


@pytest.mark.parametrize(
    "damage,pattern",
    [
        (_damage_label_range, r"case1.nii.gz: label values \[255\] are outside 0..2"),
        (_damage_shape, r"case1.nii.gz: label shape \(6, 8, 8\) differs from image shape \(8, 8, 8\)"),
        (_damage_affine, r"case1.nii.gz: affine differs"),
        (_damage_corrupt, r"case1.nii.gz: corrupt or unreadable NIfTI"),
        (_damage_fractional, r"case1.nii.gz: label volume holds non-integer values"),
        (_damage_missing, r"case1.nii.gz: no mask"),
    ],
)
def test_bad_volumes_fail_naming_the_file(tmp_path, tfds_dir, damage, pattern):
    root = write_volumes(tmp_path / "bad", [(8, 8, 8)] * 3)
    damage(root)
    with pytest.raises(DataError, match=pattern):
        sources.open_splits(nifti_config(root, tfds_dir, num_folds=3))


def test_3d_unet_trains_on_a_nifti_folder_with_random_patches(tmp_path, tfds_dir, capsys):
    root = write_volumes(tmp_path / "train3d", [(20, 18, 16), (18, 18, 18), (16, 20, 18), (16, 16, 16)], num_classes=2)
    config = load_config("unet3d")
    config.data = nifti_config(root, tfds_dir, num_classes=2, num_folds=4, fold=3)
    config.data.augment.crop = 16  # random 16^3 patches from volumes of mixed sizes
    config.model.depth, config.model.base_features = 2, 4
    config.train.steps, config.train.batch_size, config.eval.batch_size = 2, 2, 1
    config.train.log_every = config.train.checkpoint_every = config.eval.every = 2
    config.eval.surface_metrics, config.eval.surface_units, config.eval.nsd_tolerance = True, "physical", 2.0
    final = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert final["step"] == 2
    assert final["val/pixels"] == 16 * 16 * 16  # the validation volume (case3), whole, every voxel once
    assert re.search(r"surface Dice +[\d.]+ \(HD95 +[\d.]+ mm\)", capsys.readouterr().out)  # printed in mm

    # segjax.predict on volumes: the validation volume's mask, compared with its label in numpy,
    # gives the accuracy --eval_only computes; a non-cubic volume's mask keeps its grid
    new = tmp_path / "new"
    os.makedirs(new)
    os.symlink(os.path.join(root, "images", "case3.nii.gz"), new / "case3.nii.gz")
    odd = np.random.default_rng(1).normal(400.0, 50.0, (20, 16, 12)).astype(np.float32)
    nib.save(nib.Nifti1Image(odd, AFFINE), new / "odd.nii")
    out = str(tmp_path / "masks")
    paths = predict.predict_folder(config, str(tmp_path / "run"), str(new), out, "latest")
    assert [os.path.basename(p) for p in paths] == ["case3.nii.gz", "odd.nii.gz"]
    mask = nib.load(paths[0])
    label = np.asarray(nib.load(os.path.join(root, "masks", "case3.nii.gz")).dataobj)
    scored = rescore.evaluate_checkpoint(config, str(tmp_path / "run"), "latest")
    np.testing.assert_allclose((np.asarray(mask.dataobj) == label).mean(), scored["val/accuracy"], rtol=1e-9)
    # surface metrics in mm: the run's per-image HD95 / NSD are the written mask's, measured in
    # (x, y, z) order with the affine's voxel sizes; in voxels they would differ (anisotropic)
    with open(tmp_path / "run" / "val_per_image.csv", encoding="utf-8") as f:
        (row,) = csv.DictReader(f)
    truth, guess = label == 1, np.asarray(mask.dataobj) == 1
    hd_mm = metrics.hausdorff_distance(truth, guess, 95.0, (1.5, 1.5, 2.0))
    assert np.isfinite(hd_mm) and hd_mm != metrics.hausdorff_distance(truth, guess)
    np.testing.assert_allclose(float(row["hd95/c1"]), hd_mm, rtol=1e-6)
    nsd = metrics.surface_dice(truth, guess, 2.0, (1.5, 1.5, 2.0))
    np.testing.assert_allclose(float(row["nsd/c1"]), nsd, rtol=1e-6)
    odd_mask = nib.load(paths[1])
    assert odd_mask.shape == (20, 16, 12) and np.allclose(odd_mask.affine, AFFINE)
    assert set(np.unique(np.asarray(odd_mask.dataobj))) <= {0, 1}
    # the written volumes scored by segjax.score_masks (odd.nii.gz is no validation volume: left
    # out): the run's own scores, HD95 and surface Dice in mm included
    files = score_masks.score(config, out, str(tmp_path / "scores.json"))
    for key in ("val/accuracy", "val/miou", "val/tp/c1", "val/fn/c1", "val/mhd95", "val/mnsd"):
        np.testing.assert_allclose(files[key], scored[key], rtol=1e-6, err_msg=key)
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), -1, np.int16), AFFINE), os.path.join(out, "case3.nii.gz"))
    with pytest.raises(DataError, match=r"case3.nii.gz: holds \[-1\], outside the class ids 0..1"):
        score_masks.score(config, out, str(tmp_path / "scores.json"), overwrite=True)
