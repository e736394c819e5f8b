"""Result files: replaced whole, and read back with a clear error when edited into bad JSON."""

from __future__ import annotations

import json
import os

import pytest

from segjax import study, workdirs, writers
from segjax.errors import WorkdirError
from tests.conftest import load_config


def test_a_failed_write_leaves_the_previous_results(tmp_path):
    path = str(tmp_path / "metrics.json")
    writers.write_summary(path, {"val/miou": 0.5})
    with pytest.raises(TypeError):  # a value json cannot write, found halfway through the file
        writers.write_summary(path, {"a": 1.0, "b": object()})
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == {"val/miou": 0.5}  # was a truncated file: '{"a": 1.0, "b": '
    assert os.listdir(tmp_path) == ["metrics.json"]  # no partial file left behind
    table = str(tmp_path / "t.csv")
    writers.write_table(table, [{"name": "a", "dice": 0.5}])
    with pytest.raises(AttributeError):
        writers.write_table(table, [{"name": "a", "dice": 0.5}, "not a row"])
    with open(table, encoding="utf-8") as f:
        assert f.read().splitlines() == ["name,dice", "a,0.5"]


def test_files_edited_into_bad_json_are_named(tmp_path):
    run = tmp_path / "run"
    os.makedirs(run)
    (run / "config.json").write_text('{"model": ')
    with pytest.raises(WorkdirError, match=r"run/config.json is not valid JSON \(Expecting value"):
        workdirs.prepare(load_config("tiny"), str(run), overwrite=False, allow_config_changes=False)
    seed = tmp_path / "study" / "a" / "seed_0"
    os.makedirs(seed)
    (seed / "metrics.json").write_text('{"val/miou": 0.5')
    with pytest.raises(WorkdirError, match=r"seed_0/metrics.json is not valid JSON"):
        study.collect(str(tmp_path / "study"))
