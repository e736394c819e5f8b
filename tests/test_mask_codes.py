"""Masks whose stored values or colours stand for class ids (data.folder.mask_values, mask_threshold)."""

from __future__ import annotations

import os

import nibabel
import numpy as np
import pytest
from PIL import Image

from segjax.data import mask_codes, sources
from segjax.errors import ConfigError, DataError
from tests.test_folder import folder_config, write_folder
from tests.test_nifti import nifti_config, write_volumes

CAMVID = ((128, 128, 128), (128, 0, 0), (192, 192, 128))  # sky, building, pole
VOID = (0, 0, 0)


def test_classes_equal_a_lookup_of_every_pixel():
    rng = np.random.default_rng(0)
    table = ((10, 20, 30), (0, 0, 0), (255, 255, 255), (10, 20, 31))
    picks = rng.integers(0, 4, (9, 7))
    mask = np.asarray(table, np.uint8)[picks]
    expected = np.vectorize(lambda k: {0: 0, 1: 1, 2: 2, 3: 255}[k])(picks)  # the 4th entry: the ignore label
    np.testing.assert_array_equal(mask_codes.classes(mask, table, 3, 255, "m.png"), expected)
    gray = np.asarray([0, 128, 255], np.uint8)[picks % 3]
    np.testing.assert_array_equal(mask_codes.classes(gray, (0, 128, 255), 3, -1, "g.png"), picks % 3)
    gray[2, 3] = 127
    with pytest.raises(
        DataError, match=r"g\.png: 1 pixels hold values not in data\.folder\.mask_values, e\.g\. \[127\]"
    ):
        mask_codes.classes(gray, (0, 128, 255), 3, -1, "g.png")
    with pytest.raises(DataError, match=r"single-channel mask, but .* colours"):
        mask_codes.classes(gray, table[:3], 3, -1, "g.png")
    with pytest.raises(DataError, match=r"3-channel mask, but .* gray levels"):
        mask_codes.classes(mask, (0, 128, 255), 3, -1, "m.png")


def test_colour_masks_with_a_void_colour_read_as_ids_and_the_ignore_label(tmp_path, tfds_dir):
    """CamVid-style colour masks: each class one colour, void pixels the ignore label; a colour
    not in the table (an anti-aliased edge) names the file and the colour."""
    root = write_folder(tmp_path / "camvid", [(8, 8)] * 4, num_classes=3)
    rng = np.random.default_rng(1)
    picks = {}
    for k in range(4):
        picks[f"{k:03d}"] = rng.integers(0, 4, (8, 8))
        Image.fromarray(np.asarray((*CAMVID, VOID), np.uint8)[picks[f"{k:03d}"]]).save(root / "masks" / f"{k:03d}.png")
    cfg = folder_config(root, tfds_dir, num_classes=3, num_folds=2, fold=1, mask_values=(*CAMVID, VOID))
    cfg.ignore_label = 255
    for split in sources.open_splits(cfg).values():
        for i in range(len(split)):
            chosen = picks[split[i]["name"]]
            np.testing.assert_array_equal(split[i]["label"], np.where(chosen == 3, 255, chosen))
    stray = np.asarray(Image.open(root / "masks" / "002.png")).copy()
    stray[0, :2] = (128, 64, 64)
    Image.fromarray(stray).save(root / "masks" / "002.png")
    with pytest.raises(DataError, match=r"masks/002\.png: 2 pixels hold values not in .*\[\(128, 64, 64\)\]"):
        sources.open_splits(cfg)
    Image.fromarray(stray).save(root / "masks" / "002.jpg")  # colours must be exact: a JPEG is refused
    (root / "masks" / "002.png").unlink()
    with pytest.raises(DataError, match=r"002\.jpg: a JPEG file; ids must be stored losslessly"):
        sources.open_splits(cfg)


def test_gray_levels_read_as_ids(tmp_path, tfds_dir):
    """REFUGE-style 0/128/255 masks: class k stored as gray level k."""
    root = write_folder(tmp_path / "refuge", [(8, 8)] * 4, num_classes=3)
    for k in range(4):
        ids = np.zeros((8, 8), np.uint8)
        ids[2:6], ids[3:5, 3:5] = 1, 2
        Image.fromarray(np.asarray([0, 128, 255], np.uint8)[ids]).save(root / "masks" / f"{k:03d}.png")
    cfg = folder_config(root, tfds_dir, num_classes=3, num_folds=2, fold=1, mask_values=(0, 128, 255))
    label = sources.open_splits(cfg)["validation"][0]["label"]
    assert np.bincount(label.ravel(), minlength=3).tolist() == [32, 28, 4]


