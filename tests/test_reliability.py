"""Preemption and crashes through the real CLI, checkpoint safety, and bad-input handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from segjax import checkpointing, optim, parallel, state, train
from segjax.data import pipeline
from segjax.errors import CheckpointError, ConfigError, NonFiniteLossError
from segjax.models import build_model
from tests.conftest import ROOT, load_config, tiny_cli

STEPS = 300  # long enough to kill mid-run, short enough for the suite
OVERRIDES = [
    f"--config.train.steps={STEPS}",
    "--config.train.checkpoint_every=40",
    "--config.train.log_every=20",
    "--config.eval.every=1000",
    "--config.model.dropout=0.1",
]


def cli(workdir, tfds_dir, *extra):
    return tiny_cli(workdir, tfds_dir, *OVERRIDES, *extra)


def final_state(workdir, step=None):
    """Restore the latest checkpoint of a tiny-config run (template built independently)."""
    config = load_config("tiny")
    model = build_model(config.model, config.data.num_classes)
    template = state.create(model, optim.build(config.optim, STEPS), np.zeros((1, 32, 32, 3), np.float32), 0)
    ckpt = checkpointing.Checkpointer(str(workdir), 2)
    try:
        return ckpt.restore(template, step)
    finally:
        ckpt.close()


def assert_same_state(a, b):
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def wait_for_checkpoint(workdir, proc, timeout=240):
    folder = os.path.join(workdir, "checkpoints")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.isdir(folder) and any(d.isdigit() for d in os.listdir(folder)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
        time.sleep(0.01)
    pytest.fail("no checkpoint appeared")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tfds_dir):
    """The uninterrupted run every interrupted one must reproduce exactly."""
    workdir = tmp_path_factory.mktemp("reference")
    done = subprocess.run(cli(workdir, tfds_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return final_state(workdir)


@pytest.mark.slow  # three CLI runs each (~2 min on 2 cores); CI runs them (.ci/run)
def test_sigkill_after_a_checkpoint_then_resume_is_bitwise_exact(reference_run, tmp_path, tfds_dir):
    workdir = tmp_path / "killed"
    proc = subprocess.Popen(cli(workdir, tfds_dir), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(workdir, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = subprocess.run(cli(workdir, tfds_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr
    resumed, data_state = final_state(workdir)
    reference, reference_data = reference_run
    assert int(resumed.step) == STEPS
    assert data_state == reference_data
    assert_same_state(resumed, reference)


CRASH_DURING_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from segjax import checkpointing, main
    original = checkpointing.Checkpointer.save
    def save_then_die(self, step, state, data_state):
        original(self, step, state, data_state)   # asynchronous: the write is still in flight
        if step == 80:
            os.kill(os.getpid(), signal.SIGKILL)
    checkpointing.Checkpointer.save = save_then_die
    sys.argv = ["segjax.main"] + sys.argv[1:]
    main.run()
    """
)


