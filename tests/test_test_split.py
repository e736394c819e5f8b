"""A dataset's held-out test split: prepared where the data has one, never trained or validated on,
scored once by `--eval_only=... --eval_split=test` (eval_<which>_test.json, keys `test/...`)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from segjax import baselines, rescore, train
from segjax.data import builders, sources, synthetic
from segjax.errors import DataError
from tests.test_folder import folder_config, write_folder


def test_an_unlabelled_test_folder_is_no_split_and_a_labelled_one_is(tmp_path, tfds_dir):
    """A challenge's test/ holds images without masks: its preparation stopped at the first image
    ('no mask ... for this image'), so nothing in the folder could be trained on."""
    root = write_folder(tmp_path / "data", [(16, 16), (16, 24), (24, 16)], split_dirs=True)
    os.makedirs(root / "test" / "images")
    test_image = np.random.default_rng(1).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(test_image).save(root / "test" / "images" / "t0.png")
    cfg = folder_config(root, tfds_dir)
    splits = sources.open_splits(cfg)
    assert len(splits["train"]) == 2 and len(splits["validation"]) == 1
    with pytest.raises(
        DataError, match=r"has no test split; it has \['train', 'validation'\]: a test split comes from a test/"
    ):
        sources.open_splits(cfg, splits=("test",))
    os.makedirs(root / "test" / "masks")
    mask = np.arange(256, dtype=np.uint8).reshape(16, 16) % 3
    Image.fromarray(mask).save(root / "test" / "masks" / "t0.png")
    test = sources.open_splits(cfg, splits=("test",))["test"]
    assert len(test) == 1 and test[0]["name"] == "t0"
    np.testing.assert_array_equal(test[0]["image"], test_image)
    np.testing.assert_array_equal(test[0]["label"], mask)
    # a test/ with masks/ but a missing one is still an error naming the image
    Image.fromarray(test_image).save(root / "test" / "images" / "t1.png")
    with pytest.raises(DataError, match=r"t1.png: no mask"):
        sources.open_splits(cfg)


def test_the_test_split_is_scored_apart_from_validation_and_the_same_images_score_the_same(
    tiny_config, tmp_path, tfds_dir
):
    """Test rows copy the validation images under other names, so the test split's scores must be
    the validation split's, key for key; metrics.json is left alone and a second scoring keeps the
    first's files."""
    root = write_folder(tmp_path / "data", [(32, 32)] * 6, num_classes=4)
    rows = {"000": "train", "001": "train", "002": "train", "003": "train", "004": "val", "005": "val"}

    def write_split_file():
        with open(root / "split.csv", "w", encoding="utf-8") as f:
            f.write("id,split\n" + "".join(f"{n},{s}\n" for n, s in rows.items()))

    write_split_file()
    tiny_config.data = folder_config(root, tfds_dir, num_classes=4, split_file="split.csv")
    tiny_config.train.steps, tiny_config.eval.every, tiny_config.train.checkpoint_every = 3, 3, 3
    run = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config, run)
    with pytest.raises(DataError, match=r"no test split; it has \['train', 'validation'\].*split-file rows 'test'"):
        rescore.evaluate_checkpoint(tiny_config, run, "latest", "test")
    for name, copy in (("004", "t004"), ("005", "t005")):  # the validation images again, as test rows
        for kind in ("images", "masks"):
            shutil.copyfile(root / kind / f"{name}.png", root / kind / f"{copy}.png")
        rows[copy] = "test"
    write_split_file()
    with open(os.path.join(run, "metrics.json"), "rb") as f:
        metrics_before = f.read()
    tiny_config.eval.interval_resamples = 200  # each scoring keeps its intervals, named for its split
    val = rescore.evaluate_checkpoint(tiny_config, run, "latest")
    test = rescore.evaluate_checkpoint(tiny_config, run, "latest", "test")
    kept_intervals(run, "eval_latest_test_intervals.json", "eval_latest_intervals.json", test)
    assert test["split"] == "test" and val["split"] == "validation"
    scores = {k[len("val/") :] for k in val if k.startswith("val/")}
    assert {"miou", "accuracy", "iou/c3", "dice/c0", "mbiou", "pixels", "images"} <= scores
    assert not [k for k in test if k.startswith("val/")]
    for key in scores:
        np.testing.assert_allclose(test[f"test/{key}"], val[f"val/{key}"], rtol=1e-6, err_msg=key)
    assert test["test/images"] == 2 and test["test/pixels"] == 2 * 32 * 32
    with open(os.path.join(run, "eval_latest_test.json"), encoding="utf-8") as f:
        assert json.load(f)["test/miou"] == test["test/miou"]
    with open(os.path.join(run, "eval_latest_test_per_image.csv"), encoding="utf-8") as f:
        assert [line.split(",")[1] for line in f.read().splitlines()[1:]] == ["t004", "t005"]
    with open(os.path.join(run, "metrics.json"), "rb") as f:
        assert f.read() == metrics_before
    rescore.evaluate_checkpoint(tiny_config, run, "latest", "test")  # a second scoring: the first is kept
    assert os.path.exists(os.path.join(run, "eval_latest_test.1.json"))
    assert os.path.exists(os.path.join(run, "eval_latest_test_per_image.1.csv"))
    assert os.path.exists(os.path.join(run, "eval_latest_test_confusion.1.csv"))
    # a classic baseline scores the same split alike, into metrics_test.json beside its metrics.json
    otsu = str(tmp_path / "otsu")
    val = baselines.run(tiny_config, otsu)
    test = baselines.run(tiny_config, otsu, split="test")
    assert test["split"] == "test" and not [k for k in test if k.startswith("val/")]
    for key in ("miou", "accuracy", "iou/foreground", "mbiou", "pixels"):  # 4 classes: scored as fg / bg
        np.testing.assert_allclose(test[f"test/{key}"], val[f"val/{key}"], rtol=1e-6, err_msg=key)
    with open(os.path.join(otsu, "metrics_test.json"), encoding="utf-8") as f:
        assert json.load(f)["test/miou"] == test["test/miou"]
    with open(os.path.join(otsu, "metrics.json"), encoding="utf-8") as f:
        assert json.load(f)["val/miou"] == val["val/miou"]
    assert os.path.exists(os.path.join(otsu, "test_per_image.csv"))
    kept_intervals(otsu, "intervals_test.json", "intervals.json", test)


