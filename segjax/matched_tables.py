"""The images of per-image tables taken together: a run's tables (a K-seed run's, one per
replica in `seed_<s>/`), the tables of several runs of disjoint images (the folds of a
cross-validation) or of the same images (seeds: an image with all its rows), matched by image
name with another run's (`--versus`), and groups of images (a CSV naming each image's group).
Images named by their index only are matched between runs only where the runs read one recorded
dataset. What `segjax.intervals` resamples, and a study's summed-counts row and same-images table.
"""

from __future__ import annotations

import collections
import os
import re

import ml_collections
import numpy as np

from segjax import configuration, workdirs, writers
from segjax.errors import ConfigError

CONVENTION_KEYS = ("average", "empty", "include_background")  # the eval.* keys that make counts into scores
_REPLICA = re.compile(r"seed_(\d+)")  # a K-seed run's replica folder (`train.num_seeds`)


def load(
    runs: list[str], table: str, paired_with: list[str] = ()
) -> tuple[list[str], list[str], dict[str, np.ndarray], ml_collections.ConfigDict]:
    """(image names, class names, per-image counts, the runs' `eval` conventions) of the per-image
    `table` of one run folder, or of several taken together: the folds of a cross-validation,
    each image scored once, so the interval is of the score of all of them (`study --pooled`'s
    summed-counts row), and seeds of the same images (`grouped`). A missing folder, config or
    table, a run given twice and runs with other classes or conventions are ConfigErrors naming
    them. `paired_with`: as `image_counts`'s."""
    twice = sorted(r for r, k in collections.Counter(os.path.realpath(r) for r in runs).items() if k > 1)
    if twice:
        raise ConfigError(f"{twice[0]} is given more than once")
    conventions, tables = [], []
    for run in runs:
        config_path, path = os.path.join(run, workdirs.CONFIG_FILE), os.path.join(run, table)
        mine = [path] if os.path.exists(path) else replica_tables(run, table)  # a K-seed run's: in seed_<s>/
        for missing, what in (
            (not os.path.exists(config_path), "no run (config.json)"),
            (not mine, f"no per-image table {table}"),
        ):
            if missing:
                raise ConfigError(f"{run} has {what}; train or score the run first, or give --table")
        saved, default = writers.read_json(config_path).get("eval", {}), configuration.default_config().eval
        conventions.append({k: saved.get(k, default[k]) for k in CONVENTION_KEYS})
        if conventions[-1] != conventions[0]:
            raise ConfigError(f"{run} and {runs[0]} differ in their eval.{'/'.join(CONVENTION_KEYS)}")
        tables += mine
    names, classes, counts = image_counts(tables, paired_with=paired_with)
    return names, classes, counts, ml_collections.ConfigDict(conventions[0])


def replica_tables(run: str, table: str) -> list[str]:
    """The per-image `table` of each replica of a K-seed run (`train.num_seeds`: in `seed_<s>/`
    beside the run's config.json), in seed order; [] where there are none."""
    seeds = [m for m in map(_REPLICA.fullmatch, os.listdir(run) if os.path.isdir(run) else []) if m]
    paths = [os.path.join(run, m.group(0), table) for m in sorted(seeds, key=lambda m: int(m.group(1)))]
    return [p for p in paths if os.path.exists(p)]


def run_folder(table: str) -> str:
    """The run a per-image table belongs to: its folder, or a K-seed run's for a replica's table."""
    folder = os.path.dirname(table)
    replica = _REPLICA.fullmatch(os.path.basename(folder)) and not os.path.exists(
        os.path.join(folder, workdirs.CONFIG_FILE)
    )
    return os.path.dirname(folder) if replica else folder


def read_tables(paths: list[str]) -> tuple[list[str], list[str], dict[str, np.ndarray], list[str]]:
    """(image names, class names, {tp, fp, fn, tn: [rows, C], and the bands, segment counts and
    distances every table has}, the tables that name images by their index only) of per-image
    tables taken together, in order. A missing table, one without counts and one with other classes than
    the first are ConfigErrors naming it."""
    from segjax import image_tables, scoring

    names, classes, parts, unnamed = [], None, [], []
    for path in paths:
        if not os.path.exists(path):
            raise ConfigError(f"no per-image table {path} (train or score its run first)")
        try:
            mine, their_classes, counts, named = image_tables.read_per_image_counts(path)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if classes is not None and their_classes != classes:
            raise ConfigError(f"{path} and {paths[0]} score other classes ({their_classes} / {classes})")
        names, classes = names + mine, their_classes
        parts.append(counts)
        unnamed += [] if named else [path]
    kinds = [k for k in parts[0] if all(k in p for p in parts)] if parts else scoring.COUNT_KINDS
    return names, classes, {k: np.concatenate([p[k] for p in parts]) for k in kinds}, unnamed


