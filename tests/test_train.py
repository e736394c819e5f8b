"""End to end on the tiny config: outputs, resume, exact resume, workdir safety, bad input."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from segjax import checkpointing, configuration, evaluate, preflight, rescore, study, train, workdirs
from segjax.data import pipeline
from segjax.errors import BusyError, ConfigError, NonFiniteLossError, WorkdirError
from tests.conftest import ROOT, assert_trees_equal, load_config


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_tiny_run_writes_outputs_and_resumes_finished_run(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(tiny_config, workdir)
    assert final["step"] == tiny_config.train.steps
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        saved = json.load(f)
    for key in ("step", "train/loss", "val/miou", "val/mdice", "val/accuracy", "params", "flops"):
        assert key in saved, key
    assert saved["flops"] > 2 * saved["params"]  # each conv weight multiplies at every output pixel
    for name in tiny_config.data.class_names:
        assert f"val/iou/{name}" in saved and f"val/dice/{name}" in saved
    assert saved["val/pixels"] == tiny_config.data.synthetic.num_val * 32 * 32
    assert saved["val/images"] == tiny_config.data.synthetic.num_val
    assert saved["val/mbiou"] is not None and 0.0 <= saved["val/mbiou"] <= 1.0  # boundary IoU is computed
    assert 0.0 <= saved["val/accuracy"] <= 1.0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]
    assert os.listdir(os.path.join(workdir, "best"))
    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
        assert json.load(f) == json.loads(configuration.to_json(tiny_config))
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    for folder, _, files in os.walk(workdir):  # nothing the run wrote is a pickle (safe to load)
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                head = f.read(2)
            assert not (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), name
    train_rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    # each validation image's scores: every image once, and they add up to the split's accuracy
    with open(os.path.join(workdir, "val_per_image.csv"), encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    num_val = tiny_config.data.synthetic.num_val
    assert [int(r["index"]) for r in table] == list(range(num_val))
    assert all(int(r["pixels"]) == 32 * 32 for r in table)
    per_image_accuracy = np.array([float(r["accuracy"]) for r in table])
    np.testing.assert_allclose(per_image_accuracy.mean(), saved["val/accuracy"], rtol=1e-6)

    again = train.train_and_evaluate(tiny_config, workdir)  # same workdir: resumes at step 6, trains nothing
    assert again["step"] == 6
    rows = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
    assert len(rows) == 3
    np.testing.assert_allclose(again["val/miou"], saved["val/miou"], rtol=1e-6)

    # --eval_only: the latest checkpoint scored again gives the run's own numbers; other eval
    # settings (mirroring TTA) go to eval_latest.json and leave metrics.json alone
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        before = json.load(f)
    rescored = rescore.evaluate_checkpoint(tiny_config, workdir, "latest")
    assert rescored["step"] == 6
    for key in ("val/miou", "val/mdice", "val/accuracy", "val/loss"):
        np.testing.assert_allclose(rescored[key], saved[key], rtol=1e-6, err_msg=key)
    with open(os.path.join(workdir, "eval_latest_per_image.csv"), encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == table
    tiny_config.eval.tta = "flip"
    flipped = rescore.evaluate_checkpoint(tiny_config, workdir, "latest")
    assert flipped["val/pixels"] == saved["val/pixels"] and flipped["val/miou"] != saved["val/miou"]
    with open(os.path.join(workdir, "eval_latest.json"), encoding="utf-8") as f:
        written = json.load(f)
    assert written["eval_settings"]["tta"] == "flip" and written["config_differences"] == ["eval.tta"]
    # every result file states how its scores were computed (it was metrics.json alone)
    assert written["metrics_convention"] == saved["metrics_convention"] == evaluate.convention(tiny_config)
    assert rescored["config_differences"] == []
    # the first rescoring's pair of files is kept under a number, not overwritten
    with open(os.path.join(workdir, "eval_latest.1.json"), encoding="utf-8") as f:
        earlier = json.load(f)
    assert earlier["eval_settings"]["tta"] == "none" and earlier["val/miou"] == rescored["val/miou"]
    with open(os.path.join(workdir, "eval_latest_per_image.1.csv"), encoding="utf-8") as f:
        assert list(csv.DictReader(f)) == table
    rescore.evaluate_checkpoint(tiny_config, workdir, "latest")  # a third: the next number
    assert sorted(n for n in os.listdir(workdir) if n.startswith("eval_latest")) == [
        "eval_latest.1.json",
        "eval_latest.2.json",
        "eval_latest.json",
        "eval_latest_confusion.1.csv",  # the split's confusion matrix is kept with its rescoring
        "eval_latest_confusion.2.csv",
        "eval_latest_confusion.csv",
        "eval_latest_per_image.1.csv",
        "eval_latest_per_image.2.csv",
        "eval_latest_per_image.csv",
    ]
    with open(os.path.join(workdir, "metrics.json"), encoding="utf-8") as f:
        assert json.load(f) == before
    with pytest.raises(WorkdirError, match="no run"):
        rescore.evaluate_checkpoint(tiny_config, str(tmp_path / "empty"), "best")
    # another network with the same parameter shapes (average pooling) is refused, not scored
    tiny_config.model.pool = "avg"
    with pytest.raises(ConfigError, match=r"other model settings \(model\.pool\)"):
        rescore.evaluate_checkpoint(tiny_config, workdir, "latest")


def _final_params(config, workdir):
    model_state = None
    train.train_and_evaluate(config, workdir, allow_config_changes=True)
    ckpt = checkpointing.Checkpointer(workdir, 2)
    template = _template(config)
    model_state, data_state = ckpt.restore(template)
    ckpt.close()
    return model_state, data_state


def _template(config):
    from segjax import state
    from segjax.models import build_model

    model = build_model(config.model, config.data.num_classes)
    sample = np.zeros((1, 32, 32, 3), np.float32)
    return state.create(model, train.make_tx(config, model), sample, config.train.seed)


@pytest.mark.parametrize("kwargs", [{}, {"method": "classify"}], ids=["segment", "classify"])
def test_initial_state_is_eager_flax_init_bit_for_bit(tiny_config, kwargs):
    """`state.create` compiles the initialisation as one program: it must give exactly what eager
    `model.init` and `tx.init` give (same threefry bits, same initializer arithmetic), for the
    segmentation network and the pretraining classifier, weight average included."""
    from segjax import optim, state
    from segjax.models import build_model

    tiny_config.optim.ema_decay = 0.5  # the optimizer state then holds the BatchNorm statistics too
    model = build_model(tiny_config.model, tiny_config.data.num_classes)
    tx = train.make_tx(tiny_config, model)
    sample = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    seed = 2**32 + 5  # a seed beyond int32 works as it did eagerly
    got = state.create(model, tx, sample, seed, **kwargs)
    init_rng, state_rng = jax.random.split(jax.random.PRNGKey(seed))  # eager, op by op (jax.random's own jits)
    variables = model.init({"params": init_rng}, sample, train=False, **kwargs)
    stats = variables.get("batch_stats", {})
    want = (variables["params"], stats, optim.init(tx, variables["params"], stats), state_rng)
    got = (got.params, got.batch_stats, got.opt_state, got.rng)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    assert stats and len(jax.tree_util.tree_leaves(got)) > 20
    assert_trees_equal(got, want, rtol=0, atol=0)


def test_window_means_leave_out_skipped_steps_per_replica():
    """Hand-computed: two replicas over three steps; replica 1's second step is non-finite."""
    nan = float("nan")
    outputs = [
        {"loss": np.array([1.0, 2.0]), "finite": np.array([True, True])},
        {"loss": np.array([3.0, nan]), "finite": np.array([True, False])},
        {"loss": np.array([5.0, 6.0]), "finite": np.array([True, True])},
    ]
    means = train.window_means(outputs)
    np.testing.assert_allclose(means["loss"], [3.0, 4.0])
    assert means["nonfinite_steps"] == 1
    only_bad = train.window_means([{"loss": np.float32(nan), "finite": np.bool_(False)}])
    assert np.isnan(only_bad["loss"]) and only_bad["nonfinite_steps"] == 1


