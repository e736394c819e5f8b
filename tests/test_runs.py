"""segjax.runs: the runs under a folder, their status, scores, dataset and code."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import pytest

from segjax import provenance, runs
from tests.conftest import ROOT


def test_runs_under_a_folder_and_their_status(tiny_config, tmp_path):
    """A finished run, the same run with more steps asked (stopped at its checkpoint), one that
    diverged, a baseline and a start that saved nothing, each found once under nested folders
    (a run's own subfolders are not runs); scores, dataset and code are the run's own files'."""
    from segjax import baselines, train

    tiny_config.train.steps, tiny_config.eval.every, tiny_config.train.checkpoint_every = 2, 2, 2
    tiny_config.eval.interval_resamples = 200  # the run keeps its intervals: the table shows them
    root = tmp_path / "runs"
    done = root / "study" / "unet" / "seed_0"
    result = train.train_and_evaluate(tiny_config, str(done))
    stopped = shutil.copytree(done, root / "longer")
    config = json.loads((stopped / "config.json").read_text())
    config["train"]["steps"] = 10
    (stopped / "config.json").write_text(json.dumps(config))
    diverged = shutil.copytree(done, root / "study" / "unet" / "seed_1")
    (diverged / "failed.json").write_text(json.dumps({"error": "non-finite loss at step 1 (loss=nan); lower lr"}))
    baselines.run(tiny_config, str(root / "otsu"))
    empty = root / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps({"train": {"steps": 2}}))
    (root / "notes").mkdir()  # no config.json: not a run
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{half a config")  # named as unreadable; the others still listed

    rows = runs.table([str(root)], keys=("val/miou", "val/nothing"))
    by_run = {r["run"]: r for r in rows}
    assert sorted(by_run) == [
        "runs/broken",
        "runs/empty",
        "runs/longer",
        "runs/otsu",
        "runs/study/unet/seed_0",
        "runs/study/unet/seed_1",
    ]
    assert by_run["runs/study/unet/seed_0"]["status"] == "finished"
    assert (
        by_run["runs/broken"]["status"].startswith("unreadable: ")
        and "is not valid JSON" in by_run["runs/broken"]["status"]
    )
    assert by_run["runs/longer"]["status"] == "stopped at step 2 of 10"
    assert by_run["runs/study/unet/seed_1"]["status"] == "diverged: non-finite loss at step 1 (loss=nan)"
    assert by_run["runs/otsu"]["status"] == "baseline otsu"
    assert by_run["runs/empty"]["status"] == "nothing saved" and by_run["runs/empty"]["code"] == ""
    finished = by_run["runs/study/unet/seed_0"]
    assert finished["val/miou"] == result["val/miou"] and finished["val/nothing"] is None and finished["step"] == 2
    kept = json.loads((done / "intervals.json").read_text())["intervals"]["val/miou"]
    assert finished["val/miou_low"] == kept["low"] <= result["val/miou"] <= kept["high"] == finished["val/miou_high"]
    assert finished["val/nothing_low"] is None and by_run["runs/empty"]["val/miou_low"] is None
    otsu = json.loads((root / "otsu" / "intervals.json").read_text())["intervals"]["val/miou"]  # a baseline's too
    assert by_run["runs/otsu"]["val/miou_low"] == otsu["low"] < otsu["high"] == by_run["runs/otsu"]["val/miou_high"]
    assert finished["dataset"] == json.loads((done / "dataset.json").read_text())["dataset"]
    assert finished["code"] == f"{provenance.code_summary(provenance.git_state())}, jax {jax.__version__}"
    assert finished["last_log"] in ("just now", "1 min ago")


def test_cli_prints_the_table_writes_csv_and_refuses_no_folder(tmp_path):
    run = tmp_path / "r" / "a"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"train": {"steps": 4}}))
    (run / "metrics.json").write_text(json.dumps({"step": 4, "val/miou": 0.25, "val/dice/membrane": 0.5}))
    other = shutil.copytree(run, tmp_path / "r" / "b")
    bounds = {"val/dice/membrane": {"estimate": 0.5, "low": 0.41, "high": 0.6, "undefined": 0}}
    (other / "intervals.json").write_text(json.dumps({"intervals": bounds}))
    out = tmp_path / "table.csv"
    args = [sys.executable, "-m", "segjax.runs", str(tmp_path / "r"), "--keys=val/dice/membrane", f"--csv={out}"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| r/a | finished | 4 | 0.5000 |  |  |  |" in done.stdout
    assert "| r/b | finished | 4 | 0.5000 [0.4100, 0.6000] |  |  |  |" in done.stdout
    with open(out, newline="", encoding="utf-8") as f:
        assert [tuple(r.values())[:6] for r in csv.DictReader(f)] == [
            ("r/a", "finished", "4", "0.5", "", ""),
            ("r/b", "finished", "4", "0.5", "0.41", "0.6"),
        ]
    for bad, message in (([], "give one or more folders"), ([str(tmp_path / "none")], "is not a folder")):
        done = subprocess.run([*args[:3], *bad], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert os.path.exists(out)


@pytest.mark.skipif(not os.path.exists("/proc/locks"), reason="the holder of a lock is read from Linux's /proc/locks")
def test_a_run_whose_workdir_lock_a_process_holds_is_training(tmp_path):
    """While another process holds a run's workdir lock (as a trainer does) the run is `training`,
    named with that process's pid; once the process is gone (killed, as a crash or a preemption
    leaves it) the same folders are `stopped` / `nothing saved` again. Looking locks nothing: the
    holder keeps its lock throughout, and the lock is free to take as soon as it is gone."""
    from segjax import locks, workdirs
    from segjax.errors import BusyError

    stopped, fresh = tmp_path / "stopped", tmp_path / "fresh"
    (stopped / "checkpoints" / "4").mkdir(parents=True)
    fresh.mkdir()
    for run in (stopped, fresh):
        (run / "config.json").write_text(json.dumps({"train": {"steps": 10}}))
    code = (
        "import sys, time\nfrom segjax import workdirs\n"
        "with workdirs.lock(sys.argv[1]), workdirs.lock(sys.argv[2]):\n"
        "    print('held', flush=True)\n    time.sleep(300)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(stopped), str(fresh)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        since = rf"\(pid {holder.pid} since \d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\)"
        assert re.fullmatch(r"training: last saved step 4 of 10 " + since, runs.describe(str(stopped))["status"])
        assert re.fullmatch(r"training: nothing saved yet of 10 steps " + since, runs.describe(str(fresh))["status"])
        with pytest.raises(BusyError, match=f"pid {holder.pid}"), workdirs.lock(str(stopped)):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=60)
    assert runs.describe(str(stopped))["status"] == "stopped at step 4 of 10"
    assert runs.describe(str(fresh))["status"] == "nothing saved"
    assert locks.holder(str(stopped / workdirs.LOCK_FILE)) is None
    with workdirs.lock(str(stopped)):
        assert re.fullmatch(rf"pid {os.getpid()} since .+", locks.holder(str(stopped / workdirs.LOCK_FILE)))