def require_matched(runs: list[str], unnamed: list[str]) -> None:
    """Tables that name images only by their index (a dataset that stores no file names) name the
    same images in several runs only if those runs read the same dataset (each run's recorded
    `workdirs.DATASET_FILE`); otherwise index 0 of one run and of another need not be one image,
    and matching them (`grouped`) would be wrong: a ConfigError."""
    if not unnamed or len(runs) < 2:
        return
    paths = [os.path.join(run, workdirs.DATASET_FILE) for run in runs]
    datasets = {writers.read_json(p).get("dataset") if os.path.exists(p) else None for p in paths}
    if None in datasets or len(datasets) > 1:
        raise ConfigError(
            f"{unnamed[0]} names its images by index only, and the runs did not all read one recorded "
            "dataset: images of several runs cannot be matched (give one run)"
        )


def grouped(names: list[str], counts: dict[str, np.ndarray]) -> tuple[list[str], dict[str, np.ndarray]]:
    """Rows of the same image (its seeds, each scored by another run) brought together: (the
    names once, in first-seen order, and counts [N, C], or [N, K, C] when every image has K > 1
    rows), so a resample draws images with all their rows (a cluster bootstrap: seeds are not
    further images). Images with different numbers of rows (a seed of one fold missing) are a
    ConfigError naming one."""
    rows: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        rows.setdefault(name, []).append(i)
    sizes = collections.Counter(len(r) for r in rows.values())
    if len(sizes) > 1:
        few = min(sizes)
        example = next(n for n, r in rows.items() if len(r) == few)
        raise ConfigError(
            f"images are in different numbers of runs (e.g. {example!r}: {few}, others {max(sizes)}): give every "
            "seed of every fold (or one seed of each)"
        )
    index = np.array(list(rows.values()))  # [N, K]
    if index.shape[1] == 1:
        index = index[:, 0]
    return list(rows), {k: v[index] for k, v in counts.items()}


def paired_counts(names: list[str], other_names: list[str], other: dict[str, np.ndarray], run: str, versus: str):
    """`other`'s rows in the order of `names`: the same images, or a ConfigError saying which differ."""
    if sorted(names) != sorted(other_names) or len(set(names)) != len(names):
        only = sorted(set(names) ^ set(other_names))[:3]
        raise ConfigError(f"{run} and {versus} were scored on other images (e.g. {only}); compare runs of one split")
    position = {n: i for i, n in enumerate(other_names)}
    order = [position[n] for n in names]
    return {k: v[order] for k, v in other.items()}


def image_counts(
    paths: list[str], class_names=None, paired_with: list[str] = ()
) -> tuple[list[str], list[str], dict[str, np.ndarray]]:
    """(image names, class names, counts [N, C] or [N, K, C]) of the per-image tables `paths`
    (one per run, `<run>/<table>`) taken together (`read_tables`, `require_matched`, `grouped`);
    tables of other classes than `class_names` (when given) are a ConfigError. `paired_with`: the
    runs whose images these will be matched with by name (`paired_counts`), so images named by
    index must come from the same recorded dataset there too."""
    names, classes, counts, unnamed = read_tables(paths)
    require_matched([*map(run_folder, paths), *paired_with], unnamed)
    if class_names is not None and classes != list(class_names):
        raise ConfigError(f"the per-image tables score the classes {classes}, the runs {list(class_names)}")
    names, counts = grouped(names, counts)
    return names, classes, counts


def image_groups(names: list[str], groups_csv: str, column: str, id_column: str = "id") -> dict[str, np.ndarray]:
    """The rows of `names` in each group (`report.groups`: `groups_csv`'s `column` by its
    `id_column`), groups sorted. A missing file or column, or an image it does not name, is a ConfigError."""
    from segjax import report

    if not os.path.exists(groups_csv):
        raise ConfigError(f"--groups={groups_csv} does not exist")
    try:
        group_of = report.groups(groups_csv, column, id_column)
    except KeyError as err:
        raise ConfigError(str(err.args[0])) from None
    missing = [n for n in names if n not in group_of]
    if missing:
        raise ConfigError(f"{groups_csv} has no {id_column!r} row for the images {missing[:3]} ({len(missing)} in all)")
    order = np.array([group_of[n] for n in names])
    return {g: np.flatnonzero(order == g) for g in sorted(set(order))}
