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
an image with all its seeds' rows (seeds are not further images; `matched_tables` reads and
matches the tables).
`--versus` gives the interval of the paired difference, this run minus the other, with the same
images drawn for both (their tables matched by image name): whether two models differ on these
images (`segjax.compare` asks the same over seeds). `--groups` adds the same per group of
images (a CSV naming each image's group, e.g. a dataset's imaging modality): where a model wins
and where it does not, each with its interval. A bootstrap over few images is too narrow
(five images have at most 126 distinct resamples): the table states the number of images.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from absl import app, flags

from segjax import configuration, matched_tables, writers
from segjax.errors import ConfigError, exit_on_user_error

DEFAULT_TABLE = writers.PER_IMAGE_FILE
RESAMPLES, LEVEL = 10_000, 0.95  # the CLI's defaults, and `study --pooled`'s
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
    `versus` the two-sided `p` of no difference of a paired permutation test
    (`same_images.permutation_p`).
    Resamples where a score is undefined (a class absent from every drawn image, under
    `eval.empty='nan'`) are left out of its interval; `undefined` counts them. One image gives no
    interval and no p (NaN): every resample is that image, which says nothing about other images."""
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
    if versus is not None:  # one image: no p either (NaN)
        from segjax import same_images

        found = (
            same_images.permutation_p(runs[0], runs[1], eval_cfg, class_names, keys, resamples, seed) if n > 1 else {}
        )
        for key in keys:
            out[key]["p"] = found.get(key, float("nan"))
    return out


def scorable(counts: dict[str, np.ndarray], eval_cfg, class_names) -> set[str]:
    """The keys `bootstrap` can bound from these counts ([N, C] or [N, K, C]): the pixel counts'
    scores and, where the tables hold them, boundary IoU (bands), PQ (segment counts), AP (their
    matches per IoU threshold), HD95 and surface Dice (distances); `val/...` names."""
    from segjax import scoring

    flat = {k: v.reshape(-1, v.shape[-1]) for k, v in counts.items()}
    return set(scoring.count_scores(flat, eval_cfg, class_names))


def per_group(counts, rows_of_groups: dict, eval_cfg, class_names, keys, *args, versus=None) -> dict[str, dict]:
    """Per group (`matched_tables.image_groups`: group -> its rows): {"images": how many,
    "intervals": `bootstrap` over its images alone (`*args`: resamples, level, seed), with `versus`
    the other run's same rows}."""
    out = {}
    for group, rows in rows_of_groups.items():
        mine, theirs = ({k: v[rows] for k, v in c.items()} if c is not None else None for c in (counts, versus))
        out[group] = {
            "images": len(rows),
            "intervals": bootstrap(mine, eval_cfg, class_names, keys, *args, versus=theirs),
        }
    return out


# what `print_results` bounds, where a run's table holds it
RESULT_KEYS = ("val/miou", "val/accuracy", "val/mbiou", "val/pq", "val/ap50_95", "val/mnsd", "val/mhd95")


def result_keys(counts: dict[str, np.ndarray], eval_cfg, class_names, judged_by: str = "") -> list[str]:
    """The `RESULT_KEYS` these counts can score, then `judged_by` (a run's `train.best_metric`)
    where they can (`val/loss` cannot): what a run's results line (and the notebook) bound."""
    scored = scorable(counts, eval_cfg, class_names)
    return [k for k in dict.fromkeys((*RESULT_KEYS, judged_by)) if k in scored]


def print_results(
    tables: list[str], config: ml_collections.ConfigDict, split: str = "validation", out: str = "", class_names=None
) -> str:
    """Print (and return) one line for under a run's results table: the `LEVEL` percentile-bootstrap
    interval over the images of its per-image `tables` (one per replica: an image drawn with all
    its seeds' rows) of the `RESULT_KEYS` they hold and the score the run is judged by
    (`train.best_metric`, e.g. ISBI's `val/dice/membrane`, where the counts make it), with
    `config.eval.interval_resamples` resamples under the run's conventions (nothing when that is 0).
    Tables that cannot be read give a line saying why, not an error: the run's results stand
    without it. With `out`, the intervals are also written there as JSON (the record
    `python -m segjax.intervals --out` writes for the same tables; the test split's keys named
    `test/...`); where there are none, an earlier file at `out` is removed, so it never holds the
    intervals of another table. `class_names`: the tables' classes where they are not the
    config's (a baseline's foreground / background)."""
    resamples, line, record = config.eval.interval_resamples, "", None
    if resamples:
        line, record = _results(tables, config, split, resamples, class_names)
    if out and record is not None:
        writers.write_record(out, record)
    elif out and os.path.exists(out):
        os.remove(out)
    if line:
        print(line)
    return line


def _results(tables: list[str], config, split: str, resamples: int, class_names) -> tuple[str, dict | None]:
    """`print_results`' line and JSON record (None where the tables cannot be read)."""
    from segjax import instances, scored_splits

    try:
        names, classes, counts = matched_tables.image_counts(tables, class_names or instances.class_names(config))
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
    runs, table = list(dict.fromkeys(map(matched_tables.run_folder, tables))), os.path.basename(tables[0])
    bounds = scored_splits.split_keys(bounds, scored_splits.split_naming(split)[0])  # test/... on the test split
    return line, _record(runs, [], table, len(names), LEVEL, resamples, 0, bounds, split=split)


def _record(runs, versus, table, images, level, resamples, seed, results, **more) -> dict:
    """The JSON record of intervals: what was bounded, how, and per key the `bootstrap` result."""
    record = {"runs": runs, "versus": versus, "table": table, "images": images, "level": level, **more}
    record.update(resamples=resamples, seed=seed, intervals=results)
    return record


def markdown(results: dict, n: int, level: float, versus: str = "") -> str:
    """The CLI's table: per key the score (with `versus`: the difference, and its permutation p of
    no difference), its interval, the images and the undefined resamples."""
    what = f"difference (this run - {versus})" if versus else "score"
    holm = " (Holm over the groups)" if any("p_holm" in r for r in results.values()) else ""
    p_head, p_rule = (f" p (two-sided){holm} |", "---|") if versus else ("", "")
    lines = [
        f"| key | {what} | {level:.0%} interval |{p_head} images | undefined resamples |",
        "|---|---|---|" + p_rule + "---|---|",
    ]
    for key, r in results.items():
        adjusted = f" ({_number(r['p_holm'], '.2g')})" if "p_holm" in r else ""
        p = f" {_number(r['p'], '.2g')}{adjusted} |" if versus else ""
        interval = f"[{_number(r['low'])}, {_number(r['high'])}]"
        lines.append(f"| {key} | {_number(r['estimate'])} | {interval} |{p} {n} | {r['undefined']} |")
    return "\n".join(lines)


def _number(value, spec: str = ".4f") -> str:
    """A table cell: n/a where there is no number (NaN, or null in an intervals file)."""
    return "n/a" if value is None or value != value else format(value, spec)


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
    flags.DEFINE_integer(
        "resamples", RESAMPLES, "Bootstrap resamples; with --versus also the most swaps of the permutation test's p."
    )
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
        names, classes, counts, eval_cfg = matched_tables.load(runs, f.table)
        eval_cfg.average = f.average or eval_cfg.average
        other = None
        if f.versus:
            other_names, other_classes, other_counts, other_eval = matched_tables.load(f.versus, f.table, runs)
            other_eval.average = f.average or other_eval.average
            if other_classes != classes or other_eval.to_dict() != eval_cfg.to_dict():
                raise ConfigError(f"{runs} and {f.versus} differ in their classes or eval settings")
            other = matched_tables.paired_counts(names, other_names, other_counts, ", ".join(runs), ", ".join(f.versus))
        by_group = matched_tables.image_groups(names, f.groups, f.group_by, f.group_id) if f.groups else {}
        results = bootstrap(counts, eval_cfg, classes, f.keys, f.resamples, f.level, f.seed, other)
        print(markdown(results, len(names), f.level, ", ".join(f.versus)))
        grouped_results = per_group(
            counts, by_group, eval_cfg, classes, f.keys, f.resamples, f.level, f.seed, versus=other
        )
        if other is not None:
            from segjax import same_images

            same_images.adjust([g["intervals"] for g in grouped_results.values()], f.keys)
        for group, found in grouped_results.items():
            table = markdown(found["intervals"], found["images"], f.level, ", ".join(f.versus))
            print(f"\n{f.group_by} = {group}:\n" + table)
        if f.out:
            record = _record(runs, f.versus, f.table, len(names), f.level, f.resamples, f.seed, results)
            if by_group:
                record.update(group_by=f.group_by, groups=grouped_results)
            writers.write_record(f.out, record)


if __name__ == "__main__":
    define_flags()
    configuration.quiet_libraries()
    app.run(main)
