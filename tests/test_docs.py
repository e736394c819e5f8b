"""The commands the docs give still run: every `--config.KEY` they mention is a real config key,
and every `--config=FILE[:arg]` / `--study=FILE[:arg]` loads with its argument (a renamed key or
config file would otherwise leave the README pointing at an error)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys

from segjax import configuration, preflight, study
from tests.conftest import ROOT

# placeholders and the README's own example of a refused typo
NOT_KEYS = {"x.y", "KEY", "data.image_size"}


def _doc_files() -> list[str]:
    patterns = (
        "README.md",
        "benchmarks/*.md",
        "benchmarks/*.py",
        "configs/**/*.py",
        "segjax/**/*.py",
        "experiments/**/*",
    )
    paths = {p for pattern in patterns for p in glob.glob(os.path.join(ROOT, pattern), recursive=True)}
    return sorted(p for p in paths if os.path.isfile(p))


def _texts() -> dict[str, str]:
    texts = {}
    for path in _doc_files():
        with open(path, encoding="utf-8") as f:
            texts[os.path.relpath(path, ROOT)] = f.read()
    return texts


def test_documented_overrides_name_real_config_keys():
    keys = configuration.flatten(configuration.default_config().to_dict())
    groups = {k.rsplit(".", n)[0] for k in keys for n in range(1, k.count(".") + 1)}
    mentioned = {
        (name, m.group(1))
        for name, text in _texts().items()
        for m in re.finditer(r"--(?:no)?config\.([A-Za-z_][\w.]*\w)", text)
    }
    assert len(mentioned) > 40  # the scan finds the docs' overrides
    bad = sorted((name, key) for name, key in mentioned if key not in keys and key not in groups | NOT_KEYS)
    assert not bad, f"documented --config.KEY overrides that are not config keys: {bad}"


def test_documented_config_and_study_files_load_with_their_arguments(monkeypatch):
    monkeypatch.chdir(ROOT)  # the docs' paths are relative to the repository
    mentioned = {
        (m.group(1), m.group(2), m.group(3))
        for text in _texts().values()
        for m in re.finditer(r"--(config|study)[= ](configs/[\w/]+\.py)(?::([\w,]+))?", text)
    }
    assert {
        ("config", "configs/nuclei.py", "instances"),
        ("study", "configs/studies/isbi_folds.py", "proxy"),
    } <= mentioned
    for flag, path, arg in sorted(mentioned, key=str):
        if path == "configs/saved.py":  # its argument is a run's config.json (tests/test_saved_config.py)
            continue
        if flag == "config":
            configuration.check_command_line([f"--config={path}" + (f":{arg}" if arg else "")], None)
            # the whole config as training checks it before the data: a key inherited from another
            # config (nuclei.py's best_metric was isbi.py's val/dice/membrane) fails here, not minutes in
            preflight.check(configuration.from_file(os.path.join(ROOT, path), arg))
        else:
            base, variants = study.load_study(os.path.join(ROOT, path) + (f":{arg}" if arg else ""))
            for name, overrides in variants.items():
                study.variant_config(base, overrides, name)


def _documented_commands() -> dict[str, set[tuple[str, str]]]:
    """{module: {(flag, file)}} of every `python -m segjax.<module> --flag ...` command in the docs
    (continued lines joined; flags up to the end of the command)."""
    commands: dict[str, set[tuple[str, str]]] = {}
    for name, text in _texts().items():
        for m in re.finditer(r"-m (segjax(?:\.\w+)+)([^\n;&|`]*)", re.sub(r"\\\n\s*", " ", text)):
            flags = re.findall(r"(?<![\w-])--([A-Za-z_]\w*)", m.group(2))
            commands.setdefault(m.group(1), set()).update((flag, name) for flag in flags)
    return commands


def test_documented_commands_use_flags_their_module_defines():
    """Every flag of a documented `python -m segjax.<module>` command (README, configs, launch
    scripts, docstrings) is one that module defines (its --helpfull), so a renamed or removed flag
    cannot leave a command in the docs that stops at 'Unknown command line flag'."""
    commands = _documented_commands()
    assert {"segjax.main", "segjax.study", "segjax.predict", "segjax.baselines"} <= set(commands)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    helps = {
        module: subprocess.Popen(
            [sys.executable, "-m", module, "--helpfull"], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for module in commands
    }
    bad = []
    for module, proc in helps.items():
        out, _ = proc.communicate(timeout=120)
        defined = set(re.findall(r"^\s+--(?:\[no\])?([\w.]+):", out, re.MULTILINE))
        assert "helpfull" in defined, f"{module} --helpfull listed no flags"
        for flag, name in commands[module]:
            if flag not in defined and not (flag.startswith("no") and flag[2:] in defined):
                bad.append((name, module, flag))
    assert not bad, f"documented commands with flags their module does not define: {sorted(bad)}"
