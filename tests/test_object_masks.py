"""One mask file per object (the DSB 2018 layout) -> an image/mask/instance folder."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from segjax.data import object_masks, sources
from segjax.errors import DataError, WorkdirError
from tests.conftest import ROOT
from tests.test_folder import folder_config


def _case(root, name, objects, size=(12, 10)):
    """A case folder: an RGBA image and one 0/255 mask per object box (r0, r1, c0, c1)."""
    os.makedirs(root / name / "images")
    os.makedirs(root / name / "masks")
    image = np.random.default_rng(len(name)).integers(0, 256, (*size, 4), np.uint8)
    Image.fromarray(image).save(root / name / "images" / f"{name}.png")
    for k, (r0, r1, c0, c1) in enumerate(objects):
        mask = np.zeros(size, np.uint8)
        mask[r0:r1, c0:c1] = 255
        if k == 1:  # a colour mask (green): an object wherever a colour channel is set
            mask = np.stack([np.zeros_like(mask), mask, np.zeros_like(mask)], -1)
        Image.fromarray(mask).save(root / name / "masks" / f"m{k}.png")
    return image


def test_cases_become_a_folder_that_trains_with_instances(tmp_path, tfds_dir):
    root = tmp_path / "stage1_train"
    boxes = {"a": [(0, 4, 0, 4), (6, 10, 2, 8)], "b": [(1, 3, 1, 9)], "c": [(0, 2, 0, 2), (3, 5, 3, 5), (8, 12, 0, 10)]}
    images = {name: _case(root, name, objects) for name, objects in boxes.items()}
    assert object_masks.convert(str(root), str(tmp_path / "out")) == ["a", "b", "c"]
    for name, objects in boxes.items():
        expected = np.zeros((12, 10), np.uint16)
        for k, (r0, r1, c0, c1) in enumerate(objects, 1):  # ids in the sorted order of the mask files
            expected[r0:r1, c0:c1] = k
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "instances" / f"{name}.png")), expected)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "masks" / f"{name}.png")), expected > 0)
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "out" / "images" / f"{name}.png")), images[name])
    cfg = folder_config(tmp_path / "out", tfds_dir, channels=3, num_classes=2, num_folds=3, fold=2)
    val = sources.open_splits(cfg, with_instances=True)["validation"][0]
    assert val["name"] == "c" and int(val["instances"].max()) == 3
    with pytest.raises(WorkdirError, match="9 files already exist"):
        object_masks.convert(str(root), str(tmp_path / "out"))


def test_overlapping_objects_and_odd_cases_are_named(tmp_path):
    root = tmp_path / "overlap"
    _case(root, "x", [(0, 4, 0, 4), (3, 6, 3, 6)])
    with pytest.raises(DataError, match=r"x/masks/m1\.png and .*x/masks/m0\.png both claim 1 pixels"):
        object_masks.convert(str(root), str(tmp_path / "o"))
    assert not os.path.exists(tmp_path / "o")  # every case checked before anything is written
    bad = tmp_path / "sizes"
    _case(bad, "y", [(0, 4, 0, 4)])
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(bad / "y" / "masks" / "m9.png")
    with pytest.raises(DataError, match=r"m9\.png: mask size \(5, 5\) differs from its image's \(12, 10\)"):
        object_masks.convert(str(bad), str(tmp_path / "o"))
    os.makedirs(tmp_path / "noimages" / "w" / "masks")
    with pytest.raises(DataError, match=r"w/images holds 0 files; a case has one image"):
        object_masks.convert(str(tmp_path / "noimages"), str(tmp_path / "o"))
    empty = tmp_path / "empty"
    _case(empty, "z", [])
    done = subprocess.run(
        [sys.executable, "-m", "segjax.data.object_masks", f"--root={empty}", f"--out={tmp_path / 'o'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "z: no object masks in" in done.stderr and "Traceback" not in done.stderr