def kept_intervals(run: str, test_file: str, val_file: str, test: dict) -> None:
    """The test split's kept intervals: the validation file's scores named `test/...`, each around
    the split's own score."""
    with open(os.path.join(run, test_file), encoding="utf-8") as f:
        kept = json.load(f)
    with open(os.path.join(run, val_file), encoding="utf-8") as f:
        val_keys = list(json.load(f)["intervals"])
    assert kept["split"] == "test" and kept["images"] == 2 and kept["table"].endswith("per_image.csv")
    assert (
        list(kept["intervals"]) == [f"test/{k[len('val/') :]}" for k in val_keys] and "test/miou" in kept["intervals"]
    )
    for key, r in kept["intervals"].items():
        assert r["estimate"] == pytest.approx(test[key], abs=1e-6) and r["low"] <= r["high"]


def test_a_synthetic_test_split_is_rendered_apart_and_datasets_without_one_keep_their_names(tiny_config):
    """Without num_test the prepared names are those of before (every existing copy is reused);
    with it, test scene i is render_scene(seed, 'test', i): no scene of the other splits."""
    knobs = tiny_config.data.synthetic.to_dict()
    without = builders.SyntheticShapesConfig.from_knobs(**knobs).name
    assert "_te" not in without and without.startswith(f"s{knobs['image_size']}_tr{knobs['num_train']}_va")
    tiny_config.data.synthetic.num_test = 3
    assert builders.SyntheticShapesConfig.from_knobs(**tiny_config.data.synthetic.to_dict()).name == without.replace(
        f"_va{knobs['num_val']}", f"_va{knobs['num_val']}_te3"
    )
    splits = sources.open_splits(tiny_config.data, splits=("validation", "test"))
    params = synthetic.SceneParams(
        **{k: knobs[k] for k in ("image_size", "noise", "contrast", "min_objects", "max_objects")}
    )
    assert len(splits["test"]) == 3
    for i in range(3):
        scene = synthetic.render_scene(knobs["seed"], "test", i, params)
        np.testing.assert_array_equal(
            splits["test"][i]["label"], scene["label"].reshape(splits["test"][i]["label"].shape)
        )
        assert not np.array_equal(splits["test"][i]["image"], splits["validation"][i]["image"])
