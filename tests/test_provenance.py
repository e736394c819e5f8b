"""environment.jsonl: each start of a run records the code, packages and devices that ran it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import flax
import jax
import numpy as np
import pytest

from segjax import checkpointing, provenance, workdirs
from tests.conftest import ROOT, checkpoint_step_id

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")


def git(repo, *args) -> str:
    command = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def lines(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@needs_git
def test_each_start_of_a_run_appends_what_ran_it(tiny_config, tmp_path):
    """Training, a start of the finished run and a rescoring each append a line; the first one is
    left as it was. The versions are the imported modules' own, the commit and its uncommitted
    changes git's answer for this checkout."""
    from segjax import baselines, rescore, train

    tiny_config.train.steps, tiny_config.eval.every, tiny_config.train.checkpoint_every = 2, 2, 2
    run = tmp_path / "run"
    train.train_and_evaluate(tiny_config, str(run))
    path = run / provenance.FILE
    first = path.read_text(encoding="utf-8")
    [entry] = lines(path)
    assert entry["what"] == "train" and entry["start_step"] == 0
    packages = entry["packages"]
    assert (packages["jax"], packages["flax"], packages["numpy"]) == (jax.__version__, flax.__version__, np.__version__)
    assert (entry["backend"], entry["devices"], entry["processes"]) == (jax.default_backend(), jax.device_count(), 1)
    try:
        head = git(ROOT, "rev-parse", "HEAD")
    except subprocess.CalledProcessError:  # a copy of the code without .git
        assert entry["git"] is None
    else:
        assert entry["git"] == {
            "commit": head,
            "dirty": bool(git(ROOT, "status", "--porcelain", "--untracked-files=no")),
        }
    train.train_and_evaluate(tiny_config, str(run))  # the finished run started again
    rescore.evaluate_checkpoint(tiny_config, str(run), "latest")
    text = path.read_text(encoding="utf-8")
    assert text.startswith(first)
    assert [(e["what"], e.get("start_step"), e.get("split")) for e in lines(path)] == [
        ("train", 0, None),
        ("train", 2, None),
        ("eval_only=latest", None, "validation"),
    ]
    # the rescoring names the exact checkpoint it scored: its files' contents, not only the step
    named = checkpoint_step_id(run / "checkpoints" / "2")
    assert lines(path)[-1]["checkpoint_id"] == named and lines(path)[-1]["step"] == 2
    assert json.loads((run / "eval_latest.json").read_text())["checkpoint_id"] == named
    copy = shutil.copytree(run, tmp_path / "copy")
    assert checkpointing.fingerprint(str(copy), "latest", 2) == named  # a copy is the same checkpoint
    best_step = workdirs.checkpoint_steps(str(run), "best")[-1]
    assert checkpointing.fingerprint(str(run), "best", best_step) == checkpoint_step_id(run / "best" / str(best_step))
    sealed = copy / "checkpoints" / "2" / checkpointing.DIGEST_FILE
    sealed.write_text(json.dumps({**json.loads(sealed.read_text()), "x": [1, "0"]}))  # other files, same step
    assert checkpointing.fingerprint(str(copy), "latest", 2) not in (None, named)
    os.remove(copy / "checkpoints" / "2" / checkpointing.DIGEST_FILE)  # saved before digests: unknown
    assert checkpointing.fingerprint(str(copy), "latest", 2) is None
    tiny_config.baseline.method = "otsu"
    baselines.run(tiny_config, str(tmp_path / "otsu"))
    assert [e["what"] for e in lines(tmp_path / "otsu" / provenance.FILE)] == ["baseline otsu"]


@needs_git
def test_git_state_of_a_checkout_and_of_no_checkout(tmp_path):
    """A checkout's HEAD, dirty only for changes to tracked files (an untracked output is not a
    change of the code); a folder outside any checkout: None."""
    outside = tmp_path / "plain"
    outside.mkdir()
    assert provenance.git_state(str(outside)) is None
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    git(repo, "add", "a.py")
    git(repo, "commit", "-q", "-m", "a")
    head = git(repo, "rev-parse", "HEAD")
    (repo / "out.txt").write_text("a result\n")
    assert provenance.git_state(str(repo)) == {"commit": head, "dirty": False}
    (repo / "a.py").write_text("x = 2\n")
    assert provenance.git_state(str(repo)) == {"commit": head, "dirty": True}


def test_a_start_with_other_software_than_the_previous_one_is_named(tmp_path, caplog):
    """Resuming with another JAX, commit or device kind is allowed (a run moves between machines)
    but said: its numbers are no longer one code's. A line cut off by a crash is passed over."""
    before = provenance.describe("train", start_step=0)
    before["packages"]["jax"] = "0.0.1"
    before["git"] = {"commit": "a" * 40, "dirty": False}
    before["device_kind"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / provenance.FILE).write_text(json.dumps(before) + '\n{"time": "half a li')
    with caplog.at_level("WARNING"):
        provenance.record(str(tmp_path), "train", start_step=5)
    now = provenance.describe("train")
    assert f"jax 0.0.1 -> {jax.__version__}" in caplog.text
    assert f"commit aaaaaaaaaaaa -> {provenance.code_summary(now['git'])}" in caplog.text
    assert f"device_kind NVIDIA H100 80GB HBM3 -> {now['device_kind']}" in caplog.text
    assert "flax" not in caplog.text  # what did not change is not listed
    caplog.clear()
    with caplog.at_level("WARNING"):
        provenance.record(str(tmp_path), "eval_only=best")
    assert "other code or software" not in caplog.text  # the same as the start before


def test_runs_made_by_different_code_are_counted_per_code(tmp_path):
    """A table's runs made by one commit and JAX: no note; otherwise the runs per code, a run
    resumed under other code under each, a run without a record as such. A vmapped run's record
    sits in its variant's folder (`study_tables.code_note`)."""
    from segjax import study_tables

    def made(commit, jax_version="0.10.2", dirty=False):
        return {"git": {"commit": commit * 40, "dirty": dirty}, "packages": {"jax": jax_version}}

    runs = {"x/seed_0": [made("a")], "x/seed_1": [made("a")], "y/seed_0": [made("a"), made("a", "0.11.2")]}
    for run, records in runs.items():
        os.makedirs(tmp_path / run)
        (tmp_path / run / provenance.FILE).write_text("".join(json.dumps(r) + "\n" for r in records))
    assert provenance.mixed_code([str(tmp_path / r) for r in ("x/seed_0", "x/seed_1")]) == ""
    rows = [{"variant": v, "seed": s} for v, s in (("x", 0), ("x", 1), ("y", 0))]
    note = study_tables.code_note(str(tmp_path), rows)
    assert note == (
        "The runs were made by different code or software "
        "(commit aaaaaaaaaaaa, jax 0.10.2: 3 runs; commit aaaaaaaaaaaa, jax 0.11.2: 1 run)."
    )
    os.makedirs(tmp_path / "v" / "seed_0")  # a vmapped run: its record in v/, its replicas' scores in v/seed_<s>/
    (tmp_path / "v" / provenance.FILE).write_text(json.dumps(made("b", dirty=True)) + "\n")
    os.makedirs(tmp_path / "old" / "seed_0")  # from before records
    rows += [{"variant": "v", "seed": 0}, {"variant": "old", "seed": 0}]
    assert "commit bbbbbbbbbbbb with uncommitted changes, jax 0.10.2: 1 run; no record: 1 run)" in (
        study_tables.code_note(str(tmp_path), rows)
    )
