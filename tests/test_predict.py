"""segjax.predict: masks for new image files from a trained run."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from segjax import instances, metrics, predict, rescore, runs, score_masks, train, workdirs
from segjax.data import sources
from segjax.errors import ConfigError, DataError, WorkdirError
from tests.conftest import ROOT, checkpoint_step_id, load_config


@pytest.fixture(scope="module")
def run(tfds_dir, tmp_path_factory):
    """A trained tiny run and its validation split (images and labels)."""
    config = load_config("tiny")
    config.data.tfds_dir = tfds_dir
    workdir = str(tmp_path_factory.mktemp("predict") / "run")
    train.train_and_evaluate(config, workdir)
    val = sources.open_splits(config.data)["validation"]
    return config, workdir, [val[i] for i in range(len(val))]


def write_images(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(os.path.join(folder, f"img{i:02d}.png"))
    return str(folder)


def test_masks_of_the_validation_images_score_what_evaluation_scores(run, tmp_path):
    """The masks written for the validation images, compared with their labels in numpy, give
    the accuracy that `--eval_only` computes from its confusion counts (same checkpoint, same
    flip TTA); the probabilities are a distribution whose argmax is the mask."""
    config, workdir, examples = run
    config = config.copy_and_resolve_references()
    config.eval.tta = "flip"
    images = write_images(tmp_path / "images", [e["image"] for e in examples])
    paths = predict.predict_folder(config, workdir, images, str(tmp_path / "out"), "latest", probabilities=True)
    assert [os.path.basename(p) for p in paths] == [f"img{i:02d}.png" for i in range(len(examples))]
    masks = [np.asarray(Image.open(p)) for p in paths]
    correct = sum(int((m == e["label"]).sum()) for m, e in zip(masks, examples, strict=True))
    accuracy = correct / sum(e["label"].size for e in examples)
    scored = rescore.evaluate_checkpoint(config, workdir, "latest")
    np.testing.assert_allclose(accuracy, scored["val/accuracy"], rtol=1e-9)
    assert len({int(v) for m in masks for v in np.unique(m)}) > 1  # not one class everywhere
    probs = np.load(os.path.join(tmp_path, "out", "img00.npy"))
    assert probs.dtype == np.float16 and probs.shape == (*masks[0].shape, config.data.num_classes)
    np.testing.assert_allclose(probs.astype(np.float32).sum(-1), 1.0, atol=2e-3)
    assert (np.argmax(probs, -1) == masks[0]).mean() > 0.99  # float16 rounding may tie a few pixels
    config.model.pool = "avg"  # the same parameter shapes, another network: refused, nothing written
    with pytest.raises(ConfigError, match=r"model\.pool"):
        predict.predict_folder(config, workdir, images, str(tmp_path / "avg"), "latest")
    assert not os.path.exists(tmp_path / "avg")


def lock_waiters(path) -> int:
    """How many processes or threads wait for the flock on `path` (Linux's /proc/locks '->' lines)."""
    st = os.stat(path)
    this_file = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    with open("/proc/locks", encoding="ascii") as f:
        return sum(line.split()[1] == "->" and line.split()[6] == this_file for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="waiting for a lock is read from Linux's /proc/locks")
def test_two_rescorings_of_one_run_take_turns(run):
    """A rescoring started while another holds the run's rescoring lock waits for it (seen in
    /proc/locks), `segjax.runs` names the holder, and the waiting one scores once it is let go:
    two rescorings at once would number and write the same eval_latest*.json files."""
    config, workdir, _ = run
    config = config.copy_and_resolve_references()
    path = os.path.join(workdir, workdirs.RESCORE_LOCK_FILE)
    held, release, result = threading.Event(), threading.Event(), {}

    def hold():
        with workdirs.rescore_lock(workdir, "another rescoring"):
            held.set()
            release.wait(300)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(60)
    worker = threading.Thread(target=lambda: result.update(rescore.evaluate_checkpoint(config, workdir, "latest")))
    try:
        worker.start()
        deadline = time.time() + 300
        while not lock_waiters(path):
            assert worker.is_alive(), "the rescoring ran without waiting for the lock"
            assert time.time() < deadline, "the rescoring never reached the lock"
            time.sleep(0.05)
        status = runs.describe(workdir)["status"]
        assert re.fullmatch(rf"finished; being rescored \(pid {os.getpid()} since .+, another rescoring\)", status)
        assert not result
    finally:
        released = time.time()
        release.set()
        holder.join(60)
        worker.join(300)
    assert result["checkpoint"] == "latest" and not lock_waiters(path)
    assert os.path.getmtime(os.path.join(workdir, "eval_latest.json")) >= released - 1e-3
    assert runs.describe(workdir)["status"] == "finished"


def test_other_sizes_come_back_at_their_own_size_and_bad_files_are_named(run, tmp_path, caplog):
    config, workdir, examples = run
    rng = np.random.default_rng(0)
    images = write_images(tmp_path / "images", [rng.integers(0, 256, (40, 24, 3), np.uint8), examples[0]["image"]])
    (tmp_path / "images" / "notes.txt").write_text("scanned on Tuesday")  # not an image type: skipped, named
    Image.fromarray(examples[1]["image"]).save(tmp_path / "images" / "IMG02.JPG")  # an image type in capitals
    write_images(tmp_path / "images" / "case7", [examples[2]["image"]])  # a subfolder: not read, named
    out = str(tmp_path / "out")
    config = config.copy_and_resolve_references()
    with caplog.at_level("WARNING"):
        paths = predict.predict_folder(config, workdir, images, out, "best")  # the text file was a DataError
    assert [os.path.basename(p) for p in paths] == ["IMG02.png", "img00.png", "img01.png"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "['notes.txt']" in warned and "1 subfolders" in warned and "['case7']" in warned
    os.remove(tmp_path / "images" / "IMG02.JPG")
    shutil.rmtree(out)
    paths = predict.predict_folder(config, workdir, images, out, "best")
    assert [np.asarray(Image.open(p)).shape for p in paths] == [(40, 24), (32, 32)]
    with pytest.raises(WorkdirError, match="2 outputs already exist"):
        predict.predict_folder(config, workdir, images, out, "best")
    config.data.resize = 32  # a resized run: predicted at 32 x 32, written at the file's 40 x 24
    resized = predict.predict_folder(config, workdir, images, out, "best", overwrite=True)
    assert np.asarray(Image.open(resized[0])).shape == (40, 24)

    bad = tmp_path / "bad"
    for name, write in [
        ("gray.png", lambda p: Image.fromarray(np.zeros((32, 32), np.uint8)).save(p)),
        ("deep.png", lambda p: Image.fromarray(np.zeros((32, 32), np.uint16)).save(p)),
        ("broken.png", lambda p: open(p, "wb").write(b"\x89PNG not really")),
    ]:
        os.makedirs(bad / name[:-4])
        write(bad / name[:-4] / name)
        with pytest.raises(DataError, match=rf"{name}: "):
            predict.predict_folder(config, workdir, str(bad / name[:-4]), str(tmp_path / "o"))
    with pytest.raises(WorkdirError, match="no run"):
        predict.predict_folder(config, str(tmp_path / "nothing"), images, str(tmp_path / "o2"))


def test_sizes_that_do_not_fit_the_depth_are_padded_even_in_the_first_file(run, tmp_path):
    """The state template was built from the first file's unpadded size: a folder whose first
    image is 30 x 22 (depth 2: multiples of 4) was refused as a size error. Its mask is the
    mask of the same image zero-padded to 32 x 24 by hand, cut back to 30 x 22."""
    config, workdir, _ = run
    odd = np.random.default_rng(1).integers(0, 256, (30, 22, 3), np.uint8)
    padded = np.zeros((32, 24, 3), np.uint8)
    padded[:30, :22] = odd
    masks = []
    for name, image in (("odd", odd), ("padded", padded)):
        images = write_images(tmp_path / name, [image])
        [path] = predict.predict_folder(
            config.copy_and_resolve_references(), workdir, images, str(tmp_path / f"{name}_out")
        )
        masks.append(np.asarray(Image.open(path)))
    assert masks[0].shape == (30, 22)
    np.testing.assert_array_equal(masks[0], masks[1][:30, :22])
    with pytest.raises(ConfigError, match=r"--seed=5: this run trained one seed, train\.seed=0"):
        predict.predict_folder(config, workdir, str(tmp_path / "odd"), str(tmp_path / "o"), seed=5)


def test_resume_keeps_whole_outputs_and_predicts_the_rest(run, tmp_path, monkeypatch, caplog):
    """A predict run that dies on its third file leaves two whole masks and no partial file;
    --resume never replaces a file (a marked mask, and the third file's probabilities written
    before the run died, stay as they are) and writes the others, equal to an uninterrupted run's."""
    config, workdir, examples = run
    config = config.copy_and_resolve_references()
    images = write_images(tmp_path / "images", [e["image"] for e in examples[:4]])
    reference = predict.predict_folder(config, workdir, images, str(tmp_path / "reference"), probabilities=True)
    out, original, calls = tmp_path / "out", predict.ImageFiles.save, {"n": 0}

    def dies_mid_write(self, index, mask, path):
        calls["n"] += 1
        if calls["n"] == 3:  # the write has begun when the run is stopped (not an Exception)
            (tmp_path / "out" / os.path.basename(path)).write_bytes(b"\x89PNG half a mask")
            raise KeyboardInterrupt
        original(self, index, mask, path)

    monkeypatch.setattr(predict.ImageFiles, "save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        predict.predict_folder(config, workdir, images, str(out), probabilities=True)
    monkeypatch.setattr(predict.ImageFiles, "save", original)
    made = ["environment.jsonl", "img00.npy", "img00.png", "img01.npy", "img01.png", "img02.npy"]
    assert sorted(os.listdir(out)) == made
    with pytest.raises(WorkdirError, match=r"5 outputs already exist .*--resume"):
        predict.predict_folder(config, workdir, images, str(out), probabilities=True)
    with pytest.raises(ConfigError, match="choose one"):
        predict.predict_folder(config, workdir, images, str(out), overwrite=True, resume=True)
    Image.fromarray(np.full((32, 32), 3, np.uint8)).save(out / "img00.png")  # kept as it is, not redone
    np.save(out / "img02.npy", np.zeros((1,), np.float16))  # img02's outputs are redone but this file is kept
    (out / ".partial-99999-img03.png").write_bytes(b"\x89PNG a write killed by SIGKILL")  # no cleanup ran
    with caplog.at_level("WARNING"):
        written = predict.predict_folder(config, workdir, images, str(out), probabilities=True, resume=True)
    assert "holds 1 hidden partial file(s) of writes that did not finish (e.g. .partial-99999-img03.png)" in caplog.text
    os.remove(out / ".partial-99999-img03.png")
    assert [os.path.basename(p) for p in written] == ["img02.png", "img03.png"]  # img02 had no mask yet
    assert sorted(os.listdir(out)) == sorted(os.listdir(tmp_path / "reference"))
    assert (np.asarray(Image.open(out / "img00.png")) == 3).all() and np.load(out / "img02.npy").shape == (1,)
    for name in ("img01", "img02", "img03"):
        np.testing.assert_array_equal(
            np.asarray(Image.open(out / f"{name}.png")), np.asarray(Image.open(reference[int(name[-1])]))
        )
        if name != "img02":
            np.testing.assert_array_equal(np.load(out / f"{name}.npy"), np.load(tmp_path / "reference" / f"{name}.npy"))
    assert predict.predict_folder(config, workdir, images, str(out), probabilities=True, resume=True) == []


def test_cli_refuses_to_replace_masks(run, tmp_path):
    config, workdir, examples = run
    images = write_images(tmp_path / "images", [examples[0]["image"]])
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "img00.png").write_bytes(b"a mask from before")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "segjax.predict",
            "--config=configs/tiny.py",
            f"--config.data.tfds_dir={config.data.tfds_dir}",
            f"--workdir={workdir}",
            f"--images={images}",
            f"--out={tmp_path / 'out'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "1 outputs already exist" in done.stderr
    assert (tmp_path / "out" / "img00.png").read_bytes() == b"a mask from before"
    (tmp_path / "a_file").write_bytes(b"notes")
    with pytest.raises(WorkdirError, match=r"--out=.*a_file is a file, not a folder"):  # was FileExistsError
        predict.predict_folder(config, workdir, str(images), str(tmp_path / "a_file"))


def test_16_bit_files_are_scaled_as_the_folder_builder_scales_them(tmp_path):
    """With data.folder.rescale, a 16-bit file is prepared as a training image would be."""
    cfg = load_config("default").data
    cfg.channels, cfg.folder.rescale = 1, "minmax"
    raw = np.random.default_rng(2).integers(1000, 40000, (12, 10)).astype(np.uint16)
    os.makedirs(tmp_path / "deep")
    Image.fromarray(raw).save(tmp_path / "deep" / "a.png")
    got = predict.ImageFiles(str(tmp_path / "deep"), cfg)[0]["image"][..., 0]
    x = raw.astype(np.float64)
    np.testing.assert_array_equal(got, np.rint((x - x.min()) / (x.max() - x.min()) * 255.0))


def test_instance_run_writes_instance_maps_that_score_the_evaluation_pq(tfds_dir, tmp_path):
    """A boundary-class run: the semantic masks and instance maps written for the validation
    images, scored here with the panoptic accumulator against the truth, give `val/pq`."""
    config = load_config("tiny")
    config.data.tfds_dir = tfds_dir
    config.instances.enabled = True
    config.model.base_features, config.train.steps, config.train.checkpoint_every = 8, 80, 80
    config.train.log_every, config.eval.every, config.optim.lr = 40, 80, 1e-2  # enough to find objects
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)
    val = sources.open_splits(config.data, with_instances=True)["validation"]
    examples = [val[i] for i in range(len(val))]
    images = write_images(tmp_path / "images", [e["image"] for e in examples])
    paths = predict.predict_folder(config, workdir, images, str(tmp_path / "out"), "latest")
    acc = metrics.PanopticAccumulator(config.data.num_classes)
    things = list(instances.thing_classes(config))
    for path, e in zip(paths, examples, strict=True):
        semantic = np.asarray(Image.open(path))
        ids = np.asarray(Image.open(path.replace(".png", "_instances.png")))
        assert ids.dtype == np.uint16 and semantic.max() < config.data.num_classes  # no boundary class left
        acc.update(e["label"], np.where(np.isin(e["label"], things), e["instances"], 0), semantic, ids)
    scored = rescore.evaluate_checkpoint(config, workdir, "latest")
    assert scored["val/pq"] > 0.05  # objects found: the comparison is not 0 == 0
    np.testing.assert_allclose(acc.result()["mpq"], scored["val/pq"], rtol=1e-9)
    # the same files scored by segjax.score_masks --instances (named as the split names its scenes)
    os.makedirs(tmp_path / "named")
    for i, path in enumerate(paths):
        shutil.copyfile(path, tmp_path / "named" / f"{i}.png")
        shutil.copyfile(path.replace(".png", "_instances.png"), tmp_path / "named" / f"{i}_instances.png")
    files = score_masks.score(config, str(tmp_path / "named"), str(tmp_path / "s.json"), with_instances=True)
    for key in ("val/pq", "val/sq", "val/rq"):  # (the run's mIoU counts its boundary class: the files have none)
        np.testing.assert_allclose(files[key], scored[key], rtol=1e-6, err_msg=key)
    os.remove(tmp_path / "named" / "3_instances.png")
    with pytest.raises(DataError, match=r"has no instance map for 1 of the 12 validation images, e.g. \['3'\]"):
        score_masks.score(
            config, str(tmp_path / "named"), str(tmp_path / "s.json"), overwrite=True, with_instances=True
        )


def test_a_folder_without_the_checkpoint_is_refused_before_data_is_read(run, tmp_path, monkeypatch):
    """A mistyped --workdir, or a run with no `best` checkpoint yet, is named before a file is
    read or a dataset prepared (predict read every image first, then said there was no run)."""
    config, workdir, _ = run
    os.makedirs(tmp_path / "images")
    (tmp_path / "images" / "notes.txt").write_text("not an image")  # would be a DataError if read
    with pytest.raises(WorkdirError, match="holds no run"):
        predict.predict_folder(config, str(tmp_path / "nowhere"), str(tmp_path / "images"), str(tmp_path / "o"))
    partial = tmp_path / "partial"  # trained, killed before its first evaluation: latest but no best
    os.makedirs(partial / "best")
    os.symlink(os.path.join(workdir, "checkpoints"), partial / "checkpoints")
    with pytest.raises(WorkdirError, match=r"has no best checkpoint yet"):
        predict.predict_folder(config, str(partial), str(tmp_path / "images"), str(tmp_path / "o"))

    def no_data(*args, **kwargs):
        raise AssertionError("the dataset was opened")

    monkeypatch.setattr(sources, "open_splits", no_data)
    with pytest.raises(WorkdirError, match="has no best checkpoint yet"):
        rescore.evaluate_checkpoint(config, str(partial), "best")


def test_files_that_would_write_the_same_mask_are_refused(tmp_path):
    os.makedirs(tmp_path / "twice")
    for ext in ("png", "tif"):
        Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "twice" / f"a.{ext}")
    with pytest.raises(DataError, match=r"share the names \['a'\]"):
        predict.ImageFiles(str(tmp_path / "twice"), load_config("default").data)


