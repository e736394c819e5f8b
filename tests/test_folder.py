"""The image/mask folder builder on small folders made here, and on ../shared/data when present."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from segjax.data import augment, folder, pipeline, png, sources
from segjax.errors import ConfigError, DataError
from tests.conftest import SHARED_DATA, load_config


def write_folder(root, sizes, channels=3, num_classes=3, instances=False, split_dirs=False, seed=0):
    rng = np.random.default_rng(seed)
    layout = {"train": sizes[:-1], "val": sizes[-1:]} if split_dirs else {"": sizes}
    for sub, sub_sizes in layout.items():
        for d in ("images", "masks", *(("instances",) if instances else ())):
            os.makedirs(os.path.join(root, sub, d), exist_ok=True)
        for i, (h, w) in enumerate(sub_sizes):
            shape = (h, w, 3) if channels == 3 else (h, w)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(f"{root}/{sub}/images/{sub}{i:03d}.png")
            mask = rng.integers(0, num_classes, (h, w), dtype=np.uint8)
            Image.fromarray(mask).save(f"{root}/{sub}/masks/{sub}{i:03d}.png")
            if instances:
                inst = ((mask > 0) * int(rng.integers(1, 1000))).astype(np.uint16)
                Image.fromarray(inst).save(f"{root}/{sub}/instances/{sub}{i:03d}.png")
    return root


def folder_config(root, tfds_dir, channels=3, num_classes=3, **folder_knobs):
    cfg = load_config("default").data
    cfg.name, cfg.dir, cfg.tfds_dir, cfg.channels = "folder", str(root), tfds_dir, channels
    cfg.num_classes, cfg.class_names = num_classes, tuple(f"c{i}" for i in range(num_classes))
    for k, v in folder_knobs.items():
        setattr(cfg.folder, k, v)
    return cfg


def test_gray_folder_with_k_fold_split(tmp_path, tfds_dir):
    root = write_folder(tmp_path / "gray", [(16, 16)] * 6, channels=1)
    cfg = folder_config(root, tfds_dir, channels=1, num_folds=3, fold=2)
    splits = sources.open_splits(cfg)
    assert len(splits["train"]) == 4 and len(splits["validation"]) == 2
    ex = splits["validation"][0]
    original = np.asarray(Image.open(f"{root}/images/004.png"))  # fold 2 of 3 = the last two names
    np.testing.assert_array_equal(ex["image"][..., 0], original)
    np.testing.assert_array_equal(ex["label"], np.asarray(Image.open(f"{root}/masks/004.png")))
    assert ex["name"] == "004"  # the file it came from (per-image results name their rows by it)


def test_rgb_mixed_sizes_instances_and_split_folders(tmp_path, tfds_dir):
    root = write_folder(tmp_path / "rgb", [(16, 24), (32, 16), (20, 20)], instances=True, split_dirs=True)
    cfg = folder_config(root, tfds_dir)
    splits = sources.open_splits(cfg)
    assert len(splits["train"]) == 2 and len(splits["validation"]) == 1
    assert {splits["train"][i]["image"].shape for i in range(2)} == {(16, 24, 3), (32, 16, 3)}
    builder = sources.prepare(cfg)
    assert "instances" in builder.info.features
    # eval pads mixed sizes to a common multiple of 2**depth and masks the padding
    batch = next(pipeline.eval_batches(splits["train"], cfg, batch_size=2, pad_multiple=8))
    assert batch["image"].shape == (2, 32, 24, 3)
    assert batch["valid"].sum() == 16 * 24 + 32 * 16
    # resize on load: image bilinear, labels nearest (values stay class ids)
    cfg.resize = 8
    resized = sources.open_splits(cfg)["train"][0]
    assert resized["image"].shape == (8, 8, 3) and set(np.unique(resized["label"])) <= {0, 1, 2}


def test_a_changed_folder_is_prepared_anew_and_the_earlier_copy_kept(tmp_path, tfds_dir):
    """An edited mask, an added image or an edited split file gives a freshly prepared dataset
    (TFDS reused the copy prepared before: training on the old masks); an unchanged folder reuses
    its copy."""
    root = write_folder(tmp_path / "edit", [(8, 8)] * 4, num_classes=3)
    cfg = folder_config(root, tfds_dir, num_folds=2, fold=1)
    first = sources.prepare(cfg).data_dir
    assert sources.prepare(cfg).data_dir == first  # nothing changed: the same prepared copy
    edited = np.full((8, 8), 2, np.uint8)
    Image.fromarray(edited).save(f"{root}/masks/000.png")
    os.utime(f"{root}/masks/000.png", ns=(1, 1))  # whatever the clock: a new modification time
    np.testing.assert_array_equal(sources.open_splits(cfg)["train"][0]["label"], edited)
    second = sources.prepare(cfg).data_dir
    assert second != first and os.path.isdir(first)  # the earlier copy is not deleted
    write_folder(tmp_path / "more", [(8, 8)] * 5, num_classes=3)
    os.replace(tmp_path / "more" / "images" / "004.png", root / "images" / "004.png")
    os.replace(tmp_path / "more" / "masks" / "004.png", root / "masks" / "004.png")
    val = sources.open_splits(cfg)["validation"]  # fold 1 of 2: 002, 003 of four names; 003, 004 of five
    assert [val[i]["name"] for i in range(len(val))] == ["003", "004"]
    with open(root / "split.csv", "w", encoding="utf-8") as f:
        f.write("id,split\n" + "".join(f"{i:03d},{'val' if i == 0 else 'train'}\n" for i in range(5)))
    by_file = folder_config(root, tfds_dir, split_file="split.csv")
    assert sources.open_splits(by_file)["validation"][0]["name"] == "000"
    with open(root / "split.csv", "w", encoding="utf-8") as f:
        f.write("id,split\n" + "".join(f"{i:03d},{'val' if i == 1 else 'train'}\n" for i in range(5)))
    assert sources.open_splits(by_file)["validation"][0]["name"] == "001"


@pytest.mark.slow  # three runs on a folder dataset (~12 s warm); CI runs it
def test_runs_on_a_folder_whose_files_changed_are_refused_unless_told(tiny_config, tmp_path, tfds_dir):
    """Resuming (or rerunning) a run, a baseline or a study after a mask was edited would mix two
    datasets in one result: refused, naming the dataset; --allow_config_changes / --overwrite
    go on as for a changed config key."""
    from segjax import baselines, rescore, study, train
    from segjax.errors import WorkdirError

    root = write_folder(tmp_path / "data", [(32, 32)] * 6, num_classes=4)
    tiny_config.data = folder_config(root, tfds_dir, num_classes=4, num_folds=3, fold=2)
    tiny_config.train.steps, tiny_config.eval.every, tiny_config.train.checkpoint_every = 2, 2, 2
    run, base = str(tmp_path / "run"), str(tmp_path / "baseline")
    train.train_and_evaluate(tiny_config, run)
    baselines.run(tiny_config, base)
    study.run_study(tiny_config, {"unet": {}}, [0], str(tmp_path / "study"))
    before = sources.dataset_id(tiny_config.data)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(f"{root}/masks/001.png")
    os.utime(f"{root}/masks/001.png", ns=(1, 1))
    after = sources.dataset_id(tiny_config.data)
    assert after != before
    with pytest.raises(WorkdirError, match=rf"differs in: dataset \({before} -> {after}"):
        train.train_and_evaluate(tiny_config, run)
    with pytest.raises(WorkdirError, match="differs in: dataset"):
        baselines.run(tiny_config, base)
    with pytest.raises(WorkdirError, match=r"variant 'unet' now gives \(differs in: dataset"):
        study.run_study(tiny_config, {"unet": {}}, [0], str(tmp_path / "study"))
    rescored = rescore.evaluate_checkpoint(tiny_config, run, "latest")  # rescoring on other data: recorded
    assert rescored["config_differences"] == [f"dataset ({before} -> {after}: its files or preparation changed)"]
    train.train_and_evaluate(tiny_config, run, allow_config_changes=True)
    with open(os.path.join(run, "dataset.json"), encoding="utf-8") as f:
        assert json.load(f) == {"dataset": after}
    train.train_and_evaluate(tiny_config, run)  # recorded: the same data again resumes quietly
    baselines.run(tiny_config, base, overwrite=True)  # the earlier baseline moved aside, not lost
    assert len([d for d in os.listdir(tmp_path) if d.startswith("baseline.replaced-")]) == 1


def test_the_dataset_id_follows_the_files_contents_not_their_times_or_place(
    tiny_config, tmp_path, tfds_dir, monkeypatch
):
    """The same bytes re-written (a re-sync, an unpacked archive) or the folder copied elsewhere keep
    the id, so a run resumes on them; one byte changed with its size and modification time
    restored changes it (git's check: the change time). Unchanged files are not hashed again."""
    import shutil

    from segjax import train
    from segjax.data import file_digests

    root = write_folder(tmp_path / "a" / "data", [(32, 32)] * 6, num_classes=4)
    tiny_config.data = folder_config(root, tfds_dir, num_classes=4, num_folds=3, fold=2)
    tiny_config.train.steps, tiny_config.eval.every, tiny_config.train.checkpoint_every = 2, 2, 2
    run = str(tmp_path / "run")
    train.train_and_evaluate(tiny_config, run)
    first = sources.dataset_id(tiny_config.data)
    files = [os.path.join(d, n) for d, _, names in os.walk(root) for n in names]
    for path in files:  # the same bytes, written anew, with other times
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data)
        os.utime(path, ns=(5 * 10**9, 5 * 10**9))
    hashed = []
    monkeypatch.setattr(file_digests, "sha256", lambda p, real=file_digests.sha256: hashed.append(p) or real(p))
    assert sources.dataset_id(tiny_config.data) == first and len(hashed) == 12
    train.train_and_evaluate(tiny_config, run)  # resumes (finished: nothing to do), no "differs in: dataset"
    with open(os.path.join(run, "dataset.json"), encoding="utf-8") as f:
        assert json.load(f) == {"dataset": first}
    hashed.clear()
    assert sources.dataset_id(tiny_config.data) == first and hashed == []  # stat unchanged: not read again
    copy = shutil.copytree(root, tmp_path / "b" / "data", copy_function=shutil.copyfile)
    assert sources.dataset_id(folder_config(copy, tfds_dir, num_classes=4, num_folds=3, fold=2)) == first
    mask = f"{root}/masks/001.png"
    info = os.stat(mask)
    with open(mask, "r+b") as f:  # one byte of the file's data, same size, same modification time
        f.seek(info.st_size // 2)
        byte = f.read(1)
        f.seek(info.st_size // 2)
        f.write(bytes([byte[0] ^ 1]))
    os.utime(mask, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert os.stat(mask).st_size == info.st_size and os.stat(mask).st_mtime_ns == info.st_mtime_ns
    hashed.clear()
    assert sources.dataset_id(tiny_config.data) != first and hashed == [mask]
    cache = file_digests.cache_path(tfds_dir, root)
    with open(cache, "w", encoding="utf-8") as f:
        f.write("{not json")
    again = sources.dataset_id(tiny_config.data)  # an unreadable cache costs a rehash, not a wrong id
    shutil.copyfile(copy / "masks" / "001.png", mask)
    assert sources.dataset_id(tiny_config.data) == first != again


def test_mixed_sizes_that_do_not_fit_the_depth_train_on_crops_and_rescore_as_evaluated(tiny_config, tmp_path, tfds_dir):
    """Without crops, a batch of two sizes was grain's "same structure" traceback; with crops the
    run trains and evaluates the full images padded, and `--eval_only` (whose state template was
    built from the first validation image unpadded: refused as 'does not fit model.depth') now
    gives the run's own final scores."""
    from segjax import rescore, train

    root = write_folder(tmp_path / "odd", [(30, 22), (26, 34)] * 4, num_classes=4)
    tiny_config.data = folder_config(root, tfds_dir, num_classes=4, num_folds=4, fold=3)
    tiny_config.data.augment.crop = 0
    tiny_config.train.steps, tiny_config.eval.every, tiny_config.train.checkpoint_every = 2, 2, 2
    with pytest.raises(DataError, match=r"different sizes in one batch \(26x34, 30x22\): .*data\.augment\.crop=N"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "nocrop"))
    tiny_config.data.augment.crop = 16
    final = train.train_and_evaluate(tiny_config, str(tmp_path / "run"))
    assert final["val/pixels"] == 30 * 22 + 26 * 34  # every real pixel of both sizes, none of the padding
    rescored = rescore.evaluate_checkpoint(tiny_config, str(tmp_path / "run"), "latest")
    assert rescored["val/miou"] == final["val/miou"] and rescored["val/accuracy"] == final["val/accuracy"]


def test_masks_named_with_a_suffix_pair_with_their_images(tmp_path, tfds_dir):
    """ISIC's masks are NAME_segmentation.png, Carvana's NAME_mask.gif: data.folder.mask_suffix
    pairs them without renaming; without it the error says what to set."""
    root = write_folder(tmp_path / "isic", [(8, 12)] * 4, num_classes=2)
    for name in os.listdir(root / "masks"):
        os.rename(root / "masks" / name, root / "masks" / name.replace(".png", "_segmentation.png"))
    with pytest.raises(DataError, match=r"images/000\.png: no mask .*masks/000\.\* .*set data\.folder\.mask_suffix"):
        sources.open_splits(folder_config(root, tfds_dir, num_classes=2, num_folds=2, fold=1))
    cfg = folder_config(root, tfds_dir, num_classes=2, num_folds=2, fold=1, mask_suffix="_segmentation")
    val = sources.open_splits(cfg)["validation"]
    assert [val[i]["name"] for i in range(len(val))] == ["002", "003"]
    np.testing.assert_array_equal(val[1]["label"], np.asarray(Image.open(root / "masks" / "003_segmentation.png")))
    np.testing.assert_array_equal(val[1]["image"], np.asarray(Image.open(root / "images" / "003.png")))
    os.remove(root / "masks" / "001_segmentation.png")
    with pytest.raises(DataError, match=r"images/001\.png: no mask .*masks/001_segmentation\.\* for this image$"):
        sources.open_splits(cfg)


@pytest.mark.parametrize("stored", ["png_0_255", "jpeg_rgb"])
def test_binary_masks_stored_0_255_or_as_jpeg_read_as_0_1_with_a_threshold(tmp_path, tfds_dir, stored):
    """Kvasir-SEG's masks are RGB JPEGs of 0/255 objects (values in between along the edges),
    many others 0/255 PNGs: data.folder.mask_threshold reads them as value > threshold, the ids
    numpy gives; without it the first is refused as lossy and the second as 0/255 ids."""
    root = write_folder(tmp_path / stored, [(16, 16)] * 4, num_classes=2)
    truth = {}
    for k in range(4):
        ids = np.zeros((16, 16), np.uint8)
        ids[2 + k : 10 + k, 3:12] = 1
        truth[f"{k:03d}"] = ids
        os.remove(root / "masks" / f"{k:03d}.png")
        if stored == "png_0_255":
            Image.fromarray(ids * 255).save(root / "masks" / f"{k:03d}.png")
        else:
            Image.fromarray(np.repeat(ids[..., None] * 255, 3, -1)).save(root / "masks" / f"{k:03d}.jpg", quality=90)
    refused = "a JPEG file; ids must be stored losslessly" if stored == "jpeg_rgb" else "0/255 mask"
    with pytest.raises(DataError, match=refused):
        sources.open_splits(folder_config(root, tfds_dir, num_classes=2, num_folds=2, fold=1))
    cfg = folder_config(root, tfds_dir, num_classes=2, num_folds=2, fold=1, mask_threshold=127)
    splits = sources.open_splits(cfg)
    for split in splits.values():
        for i in range(len(split)):
            stored_mask = np.asarray(Image.open(next((root / "masks").glob(split[i]["name"] + ".*"))))
            expected = (stored_mask.mean(-1) if stored_mask.ndim == 3 else stored_mask) > 127
            np.testing.assert_array_equal(split[i]["label"], expected.astype(np.uint8))
            assert (split[i]["label"] != truth[split[i]["name"]]).sum() <= 2  # JPEG: at most a stray edge pixel
    cfg.num_classes, cfg.class_names = 3, ("a", "b", "c")
    with pytest.raises(ConfigError, match=r"mask_threshold=127: .*data\.num_classes=2; here 'folder', 3"):
        sources.open_splits(cfg)


def test_class_ids_above_255_are_kept_in_folders_and_volumes(tmp_path, tfds_dir):
    """The labels were stored as 8 bits whatever the class count: class 300 of a 301-class
    uint16 mask (and of a NIfTI label volume) came back as class 44, with no error."""
    import nibabel

    from tests.test_nifti import nifti_config, write_volumes

    root = write_folder(tmp_path / "wide", [(8, 8)] * 4, num_classes=2)
    stored = {}
    for k in range(4):
        ids = np.full((8, 8), 7 * k, np.uint16)
        ids[:4] = 300
        stored[f"{k:03d}"] = ids
        Image.fromarray(ids).save(root / "masks" / f"{k:03d}.png")
    splits = sources.open_splits(folder_config(root, tfds_dir, num_classes=301, num_folds=2, fold=1))
    for split in splits.values():
        for i in range(len(split)):
            np.testing.assert_array_equal(split[i]["label"], stored[split[i]["name"]])
    volumes = write_volumes(tmp_path / "vols", [(6, 5, 4)] * 2, num_classes=301, label_dtype=np.uint16)
    cfg = nifti_config(volumes, tfds_dir, num_classes=301, num_folds=2, fold=1)
    train = sources.open_splits(cfg)["train"]
    label = np.asarray(nibabel.load(os.path.join(volumes, "masks", "case0.nii.gz")).dataobj)
    np.testing.assert_array_equal(train[0]["label"], np.transpose(label, (2, 1, 0)))
    assert label.max() > 255


def test_split_file_and_val_fraction(tmp_path, tfds_dir):
    root = write_folder(tmp_path / "csv", [(8, 8)] * 5)
    with open(root / "index.csv", "w", encoding="utf-8") as f:
        f.write("id,suggested_split\n000,train\n001,val\n002,train\n003,val\n004,train\n")
    cfg = folder_config(root, tfds_dir, split_file="index.csv", split_column="suggested_split")
    assert len(sources.open_splits(cfg)["validation"]) == 2
    by_fraction = folder.assign_splits(
        folder.FolderConfig.from_config(folder_config(root, tfds_dir, val_fraction=0.4), tfds_dir)
    )
    again = folder.assign_splits(
        folder.FolderConfig.from_config(folder_config(root, tfds_dir, val_fraction=0.4), tfds_dir)
    )
    assert [p[0] for p in by_fraction["validation"]] == [p[0] for p in again["validation"]]
    assert len(by_fraction["validation"]) == 2


def test_split_rules_are_never_chosen_silently(tmp_path, tfds_dir):
    """A split file's 'test' rows form a test split (they trained before); a value it does not
    know, a missing file or column is a DataError; two split rules at once, or a fold without
    k-fold, a ConfigError."""
    root = write_folder(tmp_path / "csv", [(8, 8)] * 5)

    def splits_with(csv_text=None, **knobs):
        if csv_text is not None:
            (root / "split.csv").write_text(csv_text)
        return folder.assign_splits(folder.FolderConfig.from_config(folder_config(root, tfds_dir, **knobs), tfds_dir))

    by_file = splits_with("id,split\n000,train\n001,val\n002,Test\n003,validation\n004,train\n", split_file="split.csv")
    assert {k: [p[0] for p in v] for k, v in by_file.items()} == {
        "train": ["000", "004"],
        "validation": ["001", "003"],
        "test": ["002"],
    }
    with pytest.raises(DataError, match=r"split.csv: 'split' values \['holdout'\] are not one of"):
        splits_with("id,split\n000,train\n001,val\n002,holdout\n003,val\n004,train\n", split_file="split.csv")
    with pytest.raises(DataError, match=r"needs columns 'id' and 'fold_name'"):
        splits_with(split_file="split.csv", split_column="fold_name")
    with pytest.raises(DataError, match=r"data.folder.split_file: no file .*other.csv"):
        splits_with(split_file="other.csv")
    with pytest.raises(ConfigError, match=r"split_file \(its 'val' rows\) and data.folder.num_folds both choose"):
        splits_with(
            "id,split\n000,train\n001,val\n002,train\n003,train\n004,train\n", split_file="split.csv", num_folds=5
        )
    with pytest.raises(ConfigError, match=r"data.folder.fold=2 needs data.folder.num_folds"):
        splits_with(fold=2)
    nested = write_folder(tmp_path / "nested", [(8, 8)] * 3, split_dirs=True)
    with pytest.raises(ConfigError, match="has split subfolders"):
        folder.assign_splits(folder.FolderConfig.from_config(folder_config(nested, tfds_dir, num_folds=3), tfds_dir))


def test_k_fold_next_to_a_fixed_test_set(tmp_path, tfds_dir):
    """train/ and test/ without val/ (or a split file of train and test rows only): validation is
    held out of the training images by k-fold or val_fraction, and the test images stay the test
    split. Both were unusable: no validation split (subfolders), or an empty one (split file), and
    k-fold next to either an error."""

    def names(splits):
        return {k: [p[0] for p in v] for k, v in splits.items()}

    def splits_of(root, **knobs):
        return names(
            folder.assign_splits(folder.FolderConfig.from_config(folder_config(root, tfds_dir, **knobs), tfds_dir))
        )

    root = write_folder(tmp_path / "tt", [(8, 8)] * 6, split_dirs=True)  # train/train000..004, val/val000
    os.replace(root / "val", root / "test")
    test_names = ["val000"]  # the images of test/, named as write_folder named them
    assert splits_of(root, num_folds=2, fold=1) == {
        "train": ["train000", "train001", "train002"],
        "validation": ["train003", "train004"],  # np.array_split: blocks of 3 and 2
        "test": test_names,
    }
    by_fraction = splits_of(root, val_fraction=0.4, split_seed=3)
    chosen = np.random.default_rng(3).permutation(5)[:2]
    assert by_fraction["validation"] == [f"train{i:03d}" for i in sorted(chosen)]
    assert sorted(by_fraction["train"] + by_fraction["validation"]) == [f"train{i:03d}" for i in range(5)]
    assert by_fraction["test"] == test_names
    flat = write_folder(tmp_path / "flat", [(8, 8)] * 5)
    (flat / "split.csv").write_text("id,split\n000,train\n001,test\n002,train\n003,train\n004,train\n")
    assert splits_of(flat, split_file="split.csv", num_folds=2, fold=0) == {
        "train": ["003", "004"],
        "validation": ["000", "002"],
        "test": ["001"],
    }
    with_val = write_folder(tmp_path / "with_val", [(8, 8)] * 3, split_dirs=True)
    with pytest.raises(ConfigError, match="has split subfolders"):
        splits_of(with_val, num_folds=2)
    cfg = folder_config(root, tfds_dir, num_folds=2, fold=1)  # prepared and opened as training opens it
    opened = sources.open_splits(cfg, splits=("train", "validation", "test"))
    assert [opened["validation"][i]["name"] for i in range(2)] == ["train003", "train004"]
    assert opened["test"][0]["name"] == "val000"


def test_subfolders_and_hidden_files_are_no_data(tmp_path, tfds_dir):
    root = write_folder(tmp_path / "extra", [(8, 8)] * 5)
    for kind in ("images", "masks"):
        os.makedirs(root / kind / "thumbnails")  # was an IsADirectoryError
        (root / kind / ".DS_Store").write_bytes(b"\0")
    splits = sources.open_splits(folder_config(root, tfds_dir))
    assert len(splits["train"]) + len(splits["validation"]) == 5


def corrupt_cases():
    def zero_255(root):
        Image.fromarray(np.full((8, 8), 255, np.uint8)).save(f"{root}/masks/001.png")

    def missing_mask(root):
        os.remove(f"{root}/masks/002.png")

    def truncated(root):
        path = f"{root}/images/001.png"
        data = open(path, "rb").read()
        open(path, "wb").write(data[: len(data) // 2])

    def size_mismatch(root):
        Image.fromarray(np.zeros((8, 9), np.uint8)).save(f"{root}/masks/001.png")

    def gray_in_rgb(root):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(f"{root}/images/001.png")

    def float_mask(root):
        Image.fromarray(np.zeros((8, 8), np.float32), mode="F").save(f"{root}/masks/001.tif")
        os.remove(f"{root}/masks/001.png")

    def rgb_mask(root):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(f"{root}/masks/001.png")

    def sixteen_bit(root):
        Image.fromarray(np.full((8, 8), 300, np.uint16)).save(f"{root}/images/001.png")  # 300 would wrap to 44

    def two_masks_of_one_name(root):
        Image.fromarray(np.ones((8, 8), np.uint8)).save(f"{root}/masks/001.tif")  # which one is 001's mask?

    def jpeg_mask(root):  # at quality 98 every id stays in 0..2, but 6 of the 64 change
        mask = np.zeros((8, 8), np.uint8)
        mask[:4], mask[4:, 4:] = 1, 2
        Image.fromarray(mask).save(f"{root}/masks/001.jpg", quality=98)
        assert np.unique(np.array(Image.open(f"{root}/masks/001.jpg"))).tolist() == [0, 1, 2]
        os.remove(f"{root}/masks/001.png")

    return [
        (jpeg_mask, r"masks/001.jpg: a JPEG file; ids must be stored losslessly"),
        (zero_255, r"masks/001.png: label values \[255\].*0/255 mask.*data\.folder\.mask_threshold=127"),
        (missing_mask, r"images/002.png: no mask"),
        (truncated, r"images/001.png: corrupt or truncated"),
        (size_mismatch, r"masks/001.png: mask size \(8, 9\) differs"),
        (gray_in_rgb, r"images/001.png: image has 1 channels but data.channels=3"),
        (rgb_mask, r"masks/001.png: masks must be single-channel.*data\.folder\.mask_values"),
        (float_mask, r"masks/001.tif: masks must hold integer class ids, got float32"),
        (sixteen_bit, r"images/001.png: uint16 image; segjax stores 8-bit images: set data.folder.rescale"),
        (two_masks_of_one_name, r"masks/001.tif and .*masks/001.png have one name"),
    ]


@pytest.mark.parametrize(("damage", "pattern"), corrupt_cases(), ids=lambda v: getattr(v, "__name__", ""))
def test_bad_files_fail_naming_the_file(tmp_path, tfds_dir, damage, pattern):
    root = write_folder(tmp_path / damage.__name__, [(8, 8)] * 4)
    damage(root)
    with pytest.raises(DataError, match=pattern):
        sources.open_splits(folder_config(root, tfds_dir))


@pytest.mark.parametrize(
    ("options", "refused"),
    [
        ({"format": "PNG"}, ""),
        ({"format": "TIFF", "compression": "tiff_lzw"}, ""),
        ({"format": "JPEG", "quality": 98}, "a JPEG file"),
        ({"format": "TIFF", "compression": "jpeg"}, "a JPEG-compressed TIFF file"),
    ],
)
def test_ids_are_read_only_from_lossless_files(options, refused):
    """Lossless files give the ids back exactly; lossy ones are refused as masks, not as images."""
    mask = np.zeros((8, 8), np.uint8)
    mask[:4], mask[4:, 4:] = 1, 2
    buffer = io.BytesIO()
    Image.fromarray(mask).save(buffer, **options)
    data = buffer.getvalue()
    png.decode(data, "image.x")  # any image file is fine as an image
    if refused:
        with pytest.raises(DataError, match=f"mask.x: {refused}; ids must be stored losslessly"):
            png.decode(data, "mask.x", ids=True)
    else:
        np.testing.assert_array_equal(png.decode(data, "mask.x", ids=True), mask)


def test_exif_orientation_is_applied_ignored_or_refused_as_configured(tmp_path, tfds_dir):
    """A phone photo stored sideways (EXIF orientation 6: viewers turn it 90° clockwise) whose
    mask was drawn on what viewers show. PIL's pixels ignore the tag, so the pair was refused as a
    size mismatch, and a turn that keeps the size (180°, or a square image) misaligned every label
    silently. Now a tagged file is an error until data.folder.exif says what the masks follow."""
    root = write_folder(tmp_path / "photos", [(6, 6)] * 3, num_classes=2)
    stored = np.random.default_rng(1).integers(0, 256, (6, 10, 3), dtype=np.uint8)  # as the camera stored it
    shown = np.rot90(stored, k=-1)  # 10 x 6: turned 90° clockwise, as viewers show it
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(f"{root}/images/001.png", exif=exif)
    mask = (shown[..., 0] > 127).astype(np.uint8)  # drawn on the shown image
    Image.fromarray(mask).save(f"{root}/masks/001.png")
    with pytest.raises(DataError, match=r"images/001.png: EXIF orientation 6 \(viewers show it rotated 90°\)"):
        sources.open_splits(folder_config(root, tfds_dir, num_classes=2, num_folds=3, fold=2))
    with pytest.raises(DataError, match=r"masks/001.png: mask size \(10, 6\) differs from image size \(6, 10\)"):
        sources.open_splits(folder_config(root, tfds_dir, num_classes=2, num_folds=3, fold=2, exif="ignore"))
    train = sources.open_splits(folder_config(root, tfds_dir, num_classes=2, num_folds=3, fold=2, exif="apply"))[
        "train"
    ]
    assert train[1]["name"] == "001"
    np.testing.assert_array_equal(train[1]["image"], shown)
    np.testing.assert_array_equal(train[1]["label"], mask)
    with pytest.raises(ConfigError, match=r"data.folder.exif='turn'; choose one of"):
        folder.FolderConfig.from_config(folder_config(root, tfds_dir, exif="turn"), tfds_dir)


def test_one_bit_files_are_binary_masks_and_black_and_white_images(tmp_path, tfds_dir):
    """PIL reads 1-bit files as bool: a binary mask was refused ("got bool") and an image was
    called deeper than 8 bits; now the mask holds ids 0/1 and the image 0/255."""
    root = write_folder(tmp_path / "bits", [(8, 8)] * 4, channels=1, num_classes=2)
    bits = np.zeros((8, 8), bool)
    bits[:, 3:] = True
    Image.fromarray(bits).save(f"{root}/masks/001.png")  # mode '1'
    Image.fromarray(~bits).save(f"{root}/images/001.png")
    assert Image.open(f"{root}/masks/001.png").mode == "1"
    train = sources.open_splits(folder_config(root, tfds_dir, 1, 2, num_folds=2, fold=1))["train"]  # 000, 001
    example = train[1]
    assert example["name"] == "001"
    np.testing.assert_array_equal(example["label"], bits)
    np.testing.assert_array_equal(example["image"][..., 0], np.where(bits, 0, 255))


def test_palette_cmyk_and_gray_alpha_images_read_as_their_intensities(tmp_path, tfds_dir):
    """A palette photo (pngquant, GIF) was read as its index map: refused as 1 channel with
    data.channels=3, or trained on as if the indices were gray levels with channels=1; a CMYK
    JPEG's 4 channels were taken for RGBA. The references are numpy lookups of the palette and
    the RGB the CMYK file was made from; a palette mask still gives its indices (VOC's masks)."""
    rng = np.random.default_rng(3)
    colours = np.array([[200, 30, 10], [5, 100, 250], [0, 0, 0], [90, 200, 40]], np.uint8)
    index = rng.integers(0, 4, (8, 8)).astype(np.uint8)
    photo = Image.fromarray(index, mode="P")
    photo.putpalette(colours.ravel().tolist())
    root = write_folder(tmp_path / "palette", [(8, 8)] * 4, num_classes=4)
    photo.save(f"{root}/images/001.png")
    photo.save(f"{root}/masks/001.png")  # the same file as a mask: its indices are the ids
    train = sources.open_splits(folder_config(root, tfds_dir, 3, 4, num_folds=2, fold=1))["train"]
    np.testing.assert_array_equal(train[1]["image"], colours[index])
    np.testing.assert_array_equal(train[1]["label"], index)
    gray = Image.fromarray(index, mode="P")
    gray.putpalette(np.repeat(np.array([10, 60, 120, 250], np.uint8), 3).tolist())
    buffer = io.BytesIO()
    gray.save(buffer, format="PNG")
    np.testing.assert_array_equal(png.decode(buffer.getvalue(), "gray.png"), np.array([10, 60, 120, 250])[index])
    rgb = np.repeat(np.repeat(colours[[0, 1, 3, 2]].reshape(2, 2, 3), 8, 0), 8, 1)  # flat patches: JPEG keeps them
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG", quality=95)
    assert Image.open(io.BytesIO(buffer.getvalue())).mode == "CMYK"
    decoded = png.decode(buffer.getvalue(), "print.jpg")
    assert decoded.shape == rgb.shape and np.abs(decoded.astype(int) - rgb).max() <= 8
    # a stored label feature kept as the palette PNG it was (a catalogue dataset storing its files
    # as they are) is read as its indices by the decoded source too, the image as its colours
    record = {
        key: (root / folder_name / "001.png").read_bytes()
        for key, folder_name in [("image", "images"), ("label", "masks")]
    }
    cfg = folder_config(root, tfds_dir, 3, 4)
    example = sources.DecodedSource([record], cfg, "stored")[0]
    np.testing.assert_array_equal(example["label"], index)
    np.testing.assert_array_equal(example["image"], colours[index])
    alpha = np.stack([index * 60, np.full((8, 8), 128)], -1).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(alpha, mode="LA").save(buffer, format="PNG")
    np.testing.assert_array_equal(png.decode(buffer.getvalue(), "la.png"), index * 60)


@pytest.mark.parametrize("mode", ["percentile", "minmax"])
def test_16_bit_images_rescaled_per_image_when_asked(tmp_path, tfds_dir, mode):
    """16-bit microscopy (values far above 255) scaled to 0..255 per image, as numpy computes it."""
    root = write_folder(tmp_path / mode, [(16, 16)] * 3, channels=1)
    rng = np.random.default_rng(1)
    raw = rng.integers(1000, 40000, (3, 16, 16)).astype(np.uint16)
    for i in range(3):
        Image.fromarray(raw[i]).save(f"{root}/images/{i:03d}.png")
    cfg = folder_config(root, tfds_dir, channels=1, num_folds=3, fold=2)
    cfg.folder.rescale = mode
    cfg.folder.percentiles = (1.0, 99.0)
    got = sources.open_splits(cfg)["validation"][0]["image"][..., 0]
    x = raw[2].astype(np.float64)
    lo, hi = np.percentile(x, [1.0, 99.0]) if mode == "percentile" else (x.min(), x.max())
    expected = np.rint((np.clip(x, lo, hi) - lo) / (hi - lo) * 255.0)
    assert got.dtype == np.uint8 and got.min() == 0 and got.max() == 255
    np.testing.assert_array_equal(got, expected)
    cfg.folder.rescale = "zscore"
    with pytest.raises(ConfigError, match=r"data\.folder\.rescale='zscore'; choose one of"):
        sources.open_splits(cfg)
    cfg.folder.rescale, cfg.folder.percentiles = mode, (50.0, 5.0)
    with pytest.raises(ConfigError, match=r"data.folder.percentiles=\(50.0, 5.0\)"):
        sources.open_splits(cfg)


def test_empty_folder_and_missing_dir(tmp_path, tfds_dir):
    os.makedirs(tmp_path / "empty" / "images")
    with pytest.raises(DataError, match="no images found"):
        sources.open_splits(folder_config(tmp_path / "empty", tfds_dir))
    with pytest.raises(DataError, match="is not a folder"):
        sources.open_splits(folder_config(tmp_path / "nowhere", tfds_dir))


_PREPARE = """
import sys
from segjax.data import sources
from tests.test_folder import folder_config
sources.open_splits(folder_config(sys.argv[1], sys.argv[2]))
print("prepared")
"""


def test_processes_preparing_one_dataset_wait_for_each_other(tmp_path):
    """Two runs started side by side on one machine: before the lock, the second to finish
    failed renaming its copy onto the first's (FileExistsError); now one writes, one waits."""
    root = write_folder(tmp_path / "shared", [(64, 64)] * 24)
    tfds_dir = str(tmp_path / "tfds")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", _PREPARE, str(root), tfds_dir, "--verbosity=1"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for _ in range(2)
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    assert all(out.rstrip().endswith("prepared") for out in outputs)
    builder = sources.DATASETS["folder"](folder_config(root, tfds_dir), tfds_dir)
    assert len(os.listdir(os.path.dirname(os.fspath(builder.data_dir)))) == 1  # one version, no leftovers


def test_preparation_lock_excludes_a_second_holder(tmp_path):
    """flock locks belong to open files, so two holders in one process exclude each other too."""
    builder = sources.DATASETS["folder"](
        folder_config(write_folder(tmp_path / "f", [(8, 8)] * 2), str(tmp_path)), str(tmp_path)
    )
    order, held = [], threading.Event()

    def first():
        with sources.preparation_lock(builder):
            held.set()
            time.sleep(0.5)
            order.append("first released")

    thread = threading.Thread(target=first)
    thread.start()
    held.wait()
    with sources.preparation_lock(builder):
        order.append("second acquired")
    thread.join()
    assert order == ["first released", "second acquired"]


def test_preparation_lock_gives_way_to_a_read_only_data_dir(tmp_path, monkeypatch):
    """A prepared dataset in a folder the user cannot write to is read without a lock."""
    root = write_folder(tmp_path / "ro", [(8, 8)] * 3)
    cfg = folder_config(root, str(tmp_path / "tfds"))
    sources.prepare(cfg)

    def read_only(*args, **kwargs):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(sources.os, "makedirs", read_only)
    assert len(sources.open_splits(cfg)["train"]) + len(sources.open_splits(cfg)["validation"]) == 3


def test_warp_crop_keeps_image_and_label_aligned():
    """A blocky image whose label is its block id: after crop + rotation + scale + elastic
    warping, labels (nearest) must agree with the block the warped image shows."""
    cfg = load_config("default").data.augment
    cfg.crop, cfg.rotate, cfg.scale_min, cfg.scale_max, cfg.elastic_alpha = 24, 30.0, 0.8, 1.25, 4.0
    blocks = np.kron(np.arange(16).reshape(4, 4), np.ones((12, 12), int))  # 48x48, 16 blocks
    image = (blocks * 16).astype(np.uint8)[..., None]
    for seed in range(5):
        out = augment.augment({"image": image, "label": blocks}, np.random.default_rng(seed), cfg)
        assert out["image"].shape == (24, 24, 1) and out["label"].shape == (24, 24)
        from_image = np.round(out["image"][..., 0] * 255 / 16)
        interior = np.abs(from_image - out["image"][..., 0] * 255 / 16) < 0.05  # away from block edges
        assert (from_image[interior] == out["label"][interior]).mean() > 0.97
        assert set(np.unique(out["label"])) <= set(range(16))


@pytest.mark.slow  # prepares the 30 real ISBI images (~8 s warm); CI runs it
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "isbi2012_membrane")), reason="shared data absent")
def test_isbi_config_builds_on_the_real_data(tfds_dir):
    cfg = load_config("isbi")
    cfg.data.tfds_dir = tfds_dir
    cfg.data.dir = os.path.join(SHARED_DATA, "isbi2012_membrane")
    splits = sources.open_splits(cfg.data)
    assert len(splits["train"]) == 25 and len(splits["validation"]) == 5
    ex = splits["validation"][0]
    assert ex["image"].shape == (512, 512, 1) and set(np.unique(ex["label"])) == {0, 1}
    membrane = np.mean([splits["train"][i]["label"].mean() for i in range(25)])
    assert 0.2 < membrane < 0.24  # README: 21.96 % membrane over all 30


@pytest.mark.slow  # ~22 s: prepares the 100 real DSB images
@pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "dsb2018_nuclei_subset")), reason="shared data absent")
def test_nuclei_config_builds_on_the_real_data(tfds_dir):
    cfg = load_config("nuclei")
    cfg.data.tfds_dir = tfds_dir
    cfg.data.dir = os.path.join(SHARED_DATA, "dsb2018_nuclei_subset")
    builder = sources.prepare(cfg.data)
    assert builder.info.splits["train"].num_examples == 81 and builder.info.splits["validation"].num_examples == 19
    assert "instances" in builder.info.features
    splits = sources.open_splits(cfg.data)
    assert splits["train"][0]["image"].shape == (256, 256, 3)
    # configs/nuclei.py:instances: instance maps ride along, resized with the labels (nearest)
    cfg = load_config("nuclei", "instances")
    cfg.data.tfds_dir, cfg.data.dir = tfds_dir, os.path.join(SHARED_DATA, "dsb2018_nuclei_subset")
    assert cfg.instances.enabled
    example = sources.open_splits(cfg.data, with_instances=True)["validation"][0]
    assert example["instances"].shape == example["label"].shape == (256, 256)
    np.testing.assert_array_equal(example["instances"] > 0, example["label"] == 1)
    assert len(np.unique(example["instances"])) > 3  # several nuclei