@pytest.mark.slow  # three CLI runs each (~2 min on 2 cores); CI runs them (.ci/run)
def test_crash_during_a_checkpoint_save_keeps_the_previous_one(reference_run, tmp_path, tfds_dir):
    workdir = tmp_path / "crash"
    args = cli(workdir, tfds_dir)[3:]
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_DURING_SAVE, *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert crashed.returncode == -signal.SIGKILL
    steps = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    assert 40 in steps  # the previous checkpoint is intact ...
    restored, _ = final_state(workdir, 40)  # ... and restorable
    assert int(restored.step) == 40
    done = subprocess.run(cli(workdir, tfds_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    leftovers = [d for d in os.listdir(workdir / "checkpoints") if "tmp" in d]
    assert not leftovers
    assert_same_state(final_state(workdir)[0], reference_run[0])


@pytest.mark.slow  # three CLI runs each (~2 min on 2 cores); CI runs them (.ci/run)
def test_sigterm_saves_at_the_current_step_and_exits_cleanly(reference_run, tmp_path, tfds_dir):
    workdir = tmp_path / "term"
    proc = subprocess.Popen(cli(workdir, tfds_dir), cwd=ROOT, stderr=subprocess.PIPE, text=True)
    wait_for_checkpoint(workdir, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    saved = sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit())
    if saved[-1] < STEPS:  # the signal arrived before the run ended (the usual case)
        assert "SIGTERM: saved a checkpoint at step" in stderr
        assert not os.path.exists(workdir / "metrics.json")
    done = subprocess.run(cli(workdir, tfds_dir), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_state(final_state(workdir)[0], reference_run[0])


@pytest.mark.parametrize("first_step,private_module", [(False, True), (True, True), (True, False)])
def test_sigterm_before_the_first_step_ends_the_process_at_once(first_step, private_module):
    """Before the first training step there is nothing to save: a SIGTERM during data preparation
    or compilation ends the process as it would without segjax (it used to prepare, compile, train
    a step and save it first). From the first step on it is a request to save and stop, also with
    a JAX whose private coordination module moved."""
    hide = "" if private_module else "del jax._src.distributed; sys.modules['jax._src.distributed'] = None"
    script = textwrap.dedent(f"""
        import os, signal, sys, time
        import jax._src
        {hide}
        from segjax import preemption
        with preemption.Preemption() as p:
            if {first_step}:
                p.reached()
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
            print("requested", p.reached())
        print("restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    if first_step:
        assert done.returncode == 0 and done.stdout.split() == ["requested", "True", "restored", "True"], done.stderr
    else:
        assert done.returncode == -signal.SIGTERM and done.stdout == "", done.stderr


def _val_rows(workdir) -> dict:
    with open(workdir / "metrics.jsonl", encoding="utf-8") as f:
        return {r["step"]: r for r in map(json.loads, f) if "val/miou" in r}


# 3: not a checkpoint step; 6: the last step, saved before its evaluation (slow: CI runs it)
@pytest.mark.parametrize("at_step", [3, pytest.param(6, marks=pytest.mark.slow)])
def test_sigterm_during_an_evaluation_abandons_it_and_resuming_redoes_it(tiny_config, tmp_path, monkeypatch, at_step):
    """A long evaluation must not outlast a scheduler's grace period: a SIGTERM between its batches
    ends the pass (nothing of it logged), the step is saved, and the rerun evaluates that step
    first, then goes on exactly as a run never interrupted."""
    tiny_config.train.checkpoint_every = 6
    tiny_config.eval.every = 3
    reference = train.train_and_evaluate(tiny_config, str(tmp_path / "reference"))
    original, passes, batches = pipeline.eval_batches, {"n": 0}, {"n": 0}

    def signalled_after_one_batch(*args, **kwargs):
        passes["n"] += 1
        for k, batch in enumerate(original(*args, **kwargs)):
            batches["n"] += 1
            if passes["n"] == at_step // 3 and k == 1:  # the scheduler's SIGTERM, mid-pass
                os.kill(os.getpid(), signal.SIGTERM)
            yield batch

    monkeypatch.setattr(pipeline, "eval_batches", signalled_after_one_batch)
    workdir = tmp_path / "term"
    stopped = train.train_and_evaluate(tiny_config, str(workdir))
    assert stopped == {"step": at_step, "preempted": True}
    assert batches["n"] == (at_step // 3 - 1) * 2 + 2  # the earlier passes' 2 batches each; 2 of this one's
    assert sorted(os.listdir(workdir / "checkpoints")) == [str(at_step)]
    assert sorted(_val_rows(workdir)) == list(range(3, at_step, 3))  # nothing of the abandoned pass
    assert not os.path.exists(workdir / "metrics.json")
    monkeypatch.setattr(pipeline, "eval_batches", original)
    final = train.train_and_evaluate(tiny_config, str(workdir))
    assert final["val/miou"] == reference["val/miou"]
    assert _val_rows(workdir) == _val_rows(tmp_path / "reference")  # the abandoned step's scores included
    assert os.listdir(workdir / "best") == os.listdir(tmp_path / "reference" / "best")
    assert_same_state(final_state(workdir)[0], final_state(tmp_path / "reference")[0])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
    original = pipeline.to_model_batch
    calls = {"n": 0}

    def poisoned_after_four_batches(batch, ignore_label):
        out = original(batch, ignore_label)
        calls["n"] += 1
        if calls["n"] > 4:  # the 5th training batch, step index 4 (if not prefetched earlier)
            out["image"] = out["image"] * np.nan
        return out

    monkeypatch.setattr(pipeline, "to_model_batch", poisoned_after_four_batches)
    tiny_config.data.prefetch = 1
    tiny_config.data.num_threads = 1
    tiny_config.eval.every = 100
    workdir = tmp_path / "nan"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss/gradient at step \d"):
        train.train_and_evaluate(tiny_config, str(workdir))
    assert os.listdir(workdir / "checkpoints") == ["3"]
    good, _ = final_state(workdir)
    assert int(good.step) == 3
    assert all(bool(np.isfinite(np.asarray(x)).all()) for x in jax.tree_util.tree_leaves(good.params))


def test_nan_loss_skip_policy_finishes_with_finite_params(tiny_config, tmp_path, monkeypatch):
    original = pipeline.to_model_batch
    calls = {"n": 0}

    def one_bad_batch(batch, ignore_label):
        out = original(batch, ignore_label)
        calls["n"] += 1
        if calls["n"] == 2:
            out["image"] = out["image"] * np.inf
        return out

    monkeypatch.setattr(pipeline, "to_model_batch", one_bad_batch)
    tiny_config.train.nonfinite = "skip"
    final = train.train_and_evaluate(tiny_config, str(tmp_path / "skip"))
    assert final["step"] == tiny_config.train.steps and np.isfinite(final["val/miou"])
    with open(tmp_path / "skip" / "metrics.jsonl", encoding="utf-8") as f:
        rows = [r for r in map(json.loads, f) if "train/loss" in r]
    # the skipped step is counted in its logging window (which one: the reader threads' order)
    # and left out of the window's mean loss
    assert sum(r["train/nonfinite_steps"] for r in rows) == 1 and all(np.isfinite(r["train/loss"]) for r in rows)


def test_checkpoint_of_another_model_names_the_differing_parameters(tiny_config, tmp_path, monkeypatch):
    """Another network is refused from the checkpoint's metadata, before orbax reads an array (a
    restore failing midway printed ~1000 lines of event-loop tracebacks around the error)."""
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config, str(workdir))
    other = load_config("tiny").model
    other.base_features = 6
    model = build_model(other, 4)
    template = state.create(model, optim.build(tiny_config.optim, 6), np.zeros((1, 32, 32, 3), np.float32), 0)
    ckpt = checkpointing.Checkpointer(str(workdir), 2)
    monkeypatch.setattr(ckpt.latest, "restore", lambda *a, **k: pytest.fail("orbax restore attempted"))
    with pytest.raises(CheckpointError, match=r"different model \(shape differs: decoder/level0/Conv_0/kernel") as err:
        ckpt.restore(template)
    assert "(4,) vs (6,)" in str(err.value)
    other = load_config("tiny").model
    other.depth = 1
    template = state.create(build_model(other, 4), optim.build(tiny_config.optim, 6), np.zeros((1, 32, 32, 3)), 0)
    with pytest.raises(CheckpointError, match=r"not in the model: decoder/level1/Conv_0/kernel"):
        ckpt.restore(template)
    monkeypatch.undo()  # the same network: orbax's restore finds what differs
    # the same network with a weight average: the optimizer state is named as what differs
    tx = optim.with_weight_average(optim.build(tiny_config.optim, 6), 0.9)
    template = state.create(build_model(tiny_config.model, 4), tx, np.zeros((1, 32, 32, 3), np.float32), 0)
    with pytest.raises(CheckpointError, match=r"another optimizer's state \(\d+ entries not in this run's, [1-9]"):
        ckpt.restore(template)
    ckpt.close()


def _truncate(path):
    os.truncate(path, 100)


def _flip(path):  # the same size, other bytes: orbax would restore them as weights
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


@pytest.mark.parametrize(
    ("damage", "what"),
    [
        (_truncate, r"has 100 bytes, not \d+"),
        (_flip, r"has other contents \(SHA-256\)"),
        (os.remove, "is missing"),
    ],
)
def test_a_damaged_checkpoint_is_named_before_orbax_reads_it(tiny_config, tmp_path, monkeypatch, damage, what):
    """A step folder copied in part (or damaged on disk) ended in ~200 lines of tensorstore
    tracebacks; flipped bytes were restored as weights (the run went on to a NaN loss). Each
    finished save now holds its files' digests, checked before orbax reads anything; nothing
    in the folder is changed, and the error names the file and the step to fall back to."""
    workdir = tmp_path / "run"
    train.train_and_evaluate(tiny_config, str(workdir))
    for which, sub in checkpointing.workdirs.CHECKPOINT_FOLDERS.items():
        steps = [d for d in os.listdir(workdir / sub) if d.isdigit()]
        assert steps and all((workdir / sub / d / checkpointing.DIGEST_FILE).exists() for d in steps), which
    step = workdir / "checkpoints" / "6"
    arrays = [os.path.join(r, f) for r, _, fs in os.walk(step / "state") for f in fs if os.path.basename(r) == "d"]
    largest = max(arrays, key=os.path.getsize)  # a file of array data (tensorstore's OCDBT)
    template = state.create(
        build_model(tiny_config.model, 4), optim.build(tiny_config.optim, 6), np.zeros((1, 32, 32, 3)), 0
    )
    ckpt = checkpointing.Checkpointer(str(workdir), 2)
    intact, _ = ckpt.restore(template)
    damage(largest)
    listing = sorted(os.walk(workdir))
    monkeypatch.setattr(ckpt.latest, "restore", lambda *a, **k: pytest.fail("orbax restore attempted"))
    name = os.path.relpath(largest, step)
    with pytest.raises(CheckpointError, match=rf"step 6 in .*checkpoints is damaged \({name} {what}\)") as err:
        ckpt.restore(template)
    assert f"move {step} aside to use step 3 (saved steps: [3])" in str(err.value)
    assert sorted(os.walk(workdir)) == listing  # nothing moved or removed
    monkeypatch.undo()
    if damage is _truncate:  # a step saved without digests (before they were written): tensorstore's error
        os.remove(step / checkpointing.DIGEST_FILE)
        with pytest.raises(CheckpointError, match=r"step 6 in .*checkpoints is damaged \(.*OUT_OF_RANGE"):
            ckpt.restore(template)
    earlier, _ = ckpt.restore(template, step=3)  # the step the message names still restores
    assert int(earlier.step) == 3 and int(intact.step) == 6
    ckpt.close()


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    ckpt = checkpointing.Checkpointer(str(tmp_path / "empty"), 2)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        ckpt.restore(None)
    ckpt.close()


def test_saved_arrays_keep_orbax_array_metadata_and_typed_keys(tmp_path):
    """The one-process whole-array handler writes what orbax's default does: the array metadata
    (a typed PRNG key comes back typed, not as its uint32 data) and the values."""
    import orbax.checkpoint as ocp

    ckpt = checkpointing.Checkpointer(str(tmp_path), 1)
    tree = {"w": jax.numpy.arange(6.0).reshape(2, 3), "key": jax.random.key(7)}
    ckpt.save(1, tree, {"position": 3})
    ckpt.wait()
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, tree)
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())
    restored = ckpt.latest.restore(1, args=args)
    ckpt.close()
    assert os.path.isdir(tmp_path / "checkpoints" / "1" / "state" / "array_metadatas")
    key = restored["state"]["key"]
    assert jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    np.testing.assert_array_equal(jax.random.key_data(key), jax.random.key_data(tree["key"]))
    np.testing.assert_array_equal(restored["state"]["w"], tree["w"])
    assert restored["data"] == {"position": 3}


def test_the_whole_array_handler_is_registered_without_orbax_override_warnings(tmp_path, monkeypatch, caplog):
    import orbax.checkpoint as ocp

    monkeypatch.setattr(checkpointing, "_whole_arrays", False)  # as in a fresh process
    with caplog.at_level("WARNING"):
        checkpointing.Checkpointer(str(tmp_path / "a"), 1).close()
        checkpointing.Checkpointer(str(tmp_path / "b"), 1).close()
    assert not [r for r in caplog.records if "overriding" in r.getMessage()]
    assert ocp.type_handlers.get_type_handler(jax.Array)._use_replica_parallel is False
    # the notice is dropped only while registering: orbax's other warnings still show
    with caplog.at_level("WARNING"):
        ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.get_type_handler(jax.Array), override=True)
    assert [r for r in caplog.records if "overriding" in r.getMessage()]


@pytest.mark.parametrize(
    ("path", "value", "pattern"),
    [
        ("train.steps", "100", "has type str, expected int"),
        ("model.dropout", "0.1", "has type str, expected float"),
        ("data.augment.flip", 1, "has type int, expected bool"),
    ],
)
def test_wrong_types_are_rejected(tiny_config, path, value, pattern):
    group, key = path.rsplit(".", 1)
    with tiny_config.unlocked():
        sub = tiny_config
        for part in group.split("."):
            sub = sub[part]
        sub._fields[key] = value  # bypass ml_collections' own check: a config file could do this
    from segjax import configuration

    with pytest.raises(ConfigError, match=pattern):
        configuration.validate(tiny_config)


def test_batch_not_divisible_by_devices_names_both_numbers(monkeypatch):
    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(ConfigError, match=r"train.batch_size=12 is not divisible by the 8 devices"):
        parallel.host_batch_size(12)