def test_logged_training_metrics_are_means_over_the_logging_window(tiny_config, tmp_path):
    """A row every 3 steps holds the mean of the 3 per-step values a row every step logs (the
    same training: logging does not change it), not the last step's value."""
    per_step = {}
    for every in (1, 3):
        tiny_config.train.log_every = every
        train.train_and_evaluate(tiny_config, str(tmp_path / f"every{every}"))
        rows = [r for r in read_jsonl(tmp_path / f"every{every}" / "metrics.jsonl") if "train/loss" in r]
        per_step[every] = {r["step"]: r for r in rows}
    assert sorted(per_step[1]) == [1, 2, 3, 4, 5, 6] and sorted(per_step[3]) == [3, 6]
    for end in (3, 6):
        for key in ("train/loss", "train/grad_norm", "train/loss_ce", "train/loss_dice"):
            want = np.mean([per_step[1][s][key] for s in range(end - 2, end + 1)])
            np.testing.assert_allclose(per_step[3][end][key], want, rtol=1e-6, err_msg=f"{key} at {end}")
            assert per_step[3][end][key] != pytest.approx(per_step[1][end][key], rel=1e-4)  # not the last step's
        assert per_step[3][end]["train/nonfinite_steps"] == 0


@pytest.mark.slow  # two runs and a resume (~15 s warm); CI runs it
def test_resume_in_the_middle_is_exact(tiny_config, tmp_path):
    """3 steps, stop, resume to 6 == 6 uninterrupted steps: params, optimizer (with the weight
    average), RNG, data position."""
    tiny_config.optim.schedule = "constant"  # the schedule must not depend on where we stop
    tiny_config.model.dropout = 0.1  # makes the RNG state matter
    tiny_config.optim.ema_decay = 0.5
    straight, straight_data = _final_params(tiny_config, str(tmp_path / "straight"))
    tiny_config.train.steps = 3
    train.train_and_evaluate(tiny_config, str(tmp_path / "resumed"))
    tiny_config.train.steps = 6
    resumed, resumed_data = _final_params(tiny_config, str(tmp_path / "resumed"))
    assert int(resumed.step) == int(straight.step) == 6
    assert resumed_data == straight_data
    for a, b in zip(jax.tree_util.tree_leaves(straight), jax.tree_util.tree_leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_different_config_in_same_workdir_is_refused(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(configuration.to_json(tiny_config))
    marker = os.path.join(workdir, "metrics.json")
    with open(marker, "w", encoding="utf-8") as f:
        f.write("{}")
    tiny_config.model.depth = 1
    with pytest.raises(WorkdirError, match=r"differs in: model.depth"):
        workdirs.prepare(tiny_config, workdir, overwrite=False, allow_config_changes=False)
    assert os.path.exists(marker)  # nothing touched
    workdirs.prepare(tiny_config, workdir, overwrite=True, allow_config_changes=False)
    moved = [p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]
    assert len(moved) == 1 and os.path.exists(os.path.join(tmp_path, moved[0], "metrics.json"))


def test_a_start_that_saved_nothing_does_not_block_the_corrected_command(tiny_config, tmp_path):
    """A run stopped by a check after its config was written (here a crop larger than the
    images, known once the data is read) saved nothing: the corrected command trains there, the
    first config kept beside it; a folder with a checkpoint step or a log line is still refused,
    by training and by a study."""
    workdir = str(tmp_path / "run")
    tiny_config.data.augment.crop = 64
    with pytest.raises(ConfigError, match="larger than the image"):
        train.train_and_evaluate(tiny_config, workdir)
    assert workdirs.saved_nothing(workdir)
    tiny_config.data.augment.crop, tiny_config.train.steps = 0, 2
    train.train_and_evaluate(tiny_config, workdir)  # was: "holds a run with a different config"
    backups = [n for n in os.listdir(workdir) if n.startswith("config.before-")]
    with open(os.path.join(workdir, backups[0]), encoding="utf-8") as f:
        assert len(backups) == 1 and json.load(f)["data"]["augment"]["crop"] == 64
    assert not workdirs.saved_nothing(workdir)
    tiny_config.model.depth = 1
    with pytest.raises(WorkdirError, match=r"differs in: model.depth"):
        workdirs.prepare(tiny_config, workdir, overwrite=False, allow_config_changes=False)
    logged, saved, pretrained = tmp_path / "logged", tmp_path / "saved", tmp_path / "pretrained"
    os.makedirs(logged)
    (logged / "metrics.jsonl").touch()
    os.makedirs(saved / "best" / "7")
    os.makedirs(pretrained / "pretrain" / "checkpoints" / "4")  # the encoder's stage saved, the main one not yet
    for other in (logged, saved, pretrained):
        (other / "config.json").write_text(configuration.to_json(load_config("tiny")))
        assert not workdirs.saved_nothing(str(other))
        with pytest.raises(WorkdirError, match=r"differs in: .*model.depth"):
            workdirs.prepare(tiny_config, str(other), overwrite=False, allow_config_changes=False)
    unused = tmp_path / "study" / "a" / "seed_0"  # a study's run folder whose first start failed
    os.makedirs(unused)
    (unused / "config.json").write_text(configuration.to_json(load_config("tiny")))
    base = load_config("tiny")
    base.data.tfds_dir = tiny_config.data.tfds_dir
    study.planned_runs(base, {"a": {"model.depth": 1}}, [0], str(tmp_path / "study"))  # not refused
    (unused / "metrics.jsonl").touch()
    with pytest.raises(WorkdirError, match="another config than variant 'a'"):
        study.planned_runs(base, {"a": {"model.depth": 1}}, [0], str(tmp_path / "study"))


def test_second_run_in_a_busy_workdir_stops_before_touching_it(tiny_config, tmp_path):
    """Two trainers in one folder would interleave checkpoints and logs: the second one stops
    with BusyError naming the holder, and with --overwrite the busy run is not moved aside."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(configuration.to_json(tiny_config))
    with workdirs.lock(workdir):  # the first run, still training
        with pytest.raises(BusyError, match=rf"workdir {re.escape(workdir)} is in use by pid {os.getpid()} since"):
            train.train_and_evaluate(tiny_config, workdir)
        tiny_config.model.depth = 1
        with pytest.raises(BusyError):
            train.train_and_evaluate(tiny_config, workdir, overwrite=True)
    assert os.listdir(tmp_path) == ["run"]  # not moved aside
    assert sorted(os.listdir(workdir)) == [workdirs.LOCK_FILE, "config.json"]  # nothing else written


def test_overwrite_locks_the_fresh_workdir(tiny_config, tmp_path):
    """--overwrite moves the old run (and the lock file in it) aside; the new folder is locked again."""
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        f.write(configuration.to_json(tiny_config))
    open(os.path.join(workdir, "metrics.jsonl"), "w").close()  # a run that logged
    tiny_config.model.depth = 1
    with contextlib.ExitStack() as held:
        held.enter_context(workdirs.lock(workdir))
        workdirs.prepare(tiny_config, workdir, overwrite=True, allow_config_changes=False, held=held)
        assert len([p for p in os.listdir(tmp_path) if p.startswith("run.replaced-")]) == 1
        with pytest.raises(BusyError), workdirs.lock(workdir):
            pass
    with workdirs.lock(workdir):  # released with the run
        pass


def test_run_saved_before_a_field_existed_resumes_unless_the_field_is_set(tiny_config, tmp_path):
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    old = tiny_config.to_dict()
    del old["instances"], old["pretrain"]  # fields added in a later version of segjax
    with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(old, f, default=list)
    os.makedirs(os.path.join(workdir, "checkpoints", "5"))  # a run that saved a step
    workdirs.prepare(tiny_config, workdir, overwrite=False, allow_config_changes=False)  # defaults: fine
    tiny_config.pretrain.steps = 5
    with pytest.raises(WorkdirError, match=r"differs in: pretrain.steps"):
        workdirs.prepare(tiny_config, workdir, overwrite=False, allow_config_changes=False)


@pytest.mark.parametrize("mode", ["min", "max"])
def test_best_checkpoint_is_the_extreme_of_train_best_metric(tiny_config, tmp_path, mode):
    """best/ holds the evaluated step with the lowest (or, the other way round, highest) val/loss
    of the six logged evaluations."""
    tiny_config.train.best_metric, tiny_config.train.best_mode = "val/loss", mode
    tiny_config.eval.every = 1
    workdir = tmp_path / mode
    train.train_and_evaluate(tiny_config, str(workdir))
    logged = {r["step"]: r["val/loss"] for r in read_jsonl(workdir / "metrics.jsonl") if "val/loss" in r}
    assert sorted(logged) == [1, 2, 3, 4, 5, 6] and len(set(logged.values())) == 6  # no ties
    want = (min if mode == "min" else max)(logged, key=logged.get)
    assert os.listdir(workdir / "best") == [str(want)]


@pytest.mark.parametrize(
    ("metric", "mode", "pattern"),
    [
        (
            "val/dice/sky",
            "max",
            r"train.best_metric='val/dice/sky' is not a validation score; choose one of .*'val/dice/",
        ),
        ("miou", "max", r"'miou' is not a validation score; choose one of .*'val/miou'"),
        ("val/loss", "lowest", r"train.best_mode='lowest'; choose one of \['max', 'min'\]"),
    ],
)
def test_best_metric_that_evaluation_cannot_give_is_refused_before_training(tiny_config, metric, mode, pattern):
    tiny_config.train.best_metric, tiny_config.train.best_mode = metric, mode
    with pytest.raises(ConfigError, match=pattern):
        preflight.check(tiny_config)


def test_unknown_and_mistyped_config_keys(tiny_config):
    with tiny_config.unlocked():
        tiny_config.train.stpes = 5
    with pytest.raises(ConfigError, match=r"unknown config key train.stpes; did you mean train.steps\?"):
        configuration.validate(tiny_config)
    del tiny_config.train["stpes"]
    configuration.validate(tiny_config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"optim.lr": -1e-3}, r"optim.lr=-0.001 must be > 0"),  # trained uphill, silently
        ({"loss.dice_weight": -1.0}, r"loss.dice_weight=-1.0 must be >= 0"),
        ({"model.dropout": 1.0}, r"model.dropout=1.0 must be in \[0, 1\)"),
        ({"model.kernel_size": 4}, r"model.kernel_size=4 must be odd"),
        ({"data.num_classes": 1, "data.class_names": ("a",)}, r"data.num_classes=1 must be >= 2"),
        ({"data.folder.num_folds": 1}, r"num_folds=1 must be 0 \(off\) or >= 2"),  # everything validation
        ({"data.augment.scale_min": 1.2}, r"scale_min=1.2 is larger than data.augment.scale_max=1.0"),
        ({"baseline.edge_sigma": -1.0}, r"baseline.edge_sigma=-1.0 must be >= 0"),  # a scikit-image traceback
        ({"data.synthetic.num_train": 0}, r"data.synthetic.num_train=0 must be >= 1"),  # a TFDS traceback
        ({"data.synthetic3d.num_val": 0}, r"data.synthetic3d.num_val=0 must be >= 1"),
    ],
)
def test_numbers_a_run_cannot_use_are_refused(tiny_config, overrides, message):
    for key, value in overrides.items():
        section, *path, field = key.split(".")
        node = tiny_config[section]
        for part in path:
            node = node[part]
        node[field] = value
    with pytest.raises(ConfigError, match=message):
        configuration.validate(tiny_config)


def test_non_finite_loss_stops_and_names_the_step(tiny_config, tmp_path, monkeypatch):
    original = pipeline.to_model_batch

    def poisoned(batch, ignore_label):
        out = original(batch, ignore_label)
        out["image"] = out["image"] * np.nan
        return out

    monkeypatch.setattr(pipeline, "to_model_batch", poisoned)
    with pytest.raises(NonFiniteLossError, match="non-finite loss/gradient at step 0"):
        train.train_and_evaluate(tiny_config, str(tmp_path / "nan"))
    assert not os.path.exists(tmp_path / "nan" / "checkpoints" / "3")


def run_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "segjax.main", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("--config.model.arch=resnet", "error: unknown model.arch='resnet'; valid architectures"),
        ("--config.data.synthetic.image_size=30", "pad or crop 30 to 32"),
        ("--config.train.batch_size=3", None),
        ("--config.eval.every=0", "error: eval.every=0 must be >= 1"),  # was a ZeroDivisionError traceback
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, tfds_dir, override, message):
    result = run_cli(
        "--config=configs/tiny.py", f"--workdir={tmp_path / 'w'}", f"--config.data.tfds_dir={tfds_dir}", override
    )
    if message is None:  # batch 3 on 1 device is fine; the CLI trains
        assert result.returncode == 0, result.stderr[-2000:]
        return
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--config=configs/tiny.py", "--config.train.stpes=3"],
            "error: --config.train.stpes: unknown config key train.stpes; did you mean train.steps?",
        ),
        (["--config", "configs/tiny.py", "--noconfig.data.cachex"], "unknown config key data.cachex; did you mean"),
        (["--config=configs/tiny.py:small"], "--config=configs/tiny.py:small: configs/tiny.py takes no argument"),
        (["--config=configs/tiny2.py"], "no such config file 'configs/tiny2.py'"),
        (["--config=configs/tiny.py", "--eval_split=test"], "error: --eval_split=test scores a saved checkpoint: add"),
    ],
)
def test_cli_bad_config_flags_are_one_line(tmp_path, args, message):
    """What ml_collections' config flag would end in a traceback on (or silently ignore: an
    argument to a config file without variants) is one line, before anything is set up."""
    result = run_cli(*args, f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr and "Traceback" not in result.stderr


def test_flagfile_contents_are_checked_as_the_command_line(tmp_path):
    """A launch script's `--flagfile` (comments, a nested flagfile) is read as absl reads it: a
    mistyped key inside is the same one-line error, and so is a flagfile that is not there."""
    (tmp_path / "inner.cfg").write_text("// nested\n--config.train.stpes=3\n")
    outer = tmp_path / "outer.cfg"
    outer.write_text(f"# launch flags\n--config=configs/tiny.py\n\n--flagfile={tmp_path / 'inner.cfg'}\n")
    result = run_cli(f"--flagfile={outer}", f"--workdir={tmp_path / 'w'}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "error: --config.train.stpes: unknown config key train.stpes; did you mean train.steps?" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()
    with pytest.raises(ConfigError, match=r"--flagfile: .*missing.cfg"):
        configuration.check_command_line([f"--flagfile={tmp_path / 'missing.cfg'}"], None)
    (tmp_path / "inner.cfg").write_text("--config.train.steps=3\n")
    configuration.check_command_line([f"--flagfile={outer}"], None)  # valid contents pass
    assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
    "program",
    [
        ["segjax.main", "--config=configs/tiny.py"],
        ["segjax.baselines", "--config=configs/tiny.py"],
        ["segjax.study", "--study=configs/studies/unet_ablations.py:skips"],
    ],
)
def test_a_workdir_that_is_a_file_is_one_line(tmp_path, program):
    (tmp_path / "taken").write_text("notes")
    module, *args = program
    result = subprocess.run(
        [sys.executable, "-m", module, *args, f"--workdir={tmp_path / 'taken'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]  # was a FileExistsError traceback
    assert f"--workdir={tmp_path / 'taken'} is a file, not a folder" in result.stderr
    assert (tmp_path / "taken").read_text() == "notes"


@pytest.mark.parametrize(
    "program",
    [
        ["segjax.main", f"--config={ROOT}/configs/tiny.py", "--workdir=gs://bucket/run"],
        ["segjax.main", f"--config={ROOT}/configs/tiny.py", "--workdir=gs://bucket/run", "--eval_only=best"],
        ["segjax.baselines", f"--config={ROOT}/configs/tiny.py", "--workdir=gs://bucket/run"],
        ["segjax.study", f"--study={ROOT}/configs/studies/unet_ablations.py:skips", "--workdir=gs://bucket/run"],
        ["segjax.predict", f"--config={ROOT}/configs/tiny.py", "--workdir=runs/a", "--images=.", "--out=gs://b/m"],
    ],
)
def test_a_url_as_a_folder_is_one_line(tmp_path, program):
    """Run folders are written through the filesystem: a gs:// workdir made a local `gs:` folder
    (config.json, checkpoints) while tensorboardX tried the bucket, and failed with a traceback."""
    module, *args = program
    result = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    flag = "--out=gs://b/m" if module == "segjax.predict" else "--workdir=gs://bucket/run"
    assert f"{flag} is a URL" in result.stderr
    assert os.listdir(tmp_path) == []  # nothing written locally


def test_config_files_without_variants_refuse_an_argument():
    for name in sorted(os.listdir(os.path.join(ROOT, "configs"))):
        if not name.endswith(".py") or name == "saved.py":  # saved.py reads its argument (test_saved_config)
            continue
        configuration.validate(load_config(name[:-3]))  # no argument: loads, and its values are valid
        with pytest.raises(ValueError, match=f"configs/{name} takes no argument"):
            load_config(name[:-3], "smal")
    assert load_config("nuclei", "instances").instances.enabled


def test_programs_leave_out_the_libraries_info_and_tfds_builder_warnings(tmp_path, tfds_dir):
    """segjax.main filtered the libraries' INFO; baselines, predict, label_stats and study printed
    all of it (TPU probing, orbax, TFDS), and every program TFDS's "Using custom data
    configuration" warning once per builder made (three per start). Own INFO and library
    warnings stay."""
    import logging as std_logging

    def record(path, level, msg):
        return std_logging.LogRecord("absl", level, path, 1, msg, None, None)

    quiet = configuration._QuietLibraries()
    tfds_file = "/x/tensorflow_datasets/core/dataset_builder.py"
    assert not quiet.filter(record(tfds_file, std_logging.WARNING, "Using custom data configuration: X"))
    assert quiet.filter(record(tfds_file, std_logging.WARNING, "Something else"))
    assert not quiet.filter(record("/x/jax/_src/xla_bridge.py", std_logging.INFO, "Unable to initialize backend"))
    assert quiet.filter(record("/x/segjax/data/sources.py", std_logging.INFO, "train class histogram"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "segjax.baselines",
            "--config=configs/tiny.py",
            f"--workdir={tmp_path / 'b'}",
            f"--config.data.tfds_dir={tfds_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "scoring baseline otsu on 12 images of synthetic_shapes/validation" in done.stderr
    assert "Using custom data configuration" not in done.stderr and "xla_bridge.py" not in done.stderr
