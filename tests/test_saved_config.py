"""A run's saved config.json as a config (`--config=RUN/config.json`): the same settings again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from segjax import configuration, train
from segjax.errors import ConfigError
from tests.conftest import ROOT, load_config

CONFIGS = [
    (name[:-3], None)
    for name in sorted(os.listdir(os.path.join(ROOT, "configs")))
    if name.endswith(".py") and name != "saved.py"
] + [("nuclei", "instances")]


def _typed(config) -> dict:
    """Each leaf with its type: a tuple read back as a list would compare equal as a value."""
    return {k: (type(v).__name__, v) for k, v in configuration.flatten(config.to_dict()).items()}


@pytest.mark.parametrize(("name", "arg"), CONFIGS, ids=[f"{n}:{a}" if a else n for n, a in CONFIGS])
def test_every_config_comes_back_from_its_json_unchanged(tmp_path, name, arg):
    config = load_config(name, arg)
    path = tmp_path / "config.json"
    path.write_text(configuration.to_json(config))
    again = load_config("saved", str(path))
    assert _typed(again) == _typed(config)
    assert configuration.differences(config.to_dict(), again.to_dict()) == []
    configuration.validate(again)


def test_a_saved_config_missing_a_field_keeps_its_default_and_unknown_or_mistyped_keys_are_errors(tmp_path):
    saved = json.loads(configuration.to_json(load_config("isbi")))
    del saved["data"]["cache_memory_fraction"]  # a run saved before the field existed
    (tmp_path / "old.json").write_text(json.dumps(saved))
    config = configuration.from_json(str(tmp_path / "old.json"))
    assert config.data.cache_memory_fraction == configuration.default_config().data.cache_memory_fraction
    assert config.model.depth == 4 and config.data.image_shift == (-0.61, -0.20)  # isbi's own values
    saved["data"]["cache_fraction"] = 0.5
    (tmp_path / "new.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"keys this segjax does not have .*: data\.cache_fraction"):
        configuration.from_json(str(tmp_path / "new.json"))
    saved = json.loads(configuration.to_json(load_config("tiny")))
    saved["train"]["steps"] = "many"
    (tmp_path / "typo.json").write_text(json.dumps(saved))
    with pytest.raises(ConfigError, match=r"train\.steps='many' does not fit"):
        configuration.from_json(str(tmp_path / "typo.json"))
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"not a run's config\.json"):
        configuration.from_json(str(tmp_path / "list.json"))
    with pytest.raises(ValueError, match=r"needs the path of a run's config\.json"):
        load_config("saved")


def test_the_command_line_gives_a_json_config_to_configs_saved():
    saved = configuration.SAVED
    assert configuration.saved_config_argv(["--config=r/config.json", "--workdir=w"]) == [
        f"--config={saved}:r/config.json",
        "--workdir=w",
    ]
    assert configuration.saved_config_argv(["--config", "r/config.json", "--config.train.seed=1"]) == [
        f"--config={saved}:r/config.json",
        "--config.train.seed=1",
    ]
    assert configuration.saved_config_argv(["-config=r.json"]) == [f"--config={saved}:r.json"]
    assert configuration.saved_config_argv(["--config", "configs/isbi.py"]) == ["--config=configs/isbi.py"]
    assert configuration.saved_config_argv(["--config=configs/nuclei.py:instances", "--", "--config=x.json"]) == [
        "--config=configs/nuclei.py:instances",
        "--",
        "--config=x.json",  # after `--`: not a flag
    ]


def test_a_run_relaunched_from_its_config_json_is_the_same_run(tiny_config, tmp_path):
    """Its own workdir takes it as the same config (resumes, no 'different config' refusal);
    a new workdir trains exactly as the original (same losses, same scores)."""
    tiny_config.train.steps = 3
    first = train.train_and_evaluate(tiny_config, str(tmp_path / "a"))
    relaunched = configuration.from_json(str(tmp_path / "a" / "config.json"))
    again = train.train_and_evaluate(relaunched, str(tmp_path / "a"))  # a finished run: evaluated once more
    assert again["val/miou"] == first["val/miou"]
    copy = train.train_and_evaluate(configuration.from_json(str(tmp_path / "a" / "config.json")), str(tmp_path / "b"))
    assert copy["train/loss"] == first["train/loss"] and copy["val/miou"] == first["val/miou"]


def test_a_bad_saved_config_on_the_command_line_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text('{"data": {"nope": 1}}')
    result = subprocess.run(
        [sys.executable, "-m", "segjax.main", f"--config={tmp_path / 'config.json'}", f"--workdir={tmp_path / 'w'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "keys this segjax does not have (saved by another version?): data.nope" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()
    (tmp_path / "flags.cfg").write_text(f"--config={tmp_path / 'config.json'}\n")
    with pytest.raises(ConfigError, match=r"a saved config.json is read as --config=.*saved.py:"):
        configuration.check_command_line([f"--flagfile={tmp_path / 'flags.cfg'}"], None)


def test_a_process_checks_configs_against_the_defaults_it_started_with(tmp_path, monkeypatch):
    """configs/default.py edited while a process runs (a `git pull` adding a field during a
    study): the configs the process built before still pass its checks, as its config files
    (which import `default` once) still build them; each call gives an independent copy."""
    path = tmp_path / "default.py"
    path.write_text(open(os.path.join(ROOT, "configs", "default.py"), encoding="utf-8").read())
    monkeypatch.setattr(configuration, "_DEFAULT", str(path))
    configuration._first_default.cache_clear()
    try:
        config = configuration.default_config()
        configuration.validate(config)
        text = path.read_text()
        path.write_text(text[: text.rindex("    return c")] + "    c.data.new_field = 1\n    return c\n")
        assert configuration.from_file(str(path)).data.new_field == 1  # the file on disk has it now
        configuration.validate(config)  # re-reading the file refused it: "config is missing keys"
        assert "new_field" not in configuration.default_config().data
        configuration.default_config().data.num_classes = 99
        assert configuration.default_config().data.num_classes == config.data.num_classes
    finally:
        configuration._first_default.cache_clear()