def test_shards_split_a_folder_between_processes(run, tmp_path):
    """`--shard=i/N`: N processes writing into one folder produce the files of one unsharded
    run (every file once, the same masks); a shard with no file writes nothing; a bad shard and a
    malformed flag are clear errors."""
    config, workdir, examples = run
    config = config.copy_and_resolve_references()
    images = write_images(tmp_path / "images", [e["image"] for e in examples[:5]])
    whole = predict.predict_folder(config, workdir, images, str(tmp_path / "whole"), "latest")
    out = str(tmp_path / "sharded")
    parts = [predict.predict_folder(config, workdir, images, out, "latest", shard=(i, 2)) for i in range(2)]
    assert [os.path.basename(p) for p in parts[0]] == ["img00.png", "img02.png", "img04.png"]
    assert sorted(os.listdir(out)) == sorted(["environment.jsonl", *(os.path.basename(p) for p in whole)])
    with open(os.path.join(out, "environment.jsonl"), encoding="utf-8") as f:  # what made them: a line per shard
        starts = [json.loads(line) for line in f]
    step = json.loads((tmp_path / "whole" / "environment.jsonl").read_text())["step"]
    named = checkpoint_step_id(os.path.join(workdir, "checkpoints", str(step)))  # its files' contents
    assert [(e["what"], e["run"], e["checkpoint"], e["step"], e["checkpoint_id"], e["shard"]) for e in starts] == [
        ("predict", os.path.abspath(workdir), "latest", step, named, f"{i}/2") for i in range(2)
    ]
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        assert step == json.load(f)["step"]  # the latest checkpoint is the run's last step
    for path in whole:
        a, b = np.asarray(Image.open(path)), np.asarray(Image.open(os.path.join(out, os.path.basename(path))))
        assert (a == b).mean() > 0.999  # batches of another size may round a tied pixel differently
    assert predict.predict_folder(config, workdir, images, str(tmp_path / "none"), "latest", shard=(5, 6)) == []
    with pytest.raises(ConfigError, match=r"--shard=2/2: needs 0 <= i < N"):
        predict.predict_folder(config, workdir, images, out, "latest", shard=(2, 2))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "segjax.predict",
            f"--workdir={workdir}",
            f"--images={images}",
            f"--out={out}",
            "--shard=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and "--shard=1: write i/N, e.g. 0/4" in done.stderr
