"""Confidence intervals over images: how far a run's split-wide score could move on other images
like the ones it was scored on (the percentile bootstrap over its per-image table).

    python -m segjax.intervals runs/isbi [more runs] --keys=val/dice/membrane,val/accuracy [--versus=runs/other]
        [--table=val_per_image.csv] [--average=per_image] [--resamples=10000] [--level=0.95] [--seed=0]
        [--groups=index.csv --group_by=stratum [--group_id=id]] [--out=ci.json]

A validation split of five images gives one number, and five other images would have given
another. Each resample draws as many images with replacement, sums their pixel counts (the
`tp/<class>`, ... columns of the per-image table) or, with `eval.average='per_image'`, averages
their scores, and scores them under the run's own conventions (config.json's `eval.average`,
`eval.empty`, `eval.include_background`; `--average` for a table rescored under another) with
`scoring.count_score_arrays`, so the interval is around the very number the run reports.
Several runs of disjoint images (the folds of a cross-validation) are taken together: the
interval of the score of all their images; runs of the same images (seeds) are drawn together,
an image with all its seeds' rows (seeds are not further images).
`--versus` gives the interval of the paired difference, this run minus the other, with the same
images drawn for both (their tables matched by image name): whether two models differ on these
images (`segjax.compare` asks the same over seeds). `--groups` adds the same per group of
images (a CSV naming each image's group, e.g. a dataset's imaging modality): where a model wins
and where it does not, each with its interval. A bootstrap over few images is too narrow
(five images have at most 126 distinct resamples): the table states the number of images.
"""

from __future__ import annotations

import collections
import os
import re

import ml_collections
import numpy as np
from absl import app, flags

from segjax import configuration, workdirs, writers
from segjax.errors import ConfigError, exit_on_user_error

DEFAULT_TABLE = writers.PER_IMAGE_FILE
CONVENTION_KEYS = ("average", "empty", "include_background")  # the eval.* keys that make counts into scores
RESAMPLES, LEVEL = 10_000, 0.95  # the CLI's defaults, and `study --pooled`'s
_REPLICA = re.compile(r"seed_(\d+)")  # a K-seed run's replica folder (`train.num_seeds`)
CHUNK_VALUES = 4_000_000  # drawn counts held at once per kind (resamples x images x classes): 32 MB of int64


