"""What a study asks for, checked before anything trains: the study file's base config and
variants (`load_study`), each variant's config (`variant_config`), every (variant, seed) run and
its folder (`planned_runs`: an edited variant's old folder, a baseline variant it cannot score and
unknown keys are refused here), the `--summary_keys` its variants can give and its `--groups`
file. `segjax.study` trains and scores what this plans.
"""

from __future__ import annotations

import copy
import os
import sys

import ml_collections

from segjax import configuration
from segjax.data import class_file
from segjax.errors import ConfigError, WorkdirError


def load_study(path: str) -> tuple[ml_collections.ConfigDict, dict[str, dict]]:
    """(base config, variants) from `FILE.py[:arg]`."""
    file, _, arg = path.partition(":")
    if not os.path.isfile(file):
        raise ConfigError(f"--study={path}: no such file")
    sys.path.insert(0, os.path.dirname(os.path.abspath(file)))
    module = configuration.load_module(file)
    if not hasattr(module, "get_variants"):
        raise ConfigError(f"{file} has no get_variants(arg); a study file defines get_config and get_variants")
    return module.get_config(arg or None), module.get_variants(arg or None)


def variant_config(base: ml_collections.ConfigDict, overrides: dict, name: str) -> ml_collections.ConfigDict:
    """The base config with one variant's dotted-key overrides; unknown keys are errors."""
    config = copy.deepcopy(base)
    valid = configuration.flatten(configuration.default_config().to_dict())
    for key, value in overrides.items():
        if key not in valid:
            raise ConfigError(f"variant {name!r}: unknown config key {key} (valid keys are in configs/default.py)")
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        with node.ignore_type():
            node[leaf] = tuple(value) if isinstance(value, list) else value
    class_file.apply(config)
    configuration.validate(config)
    return config


def _check_baselines(configs: dict[str, ml_collections.ConfigDict], vmap_seeds: bool) -> None:
    """Baseline variants (`baseline.enabled`: a classic method scored beside the networks, the
    same images and metrics) have no seeds to vmap; a one-threshold method scores foreground vs
    background, so beside networks of more classes its mIoU would be another mean: refused (the
    multi-class `multiotsu` is scored on every class, as the networks are)."""
    from segjax import baselines

    for name, config in configs.items():
        if not config.baseline.enabled:
            continue
        baselines.check_config(config)
        if vmap_seeds:
            raise ConfigError(f"variant {name!r} is a classic baseline (baseline.enabled): it has no seeds to vmap")
        if len(baselines.class_names(config)) != config.data.num_classes:
            raise ConfigError(
                f"variant {name!r} is a classic baseline ({config.baseline.method}), which scores foreground vs "
                f"background; this study's data has {config.data.num_classes} classes, so its scores would not "
                "compare with the networks' (use baseline.method='multiotsu', which predicts every class, or "
                "binary data: data.num_classes=2)"
            )


def _check_same_config(run_dir: str, config: ml_collections.ConfigDict, variant: str, dataset: str) -> None:
    """A run folder from an earlier version of the study file (a variant's overrides or the base
    changed), or of a dataset folder whose files changed since (`dataset`, the variant's
    `sources.dataset_id`), is refused before anything trains: skipped as finished, its old
    numbers would stand in the new table under the variant's name."""
    from segjax import workdirs  # jax and tfds only when a study is run, not on import

    diff = workdirs.saved_differences(run_dir, config, dataset)
    if diff and not workdirs.saved_nothing(run_dir):  # a start that saved nothing is trained anew
        raise WorkdirError(
            f"{run_dir} holds a run of another config than variant {variant!r} now gives "
            f"(differs in: {configuration.listed(diff)}); "
            "use a new --workdir for the changed study, or move that run folder away"
        )


def planned_runs(
    base: ml_collections.ConfigDict,
    variants: dict[str, dict],
    seeds: list[int],
    workdir: str,
    vmap_seeds: bool = False,
) -> list[tuple[str, ml_collections.ConfigDict, str]]:
    """(variant, config, run folder) for every run the study asks for; bad variants are errors.
    A run folder already holding another config (the study file was edited) is a WorkdirError."""
    if not variants:
        raise ConfigError("the study has no variants")
    bad = [v for v in variants if not v or "/" in v or v.startswith(".")]
    if bad:
        raise ConfigError(f"variant names {bad} cannot be folder names")
    configs = {name: variant_config(base, o, name) for name, o in variants.items()}  # all errors up front
    _check_baselines(configs, vmap_seeds)
    todo = []
    for name, config in configs.items():
        if vmap_seeds:
            config.train.seed, config.train.num_seeds = seeds[0], len(seeds)
            if seeds != list(range(seeds[0], seeds[0] + len(seeds))):
                raise ConfigError(f"--vmap_seeds needs consecutive seeds, got {seeds}")
            todo.append((name, config, os.path.join(workdir, name)))
        else:
            for s in seeds:
                c = copy.deepcopy(config)
                c.train.seed = s
                todo.append((name, c, os.path.join(workdir, name, f"seed_{s}")))
    from segjax import workdirs  # jax and tfds only when a study is planned, not on import
    from segjax.data import sources

    datasets = {}  # variant -> dataset id: made once per variant (it lists a folder's files), not per seed
    for name, c, run_dir in todo:
        if os.path.exists(os.path.join(run_dir, workdirs.CONFIG_FILE)):
            if name not in datasets:
                datasets[name] = sources.dataset_id(c.data)
            _check_same_config(run_dir, c, name, datasets[name])
    return todo


def check_summary_keys(base: ml_collections.ConfigDict, variants: dict[str, dict], extra) -> None:
    """A `val/` key of `--summary_keys` that no variant's evaluation gives (`val/dice/membrne`) is
    refused before anything trains, not hours later when the table is written (instance and
    surface scores included: `evaluate.run_score_keys`)."""
    from segjax import evaluate  # jax only when a study trains

    given = set()
    for name, overrides in variants.items():
        given |= evaluate.run_score_keys(variant_config(base, overrides, name))
    unknown = [k for k in extra if k.startswith("val/") and k not in given]
    if unknown:
        raise ConfigError(f"--summary_keys {unknown}: no variant's validation gives them; it gives {sorted(given)}")


def check_groups(groups: str, group_by: str, group_id: str, compare_to: str) -> None:
    """--groups before any run starts: with --group_by and --compare_to, a file that has both columns."""
    if not (groups or group_by):
        return
    if not (groups and group_by):
        raise ConfigError("--groups and --group_by go together: --groups=index.csv --group_by=stratum")
    if not compare_to:
        raise ConfigError("--groups compares variants group by group: give --compare_to=VARIANT too")
    from segjax import matched_tables

    matched_tables.image_groups([], groups, group_by, group_id)  # the file and its columns
