"""A folder's classes from its metadata file (`data.folder.classes_file`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from segjax import preflight, study, train
from segjax.data import class_file
from segjax.errors import ConfigError, DataError
from tests.conftest import ROOT
from tests.test_folder import folder_config, write_folder


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("classes.json", '["background", "nucleus", "border"]'),
        ("classes.json", '{"2": "border", "0": "background", "1": "nucleus"}'),  # ids in any order
        ("classes.txt", "background\n\nnucleus\n border \n"),  # a name per line, blank lines skipped
    ],
)
def test_names_are_read_in_id_order(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    assert class_file.read(str(tmp_path / name)) == ("background", "nucleus", "border")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"0": "a", "2": "b"}', r"its ids \['0', '2'\] must be 0..1"),
        ('["a", "b", "a"]', r"names \['a'\] are given twice"),
        ("[]", "needs one non-empty name per class"),
        ('["a", 3]', "needs one non-empty name per class"),
        ("{'0': 'a'}", "not JSON"),
        ('"a"', "give a list of class names"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, text, message):
    (tmp_path / "classes.json").write_text(text)
    with pytest.raises(DataError, match=f"classes.json: {message}"):
        class_file.read(str(tmp_path / "classes.json"))


def test_the_file_defines_a_runs_classes(tiny_config, tmp_path, tfds_dir):
    """The config says 2 classes; the folder's classes.json says 3: the run trains 3 outputs, its
    scores carry the file's names and its config.json records them; a resume agrees with itself."""
    root = write_folder(tmp_path / "data", [(32, 32)] * 4, num_classes=3)
    (root / "classes.json").write_text(json.dumps(["background", "nucleus", "border"]))
    tiny_config.data = folder_config(root, tfds_dir, num_classes=2, num_folds=2, fold=1, classes_file="classes.json")
    tiny_config.train.steps, tiny_config.eval.every, tiny_config.train.checkpoint_every = 2, 2, 2
    run = str(tmp_path / "run")
    final = train.train_and_evaluate(tiny_config, run)
    assert {"val/iou/background", "val/iou/nucleus", "val/iou/border"} <= set(final)
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        saved = json.load(f)["data"]
    assert saved["num_classes"] == 3 and saved["class_names"] == ["background", "nucleus", "border"]
    assert train.train_and_evaluate(tiny_config, run)["val/miou"] == final["val/miou"]  # finished: nothing trains
    variant = study.variant_config(tiny_config, {"model.pool": "avg"}, "avg")  # a study's variants too
    assert variant.data.class_names == ("background", "nucleus", "border")
    (root / "classes.json").write_text(json.dumps(["background", "nucleus"]))  # edited: 3 -> 2 classes
    with pytest.raises(DataError, match=r"labels|label values|outside 0..1"):  # the masks hold id 2
        train.train_and_evaluate(tiny_config, str(tmp_path / "run2"))


def test_a_classes_file_outside_a_folder_dataset_or_missing_is_refused(tiny_config, tmp_path):
    tiny_config.data.folder.classes_file = "classes.json"
    with pytest.raises(ConfigError, match=r"is read from a folder dataset's data.dir .* here 'synthetic_shapes'"):
        preflight.check(tiny_config)
    tiny_config.data.name, tiny_config.data.dir = "folder", str(tmp_path)
    with pytest.raises(DataError, match=r"data.folder.classes_file: cannot read .*classes.json"):
        preflight.check(tiny_config)


def test_the_data_tools_read_the_classes_file_too(tmp_path, tfds_dir):
    """label_stats and alignment open the dataset themselves: without the file's 3 classes the
    folder's id-2 pixels were 'outside 0..1' (configs/folder.py says 2 classes)."""
    root = write_folder(tmp_path / "data", [(32, 32)] * 4, channels=1, num_classes=3)
    (root / "classes.txt").write_text("background\nnucleus\nborder\n")
    common = [f"--config={ROOT}/configs/folder.py", f"--config.data.dir={root}", f"--config.data.tfds_dir={tfds_dir}"]
    common += ["--config.data.folder.classes_file=classes.txt", "--config.data.channels=1"]
    for tool, extra in (("label_stats", ["--split=train", "--class_id=2"]), ("alignment", ["--class_id=2"])):
        done = subprocess.run(
            [sys.executable, "-m", f"segjax.data.{tool}", *common, *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, f"{tool}: {done.stderr[-2000:]}"