def bootstrap(
    counts: dict[str, np.ndarray],
    eval_cfg: ml_collections.ConfigDict,
    class_names,
    keys,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    versus: dict[str, np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """Per key: `estimate` (the score of all images; with `versus`, minus the other run's score
    of the same images) and the percentile interval `low`, `high` at `level` over `resamples`
    resamples of the images (rows of the [N, C] `counts`, or [N, K, C]: K rows of each image,
    e.g. its seeds (`grouped`), drawn together; `versus`'s rows are the same images), and with
    `versus` the two-sided bootstrap `p` of no difference (`p_value`). Resamples where a score is
    undefined (a class absent from every drawn image, under `eval.empty='nan'`) are left out of
    its interval; `undefined` counts them. One image gives no interval and no p (NaN): every
    resample is that image, which says nothing about other images."""
    from segjax import scoring  # jax only when scoring

    if not 0 < level < 1:
        raise ConfigError(f"--level={level}: a confidence level in (0, 1), e.g. 0.95")
    if resamples < 1:
        raise ConfigError(f"--resamples={resamples}: at least 1")
    n = len(counts["tp"])
    # [N, K, C]: an image's K rows (`grouped`: its seeds) are drawn together
    runs = [{k: v.reshape(n, -1, v.shape[-1]) for k, v in c.items()} for c in [counts, versus] if c is not None]
    full = [
        scoring.count_scores({k: v.reshape(-1, v.shape[-1]) for k, v in c.items()}, eval_cfg, class_names) for c in runs
    ]
    common = set(full[0]).intersection(*full[1:])  # boundary IoU, PQ, ...: where both runs' tables have them
    missing = sorted(set(keys) - common)
    if missing:
        raise ConfigError(f"{missing}: not a score of these per-image counts; choose from {sorted(common)}")
    rng = np.random.default_rng(seed)
    chunk = max(1, CHUNK_VALUES // max(1, max(c["tp"].size for c in runs)))
    samples = {k: [] for k in keys}
    for start in range(0, resamples, chunk):  # drawn chunk by chunk: memory bounded for any split
        take = rng.integers(0, n, (min(chunk, resamples - start), n))
        drawn = [{k: v[take].reshape(len(take), -1, v.shape[-1]) for k, v in c.items()} for c in runs]
        scored = [scoring.count_score_arrays(d, eval_cfg, class_names, True) for d in drawn]
        for key in keys:
            samples[key].append(scored[0][key] - scored[1][key] if versus is not None else scored[0][key])
    out = {}
    for key in keys:
        values = np.concatenate(samples[key]).astype(np.float64)
        finite = values[~np.isnan(values)]
        # one image says nothing about other images: every resample is it (no interval, no p)
        spread = finite.size and n > 1
        low, high = np.percentile(finite, [50 * (1 - level), 50 * (1 + level)]) if spread else (np.nan, np.nan)
        estimate = full[0][key] - full[1][key] if versus is not None else full[0][key]
        out[key] = {
            "estimate": estimate,
            "low": float(low),
            "high": float(high),
            "undefined": int(values.size - finite.size),
        }
        if versus is not None:
            out[key]["p"] = p_value(finite) if n > 1 else float("nan")
    return out


def p_value(differences: np.ndarray) -> float:
    """The two-sided bootstrap p-value of 'no difference' from resampled differences: twice the
    smaller share of them on either side of 0 (the 1 - level at which the percentile interval
    reaches 0), each share counted as (k + 1) / (R + 1) so that R resamples never give p = 0
    (Davison & Hinkley's Monte Carlo p); at most 1, NaN without resamples."""
    r = differences.size
    if not r:
        return float("nan")
    below, above = (np.sum(differences <= 0) + 1) / (r + 1), (np.sum(differences >= 0) + 1) / (r + 1)
    return float(min(1.0, 2 * min(below, above)))


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


def scorable(counts: dict[str, np.ndarray], eval_cfg, class_names) -> set[str]:
    """The keys `bootstrap` can bound from these counts ([N, C] or [N, K, C]): the pixel counts'
    scores and, where the tables hold them, boundary IoU (bands), PQ (segment counts), AP (their
    matches per IoU threshold), HD95 and surface Dice (distances); `val/...` names."""
    from segjax import scoring

    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in counts.items()}
    return set(scoring.count_scores(flat, eval_cfg, class_names))


def versus_table(tables: dict[str, list[str]], reference: str, keys, eval_cfg, class_names) -> tuple[str, int]:
    """(markdown, number of images): each variant of `tables` (variant -> its runs' per-image
    tables) minus `reference` on the same images, per key: the difference of the scores of
    every seed's counts together, `+0.0012 [-0.0005, +0.0029] p=0.14 (Holm 0.41)`, the paired
    percentile-bootstrap interval over the images (`bootstrap` with `versus`; an image drawn for
    both with all its seeds' rows), the bootstrap p of no difference and that p adjusted for the
    number of variants (`compare.holm`, per key). Keys the tables cannot score (boundary IoU, PQ,
    AP, HD95 or NSD where either side's tables have no bands, segment counts or distances) are
    n/a; `keys` may name another split's scores (`test/...`). Tables that cannot be read or
    matched: a ConfigError."""
    from segjax import compare

    ref_names, _, ref_counts = image_counts(tables[reference], class_names)
    scored = scorable(ref_counts, eval_cfg, class_names)
    as_val = {k: "val/" + k.split("/", 1)[1] for k in keys}  # count_scores names every split's scores val/
    usable = [as_val[k] for k in keys if as_val[k] in scored]
    results = {}
    for variant, paths in tables.items():
        if variant == reference:
            continue
        names, _, counts = image_counts(paths, class_names, [run_folder(p) for p in tables[reference]])
        other = paired_counts(names, ref_names, ref_counts, variant, reference)
        both = [k for k in usable if k in scorable(counts, eval_cfg, class_names)]
        results[variant] = bootstrap(counts, eval_cfg, class_names, both, versus=other)
    for key in usable:  # Holm over the variants that could score the key
        scored = [r[key] for r in results.values() if key in r]
        for r, adjusted in zip(scored, compare.holm([r["p"] for r in scored]), strict=True):
            r["p_holm"] = adjusted
    lines = [f"| variant - {reference} | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for variant, result in results.items():
        cells = []
        for r in (result.get(as_val[key]) for key in keys):
            if r is None:
                cells.append("n/a")
                continue
            interval = f"[{r['low']:+.4f}, {r['high']:+.4f}]"
            cells.append(f"{r['estimate']:+.4f} {interval} p={r['p']:.2g} (Holm {r['p_holm']:.2g})")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines), len(ref_names)


# what `results_line` bounds, where a run's table holds it
RESULT_KEYS = ("val/miou", "val/accuracy", "val/mbiou", "val/pq", "val/ap50_95", "val/mnsd", "val/mhd95")


def result_keys(counts: dict[str, np.ndarray], eval_cfg, class_names, judged_by: str = "") -> list[str]:
    """The `RESULT_KEYS` these counts can score, then `judged_by` (a run's `train.best_metric`)
    where they can (`val/loss` cannot): what a run's results line (and the notebook) bound."""
    scored = scorable(counts, eval_cfg, class_names)
    return [k for k in dict.fromkeys((*RESULT_KEYS, judged_by)) if k in scored]


def results_line(
    tables: list[str], config: ml_collections.ConfigDict, split: str = "validation", out: str = "", class_names=None
) -> str:
    """One line for under a run's results table: the `LEVEL` percentile-bootstrap interval over the
    images of its per-image `tables` (one per replica: an image drawn with all its seeds' rows) of
    the `RESULT_KEYS` they hold and the score the run is judged by (`train.best_metric`, e.g. ISBI's
    `val/dice/membrane`, where the counts make it), with `config.eval.interval_resamples` resamples
    under the run's conventions ('' when that is 0). Tables that cannot be read give a line saying why, not an error:
    the run's results stand without it. With `out`, the intervals are also written there as JSON
    (the record `python -m segjax.intervals --out` writes for the same tables; the test split's
    keys named `test/...`); where there are none, an earlier file at `out` is removed, so it never
    holds the intervals of another table. `class_names`: the tables' classes where they are not
    the config's (a baseline's foreground / background)."""
    resamples, line, record = config.eval.interval_resamples, "", None
    if resamples:
        line, record = _results(tables, config, split, resamples, class_names)
    if out and record is not None:
        writers.write_record(out, record)
    elif out and os.path.exists(out):
        os.remove(out)
    return line


def _results(tables: list[str], config, split: str, resamples: int, class_names) -> tuple[str, dict | None]:
    """`results_line`'s line and JSON record (None where the tables cannot be read)."""
    from segjax import instances, scored_splits

    try:
        names, classes, counts = image_counts(tables, class_names or instances.class_names(config))
    except ConfigError as err:
        return f"(no intervals over the images: {err})", None
    keys = result_keys(counts, config.eval, classes, config.train.best_metric)
    bounds = bootstrap(counts, config.eval, classes, keys, resamples)
    cells = [f"{k.split('/', 1)[1]} [{bounds[k]['low']:.4f}, {bounds[k]['high']:.4f}]" for k in keys]
    seeds = f", each with its {counts['tp'].shape[1]} seeds" if counts["tp"].ndim == 3 else ""
    line = (
        f"{LEVEL:.0%} intervals over the {len(names)} {split} images{seeds} ({resamples} bootstrap resamples; "
        f"python -m segjax.intervals for more): " + ", ".join(cells)
    )
    runs, table = list(dict.fromkeys(map(run_folder, tables))), os.path.basename(tables[0])
    bounds = scored_splits.split_keys(bounds, scored_splits.split_naming(split)[0])  # test/... on the test split
    return line, _record(runs, [], table, len(names), LEVEL, resamples, 0, bounds, split=split)


def _record(runs, versus, table, images, level, resamples, seed, results, **more) -> dict:
    """The JSON record of intervals: what was bounded, how, and per key the `bootstrap` result."""
    record = {"runs": runs, "versus": versus, "table": table, "images": images, "level": level, **more}
    record.update(resamples=resamples, seed=seed, intervals=results)
    return record


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


def markdown(results: dict, n: int, level: float, versus: str = "") -> str:
    """The CLI's table: per key the score (with `versus`: the difference, and its bootstrap p of
    no difference), its interval, the images and the undefined resamples."""
    what = f"difference (this run - {versus})" if versus else "score"
    p_head, p_rule = (" p (two-sided) |", "---|") if versus else ("", "")
    lines = [
        f"| key | {what} | {level:.0%} interval |{p_head} images | undefined resamples |",
        "|---|---|---|" + p_rule + "---|---|",
    ]
    for key, r in results.items():
        p = f" {r['p']:.2g} |" if versus else ""
        lines.append(f"| {key} | {r['estimate']:.4f} | [{r['low']:.4f}, {r['high']:.4f}] |{p} {n} | {r['undefined']} |")
    return "\n".join(lines)


def define_flags() -> None:
    flags.DEFINE_list("keys", ["val/miou", "val/accuracy"], "Scores to bound, e.g. val/dice/membrane.")
    flags.DEFINE_string("table", DEFAULT_TABLE, "The per-image table in the run folder (e.g. eval_best_per_image.csv).")
    flags.DEFINE_list("versus", [], "Other run(s) scored on the same images: the interval of the difference.")
    flags.DEFINE_enum(
        "average",
        None,
        ["dataset", "per_image", "micro"],
        "eval.average, if not the run's (a table rescored under another).",
    )
    flags.DEFINE_integer("resamples", RESAMPLES, "Bootstrap resamples.")
    flags.DEFINE_float("level", LEVEL, "Confidence level of the percentile interval.")
    flags.DEFINE_integer("seed", 0, "Seed of the resampling.")
    flags.DEFINE_string(
        "groups", "", "A CSV naming each image's group (e.g. the dataset's index.csv): intervals per group."
    )
    flags.DEFINE_string("group_by", "", "With --groups: the column that holds the group, e.g. stratum.")
    flags.DEFINE_string("group_id", "id", "With --groups: the column that holds the image names.")
    flags.DEFINE_string("out", "", "Also write the intervals as JSON to this file (not replaced: choose a new name).")


def main(argv):
    with exit_on_user_error():
        runs, f = argv[1:], flags.FLAGS
        if not runs:
            raise ConfigError("give a run folder (or the folds of one split): python -m segjax.intervals runs/isbi")
        if f.out and os.path.exists(f.out):
            raise ConfigError(f"--out={f.out} exists; choose another file")
        if bool(f.groups) != bool(f.group_by):
            raise ConfigError("--groups and --group_by go together: --groups=index.csv --group_by=stratum")
        names, classes, counts, eval_cfg = load(runs, f.table)
        eval_cfg.average = f.average or eval_cfg.average
        other = None
        if f.versus:
            other_names, other_classes, other_counts, other_eval = load(f.versus, f.table, runs)
            other_eval.average = f.average or other_eval.average
            if other_classes != classes or other_eval.to_dict() != eval_cfg.to_dict():
                raise ConfigError(f"{runs} and {f.versus} differ in their classes or eval settings")
            other = paired_counts(names, other_names, other_counts, ", ".join(runs), ", ".join(f.versus))
        by_group = image_groups(names, f.groups, f.group_by, f.group_id) if f.groups else {}
        results = bootstrap(counts, eval_cfg, classes, f.keys, f.resamples, f.level, f.seed, other)
        print(markdown(results, len(names), f.level, ", ".join(f.versus)))
        grouped_results = {}
        for group, rows in by_group.items():  # the same bootstrap over each group's images alone
            mine, theirs = ({k: v[rows] for k, v in c.items()} if c is not None else None for c in (counts, other))
            found = bootstrap(mine, eval_cfg, classes, f.keys, f.resamples, f.level, f.seed, theirs)
            grouped_results[group] = {"images": len(rows), "intervals": found}
            print(f"\n{f.group_by} = {group}:\n" + markdown(found, len(rows), f.level, ", ".join(f.versus)))
        if f.out:
            record = _record(runs, f.versus, f.table, len(names), f.level, f.resamples, f.seed, results)
            if by_group:
                record.update(group_by=f.group_by, groups=grouped_results)
            writers.write_record(f.out, record)


if __name__ == "__main__":
    define_flags()
    configuration.quiet_libraries()
    app.run(main)