def test_label_map_maps_a_folders_stored_ids_many_to_one(tmp_path, tfds_dir):
    """Cityscapes-style label ids -> train ids (several ids to one class, some to the ignore
    label): data.label_map could not be used on a folder, as its preparation refused the stored
    ids as out of range before the map applied. Now they are checked through the map, stored as
    they are and mapped at load; an id without an entry names the file."""
    table = (255, 0, 0, 1, 2, 255)  # stored 0..5 -> classes (void, road, road, car, sky, void)
    root = write_folder(tmp_path / "city", [(8, 8)] * 4, num_classes=3)
    rng = np.random.default_rng(4)
    stored = {f"{k:03d}": rng.integers(0, 6, (8, 8)).astype(np.uint8) for k in range(4)}
    for name, ids in stored.items():
        Image.fromarray(ids).save(root / "masks" / f"{name}.png")
    cfg = folder_config(root, tfds_dir, num_classes=3, num_folds=2, fold=1)
    cfg.label_map, cfg.ignore_label = table, 255
    for split in sources.open_splits(cfg).values():
        for i in range(len(split)):
            np.testing.assert_array_equal(split[i]["label"], np.asarray(table)[stored[split[i]["name"]]])
    bad = stored["001"].copy()
    bad[0, 0] = 7
    Image.fromarray(bad).save(root / "masks" / "001.png")
    with pytest.raises(DataError, match=r"masks/001\.png: stored label value 7 has no entry in data\.label_map"):
        sources.open_splits(cfg)
    cfg.folder.mask_values = (0, 1, 2)
    with pytest.raises(ConfigError, match="all decode masks; set one"):
        sources.open_splits(cfg)


@pytest.mark.parametrize(
    ("values", "ignore", "message"),
    [
        ((0, 255), -1, r"one gray level or \(r, g, b\) colour per class, 3"),
        ((0, 128, 255, 64), -1, "one more for data.ignore_label"),
        ((0, (1, 2, 3), 255), -1, "per class"),
        ((0, 128, 128), -1, "repeats a value"),
        ((0, -1, 255), -1, "per class"),
    ],
)
def test_mask_values_that_cannot_encode_the_classes_are_refused(tmp_path, tfds_dir, values, ignore, message):
    root = write_folder(tmp_path / "v", [(8, 8)] * 2, num_classes=3)
    cfg = folder_config(root, tfds_dir, num_classes=3, mask_values=values)
    cfg.ignore_label = ignore
    with pytest.raises(ConfigError, match=message):
        sources.open_splits(cfg)
    cfg.folder.mask_values, cfg.folder.mask_threshold = (0, 128, 255), 127
    with pytest.raises(ConfigError, match="all decode masks; set one"):
        sources.open_splits(cfg)


def test_volumes_refuse_mask_values_rather_than_ignore_them_and_take_a_label_map(tmp_path, tfds_dir):

    volumes = write_volumes(tmp_path / "vols", [(6, 5, 4)] * 2, num_classes=5)
    with pytest.raises(ConfigError, match=r"mask_values decodes image folders' masks \(data\.name='folder'\)"):
        sources.open_splits(nifti_config(volumes, tfds_dir, mask_values=(0, 1, 2)))
    cfg = nifti_config(volumes, tfds_dir, num_classes=3, num_folds=2, fold=1)  # stored 0..4 -> 3 classes
    cfg.label_map = (0, 1, 1, 2, 2)
    stored = np.asarray(nibabel.load(os.path.join(volumes, "masks", "case0.nii.gz")).dataobj)
    np.testing.assert_array_equal(
        sources.open_splits(cfg)["train"][0]["label"], np.asarray(cfg.label_map)[np.transpose(stored, (2, 1, 0))]
    )


def test_colour_coded_instance_maps_are_numbered_and_wide_ids_refused(tmp_path, tfds_dir):
    """Annotation tools often export instances as colours (black = none): such a map was refused
    with a misleading size message. Each colour becomes one id, black 0; a 32-bit TIFF id above
    65535 was cast to uint16, onto another instance, without a word."""
    root = write_folder(tmp_path / "inst", [(8, 8)] * 2, num_classes=2, instances=True)
    colours = np.asarray([(0, 0, 0), (200, 10, 10), (10, 200, 10), (10, 10, 200)], np.uint8)
    picks = np.random.default_rng(2).integers(0, 4, (8, 8))
    Image.fromarray(colours[picks]).save(root / "instances" / "001.png")
    Image.fromarray((picks > 0).astype(np.uint8)).save(root / "masks" / "001.png")
    inst = sources.open_splits(folder_config(root, tfds_dir, num_classes=2, num_folds=2, fold=1), with_instances=True)
    ids = inst["validation"][0]["instances"]
    assert ((ids == 0) == (picks == 0)).all()  # black: no instance
    pairs = set(zip(picks.ravel().tolist(), ids.ravel().tolist(), strict=True))
    assert len(pairs) == 4 and len({i for _, i in pairs}) == 4  # one id per colour, one colour per id
    wide = np.zeros((8, 8), np.int32)
    wide[:4] = 70000
    Image.fromarray(wide, mode="I").save(root / "instances" / "001.tif")
    (root / "instances" / "001.png").unlink()
    with pytest.raises(DataError, match=r"instances/001\.tif: instance ids 0\.\.70000 do not fit 0\.\.65535"):
        sources.open_splits(folder_config(root, tfds_dir, num_classes=2, num_folds=2, fold=1), with_instances=True)
