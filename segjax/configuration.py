"""Config checks before anything compiles, and the resolved config stored in each workdir.

Every valid field is in configs/default.py; a key that is not there, or a value of another type,
is an error with the nearest valid name. Config files are Python and therefore trusted code:
run only configs you would run as a script.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import sys

import ml_collections

from segjax.errors import ConfigError, exit_on_user_error

_DEFAULT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "default.py")


def load_module(path: str):
    """The Python file at `path` run as a module (config and study files are trusted code)."""
    spec = importlib.util.spec_from_file_location("segjax_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def from_file(path: str, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (what `--config=path[:arg]` loads)."""
    module = load_module(path)
    return module.get_config() if arg is None else module.get_config(arg)


def default_config() -> ml_collections.ConfigDict:
    return from_file(_DEFAULT)


def check_command_line(argv: list[str], default_file: str | None, flag: str = "config") -> None:
    """Refuse, before absl parses them, what ml_collections' config flag would end in a traceback
    on: a `--config` file that is not there, a `get_config(arg)` that refuses its argument, and a
    `--config.KEY` override of a key the config does not have (named with the nearest valid key)."""
    value, overrides, args = default_file, [], iter(argv)
    for arg in args:
        if arg == "--":
            break
        name, has_value, given = arg.partition("=")
        if name in (f"--{flag}", f"-{flag}"):
            value = given if has_value else next(args, "")
        elif name.startswith((f"--{flag}.", f"--no{flag}.")):
            overrides.append(name.split(".", 1)[1])
    if value is None:
        return  # a required flag absl reports itself
    path, _, argument = value.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--{flag}={value}: no such config file {path!r} (relative to {os.getcwd()})")
    try:
        config = from_file(path, argument or None)
    except ValueError as err:
        raise ConfigError(f"--{flag}={value}: {err}") from err
    keys = flatten(config.to_dict())
    groups = {k.rsplit(".", n)[0] for k in keys for n in range(1, k.count(".") + 1)}
    for key in overrides:
        if key not in keys and key not in groups:
            close = difflib.get_close_matches(key, list(keys), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"--{flag}.{key}: unknown config key {key}{hint} (valid keys are in configs/default.py)")


def run_program(main, default_file: str | None = None) -> None:
    """absl's `app.run(main)` for a program with a `--config` flag, after `check_command_line`
    (its errors as one line, exit status 2)."""
    from absl import app

    with exit_on_user_error():
        check_command_line(sys.argv[1:], default_file)
    app.run(main)


def flatten(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def _type_ok(default, value) -> bool:
    if default is None or value is None:
        return True
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(default, bool) and isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (tuple, list)):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for unknown keys or wrong types (compared with configs/default.py)."""
    reference = flatten(default_config().to_dict())
    given = flatten(config.to_dict())
    for key, value in given.items():
        if key not in reference:
            close = difflib.get_close_matches(key, list(reference), n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"unknown config key {key}{hint} (valid keys are listed in configs/default.py)")
        if not _type_ok(reference[key], value):
            raise ConfigError(
                f"config key {key}={value!r} has type {type(value).__name__}, "
                f"expected {type(reference[key]).__name__} as in configs/default.py"
            )
    missing = sorted(set(reference) - set(given))
    if missing:
        raise ConfigError(f"config is missing keys {missing[:5]}; start config files from configs/default.get_config()")


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def saved_differences(workdir: str, config: ml_collections.ConfigDict) -> list[str] | None:
    """`differences` between the run config saved in `<workdir>/config.json` and `config`; None
    when the folder holds no saved config."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return differences(json.load(f), config.to_dict())


def listed(keys: list[str], most: int = 8) -> str:
    """The first `most` keys for a message, '...' when there are more."""
    return ", ".join(keys[:most]) + (" ..." if len(keys) > most else "")


def differences(old: dict, new: dict) -> list[str]:
    """Flat keys whose values differ between two config dicts (JSON round-trip normalised). A key
    the old config lacks counts as its configs/default.py value, so a run saved before a field was
    added resumes unless the field is set away from its default."""
    defaults = flatten(json.loads(json.dumps(default_config().to_dict(), default=list)))
    a = {**defaults, **flatten(json.loads(json.dumps(old, default=list)))}
    b = flatten(json.loads(json.dumps(new, default=list)))
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
