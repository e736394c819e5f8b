"""Config checks before anything compiles, and the resolved config stored in each workdir.

Every valid field is in configs/default.py; a key that is not there, or a value of another type,
is an error with the nearest valid name. Config files are Python and therefore trusted code:
run only configs you would run as a script.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
import json
import os
import sys

import ml_collections

from segjax.errors import ConfigError, exit_on_user_error

_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
_DEFAULT = os.path.join(_CONFIGS, "default.py")
SAVED = os.path.join(_CONFIGS, "saved.py")  # `--config=RUN/config.json` stands for `--config=SAVED:RUN/config.json`


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


def from_json(path: str) -> ml_collections.ConfigDict:
    """A run's saved `config.json` as a config: configs/default.py's fields with the saved values
    (JSON lists back to tuples), so that `--config=runs/x/config.json` relaunches run x's exact
    settings, e.g. with another seed in another workdir. A key this segjax does not have is an
    error; one the file lacks (saved before the field existed) keeps its default, as resuming
    treats it (`differences`)."""
    try:
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not a readable config.json ({err})") from err
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: not a run's config.json (a JSON object of config groups)")
    config = default_config()
    reference, given = flatten(config.to_dict()), flatten(saved)
    unknown = sorted(set(given) - set(reference))
    if unknown:
        raise ConfigError(f"{path} holds keys this segjax does not have (saved by another version?): {listed(unknown)}")
    for key, value in given.items():
        *groups, leaf = key.split(".")
        node = config
        for group in groups:
            node = node[group]
        try:
            node[leaf] = _tuples(value)
        except TypeError as err:
            raise ConfigError(f"{path}: {key}={value!r} does not fit configs/default.py's field ({err})") from err
    return config


def _tuples(value):
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def default_config() -> ml_collections.ConfigDict:
    """configs/default.py's config as this process first read it (a copy each call). A process
    checks its configs against the fields it started with: config files import `default` once
    (Python's module cache), so re-reading the file after an edit, e.g. a `git pull` adding a
    field while a study trains, made every later run of the study fail its check ("missing keys")."""
    return _first_default().copy_and_resolve_references()


@functools.cache
def _first_default() -> ml_collections.ConfigDict:
    return from_file(_DEFAULT)


def check_command_line(argv: list[str], default_file: str | None, flag: str = "config") -> None:
    """Refuse, before absl parses them, what ml_collections' config flag would end in a traceback
    on: a `--config` file that is not there, a `get_config(arg)` that refuses its argument, and a
    `--config.KEY` override of a key the config does not have (named with the nearest valid key).
    `--flagfile` contents are checked too, read as absl reads them (nested files, comments)."""
    from absl import flags

    try:
        argv = flags.FlagValues().read_flags_from_files(argv, force_gnu=True)
    except flags.Error as err:
        raise ConfigError(f"--flagfile: {err}") from None
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
    if path.endswith(".json"):  # a saved config given in a --flagfile (the command line's is rewritten)
        raise ConfigError(f"--{flag}={value}: a saved config.json is read as --{flag}={SAVED}:{path}")
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

    sys.argv[1:] = saved_config_argv(sys.argv[1:])
    with exit_on_user_error():
        check_command_line(sys.argv[1:], default_file)
    quiet_libraries()
    app.run(main)


class _QuietLibraries:
    """Drop INFO chatter from orbax/tfds/grain/jax (their warnings and errors still show) and
    TFDS's warning that a builder is made with a config of ours, repeated at every builder made
    (every segjax dataset is one)."""

    NOISY = ("orbax", "tensorflow_datasets", "grain", "jax/_src", "etils", "absl/")

    def filter(self, record) -> bool:
        if "tensorflow_datasets" in record.pathname and str(record.msg).startswith("Using custom data configuration"):
            return False
        return record.levelno >= 30 or not any(n in record.pathname for n in self.NOISY)


def quiet_libraries() -> None:
    """Every segjax program's log (`run_program`, segjax.study): the libraries' INFO left out."""
    from absl import logging

    handler = logging.get_absl_handler()
    if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
        handler.addFilter(_QuietLibraries())


def saved_config_argv(argv: list[str], flag: str = "config") -> list[str]:
    """`argv` with a run's saved config (`--config=runs/x/config.json`, or `--config runs/x/config.json`)
    given to configs/saved.py, the config file that reads it (`from_json`)."""
    out, args = [], iter(argv)
    for arg in args:
        if arg == "--":  # absl's end of flags
            return [*out, arg, *args]
        name, has_value, value = arg.partition("=")
        if name in (f"--{flag}", f"-{flag}"):
            value = value if has_value else next(args, "")
            arg = f"--{flag}={SAVED}:{value}" if value.endswith(".json") else f"--{flag}={value}"
        out.append(arg)
    return out


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


def _at_least(low):
    return lambda v: v >= low, f">= {low}"


def _between(low, high):  # low <= v < high
    return lambda v: low <= v < high, f"in [{low}, {high})"


_POSITIVE = (lambda v: v > 0, "> 0")
_ODD = (lambda v: v >= 1 and v % 2 == 1, "odd and >= 1 (an even kernel shifts its output by half a pixel)")

# Numeric fields' valid values, checked by `validate` so that a value a run cannot use fails before
# data or compilation (a zero interval divided by zero deep in the loop; a negative learning rate
# or loss weight trained silently in the wrong direction). Keys checked by their own module
# (optim.ema_decay, eval.window*, model.depth, pretrain.steps, instances.*, ...) are not repeated here.
RANGES = {
    "data.num_classes": _at_least(2),
    "data.channels": _at_least(1),
    "data.resize": _at_least(0),
    "data.cache_memory_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.folder.val_fraction": (lambda v: 0 < v < 1, "in (0, 1)"),
    "data.folder.num_folds": (lambda v: v == 0 or v >= 2, "0 (off) or >= 2"),
    "data.synthetic.image_size": _at_least(1),
    "data.synthetic.num_train": _at_least(1),
    "data.synthetic.num_val": _at_least(1),
    "data.synthetic.num_test": _at_least(0),
    "data.synthetic.noise": _at_least(0),
    "data.synthetic.contrast": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.synthetic.min_objects": _at_least(0),
    "data.synthetic3d.size": _at_least(1),
    "data.synthetic3d.num_train": _at_least(1),
    "data.synthetic3d.num_val": _at_least(1),
    "data.synthetic3d.num_test": _at_least(0),
    "data.synthetic3d.noise": _at_least(0),
    "data.synthetic3d.min_objects": _at_least(0),
    "data.augment.crop": _at_least(0),
    "data.augment.rotate": (lambda v: 0 <= v <= 180, "in [0, 180] degrees"),
    "data.augment.scale_min": _POSITIVE,
    "data.augment.elastic_alpha": _at_least(0),
    "data.augment.elastic_sigma": _POSITIVE,
    "data.augment.brightness": _at_least(0),
    "data.augment.contrast": _between(0, 1),
    "data.augment.gamma": _at_least(0),
    "data.augment.noise": _at_least(0),
    "model.base_features": _at_least(1),
    "model.num_convs": _at_least(1),
    "model.kernel_size": _ODD,
    "model.dropout": _between(0, 1),
    "pretrain.lr": _POSITIVE,
    "loss.ce_weight": _at_least(0),
    "loss.dice_weight": _at_least(0),
    "loss.lovasz_weight": _at_least(0),
    "loss.dice_smooth": _at_least(0),
    "loss.tversky_alpha": _at_least(0),
    "loss.tversky_beta": _at_least(0),
    "loss.label_smoothing": _between(0, 1),
    "loss.focal_gamma": _at_least(0),
    "optim.lr": _POSITIVE,
    "optim.warmup_steps": _at_least(0),
    "optim.weight_decay": _at_least(0),
    "optim.momentum": _between(0, 1),
    "optim.grad_clip": _at_least(0),
    "train.steps": _at_least(0),
    "train.batch_size": _at_least(1),
    "train.log_every": _at_least(1),
    "train.checkpoint_every": _at_least(1),
    "train.keep_checkpoints": _at_least(1),
    "eval.every": _at_least(1),
    "eval.batch_size": _at_least(1),
    "eval.boundary_dilation": _at_least(0),
    "eval.interval_resamples": _at_least(0),
    "baseline.smooth_sigma": _at_least(0),
    "baseline.edge_sigma": _at_least(0),
    "baseline.edge_width": _at_least(0),
    "baseline.min_distance": _at_least(1),
    "baseline.levels": _at_least(0),
}
# pairs (low key, high key) that must be ordered
ORDERED = (
    ("data.augment.scale_min", "data.augment.scale_max"),
    ("data.synthetic.min_objects", "data.synthetic.max_objects"),
    ("data.synthetic3d.min_objects", "data.synthetic3d.max_objects"),
)


def _check_ranges(given: dict[str, object]) -> None:
    for key, (ok, what) in RANGES.items():
        if not ok(given[key]):
            raise ConfigError(f"{key}={given[key]!r} must be {what}")
    for low, high in ORDERED:
        if given[low] > given[high]:
            raise ConfigError(f"{low}={given[low]} is larger than {high}={given[high]}")


def validate(config: ml_collections.ConfigDict) -> None:
    """Raise ConfigError for unknown keys, wrong types (compared with configs/default.py) and
    numbers outside `RANGES`."""
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
    _check_ranges(given)


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


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
