"""A study's tables: mean +- sample std over seeds per variant (`summarize`, `markdown`),
written as runs.csv and summary.md (`write_results`), and each variant against a reference,
paired by seed (`write_comparison`, comparison.md); the test split's as runs_test.csv,
summary_test.md and comparison_test.md. Rows are `segjax.study.collect`'s: one per
finished run, `variant`, `seed` and its numeric metrics.json values; notebooks and
`segjax.plots` read them the same way.
"""

from __future__ import annotations

import csv
import math
import os

import numpy as np

from segjax import scored_splits, writers
from segjax.errors import ConfigError

SUMMARY_KEYS = ("val/miou", "val/mdice", "val/accuracy", "val/mbiou")
# host-side scores, summarised when the runs computed them (instances.enabled, eval.surface_metrics)
OPTIONAL_KEYS = ("val/pq", "val/ap50_95", "val/mnsd", "val/mhd95")


# each image's scores and counts beside a run's metrics.json (train) and eval_best_test.json
# (`study.TEST_SCORES`: its best checkpoint rescored on the test split)
PER_IMAGE_TABLES = {"validation": writers.PER_IMAGE_FILE, "test": "eval_best_test_per_image.csv"}
BASELINE_TEST_TABLE = "test_per_image.csv"  # a baseline variant's (`baselines.run`, split='test')

POOLED = "all (pooled)"
SUMMED = "all (summed counts)"


def require_keys(rows: list[dict], keys, where: str = "the runs' metrics.json") -> None:
    """A key in none of `rows` (a typo such as `val/mious`) is an error naming the keys there are,
    not a column of n/a or an empty plot. No rows: nothing to check."""
    present = {k for r in rows for k in r} - {"variant", "seed"}
    missing = [k for k in keys if k not in present]
    if missing and rows:
        raise KeyError(f"{missing} are in none of {where}; they hold {sorted(present)}")


def summarize(rows: list[dict], keys=SUMMARY_KEYS, pooled: bool = False, summed: dict | None = None) -> list[dict]:
    """Per variant (in first-seen order): n and mean / sample std (ddof=1) over seeds of `keys`.
    `pooled` adds a last entry (`POOLED`) over every run of every variant: for variants that are
    the folds of a cross-validation, the cross-validated mean and its spread over folds.
    `summed` (`summed_counts`) adds one more (`SUMMED`): its keys' values, NaN where a key is not
    made of counts (HD95; boundary IoU and PQ of runs without band or segment counts), and
    `<key>_low` / `<key>_high` where `summed` has an interval (`summed_interval`). A standard
    column (SUMMARY_KEYS, OPTIONAL_KEYS) no run computed is NaN (n/a in `markdown`); any other key
    no run has is an error (`require_keys`)."""
    standard = [k for prefix in ("val", "test") for k in _named(SUMMARY_KEYS + OPTIONAL_KEYS, prefix)]
    require_keys(rows, [k for k in keys if k not in standard])
    groups = {
        variant: [r for r in rows if r["variant"] == variant] for variant in dict.fromkeys(r["variant"] for r in rows)
    }
    if pooled and rows:
        groups[POOLED] = rows
    out = []
    for variant, mine in groups.items():
        entry = {"variant": variant, "n": len(mine)}
        for key in keys:
            values = np.array([r[key] for r in mine if r.get(key) is not None], np.float64)
            entry[key] = float(values.mean()) if len(values) else math.nan
            entry[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        out.append(entry)
    if summed is not None and rows:
        entry = {"variant": SUMMED, "n": len(rows)}
        for key in keys:
            entry[key], entry[f"{key}_std"] = float(summed.get(key, math.nan)), math.nan
            for end in ("low", "high"):
                entry[f"{key}_{end}"] = float(summed.get(f"{key}_{end}", math.nan))
        out.append(entry)
    return out


def summed_counts(
    rows: list[dict], eval_cfg, class_names, split: str = "validation", per_image_tables=None
) -> dict[str, float]:
    """The scores of the pixel counts of every run in `rows` taken together (`scoring.count_scores`,
    under the runs' `eval` conventions): for the folds of a cross-validation each image counted
    once, so the whole dataset's score, where `POOLED` is the mean of the folds' scores. The runs'
    summed counts (`<prefix>/tp/<class>`, ...) serve 'dataset' and 'micro' averages; 'per_image'
    (nnU-Net's mean over cases) reads each image's counts from `per_image_tables` (a per-image CSV
    per row). Boundary IoU, PQ and AP come from the runs' band and segment counts where every run has
    them, HD95 and surface Dice (means over images) from the tables' distances. A run without
    counts (scored before they were reported) or without its table is a KeyError saying so."""
    from segjax import scoring

    prefix = scored_splits.split_naming(split)[0]
    if eval_cfg.average == "per_image":
        counts = _image_counts(per_image_tables or [], class_names)
    else:
        counts = {}
        for kind in scoring.COUNT_KINDS:
            keys = [f"{prefix}/{kind}/{name}" for name in class_names]
            lacking = sum(any(k not in r for k in keys) for r in rows)
            if lacking:
                raise KeyError(f"{lacking} of {len(rows)} runs report no {keys[0]} (scored before pixel counts were)")
            counts[kind] = np.array([[r[k] for k in keys] for r in rows], np.int64).sum(axis=0)
        # boundary IoU, PQ and AP too, where every run reports their counts (PQ's: the classes after background)
        segment_classes = [n for n in class_names[1:] if f"{prefix}/pq_tp/{n}" in rows[0]]
        segments = (*scoring.PQ_KINDS, *scoring.AP_KINDS)
        for kinds, names in ((scoring.BOUNDARY_KINDS, class_names), (segments, segment_classes)):
            for kind in kinds:
                keys = [f"{prefix}/{kind}/{name}" for name in names]
                if keys and all(k in r for r in rows for k in keys):
                    counts[kind] = np.array([[r[k] for k in keys] for r in rows], np.float64).sum(axis=0)
        try:  # HD95 and NSD, means of per-image distances: from the runs' tables, where they have them
            found = _image_counts(per_image_tables or [], class_names)
        except KeyError:
            found = {}
        counts.update({k: v for k, v in found.items() if k in scoring.SURFACE_KINDS})
    return scored_splits.split_keys(scoring.count_scores(counts, eval_cfg, class_names), prefix)


def run_tables(workdir: str, rows: list[dict], split: str) -> list[str]:
    """The per-image table of each run of `rows` in the study folder `workdir` (`PER_IMAGE_TABLES`;
    a baseline variant's test split: `BASELINE_TEST_TABLE`)."""
    tables = []
    for r in rows:
        run = os.path.join(workdir, r["variant"], f"seed_{r['seed']}")
        path = os.path.join(run, PER_IMAGE_TABLES[split])
        baseline = os.path.join(run, BASELINE_TEST_TABLE)
        tables.append(baseline if split == "test" and not os.path.exists(path) and os.path.exists(baseline) else path)
    return tables


def summed_interval(summed: dict, tables: list[str], eval_cfg, class_names) -> tuple[dict, str]:
    """`summed` with `<key>_low` / `<key>_high`: the interval of each of its scores over the images
    of the per-image `tables` (`segjax.intervals`: an image drawn with all its seeds' rows), and
    the note that says so; without readable tables, `summed` alone and a note saying why."""
    from segjax import intervals, matched_tables

    try:
        images, _, counts = matched_tables.image_counts(tables, class_names)
    except ConfigError as err:
        return summed, f"No interval for '{SUMMED}': {err}."
    val = {k: "val/" + k.split("/", 1)[1] for k in summed}  # the bootstrap names every split's scores val/
    scored = intervals.scorable(counts, eval_cfg, class_names)  # boundary IoU, PQ, HD95: where the tables have them
    val = {k: name for k, name in val.items() if name in scored}
    bounds = intervals.bootstrap(counts, eval_cfg, class_names, list(val.values()))
    out = dict(summed)
    for key, name in val.items():
        out[f"{key}_low"], out[f"{key}_high"] = bounds[name]["low"], bounds[name]["high"]
    rows = f", each image drawn with its {counts['tp'].shape[1]} runs' rows" if counts["tp"].ndim == 3 else ""
    note = (
        f"'{SUMMED}' [low, high]: {intervals.LEVEL:.0%} percentile-bootstrap interval over its "
        f"{len(images)} images ({intervals.RESAMPLES} resamples{rows}; segjax.intervals)."
    )
    return out, note


def _image_counts(tables: list[str], class_names) -> dict[str, np.ndarray]:
    """Per-class counts [images, C] of every row of the per-image CSVs `tables` (`tp/<class>`, ...)."""
    from segjax import matched_tables

    missing = [t for t in tables if not os.path.exists(t)]
    if missing or not tables:
        raise KeyError(f"{len(missing)} runs have no per-image table ({', '.join(missing[:2]) or 'none given'})")
    try:
        _, classes, counts, _ = matched_tables.read_tables(tables)
    except ConfigError as err:  # a table without counts (scored before they were)
        raise KeyError(str(err)) from None
    if classes != list(class_names):
        raise KeyError(f"the per-image tables score the classes {classes}, the runs {list(class_names)}")
    return counts


def code_note(workdir: str, rows: list[dict]) -> str:
    """`provenance.mixed_code` of the runs behind `rows` under the study folder `workdir` ('' when
    one code made them all); a vmapped run's record is in its variant's folder."""
    from segjax import provenance

    dirs = []
    for r in rows:
        run, vmapped = os.path.join(workdir, r["variant"], f"seed_{r['seed']}"), os.path.join(workdir, r["variant"])
        missing = not os.path.exists(os.path.join(run, provenance.FILE))
        dirs.append(vmapped if missing and os.path.exists(os.path.join(vmapped, provenance.FILE)) else run)
    return provenance.mixed_code(dirs)


def markdown(summary: list[dict], keys=SUMMARY_KEYS) -> str:
    """The summary as a markdown table: `mean ± std` (std over seeds, ddof=1), or `value [low,
    high]` where an entry has an interval (the summed-counts row)."""
    head = "| variant | n | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 2)]
    for e in summary:
        cells = []
        for k in keys:
            m, s, low, high = e[k], e[f"{k}_std"], e.get(f"{k}_low", math.nan), e.get(f"{k}_high", math.nan)
            spread = "" if math.isnan(s) else f" ± {s:.4f}"
            spread += "" if math.isnan(low) else f" [{low:.4f}, {high:.4f}]"
            cells.append("n/a" if math.isnan(m) else f"{m:.4f}{spread}")
        lines.append(f"| {e['variant']} | {e['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_keys(rows: list[dict], extra=(), split: str = "validation") -> tuple[str, ...]:
    """The summary's columns: SUMMARY_KEYS, the OPTIONAL_KEYS some run has, then `extra` (e.g.
    `val/dice/membrane`); an extra key no run has is an error naming the keys there are. Rows of
    the test split (`test/...` keys) take the same columns named `test/...`, `extra` too."""
    prefix, _ = scored_splits.split_naming(split)
    standard, optional, extra = (_named(keys, prefix) for keys in (SUMMARY_KEYS, OPTIONAL_KEYS, extra))
    try:
        require_keys(rows, extra)
    except KeyError as err:
        raise ConfigError(f"--summary_keys: {err.args[0]}") from None
    present = {k for r in rows for k in r}
    return tuple(dict.fromkeys([*standard, *(k for k in optional if k in present), *extra]))


def _named(keys, prefix: str) -> list[str]:
    return list(scored_splits.split_keys(dict.fromkeys(keys), prefix))


def write_results(
    workdir: str,
    rows: list[dict],
    extra_keys=(),
    pooled: bool = False,
    failed=(),
    split: str = "validation",
    summed: dict | str | None = None,
    footnote: str = "",
) -> str:
    """runs.csv (every run) and summary.md, each replaced whole (several processes of one study
    may write them); returns the markdown table (columns: `summary_keys(rows, extra_keys, split)`;
    with `pooled` a last row over every run, and a row of `summed` (`summed_counts`; a string
    says why there is none)) and, when some runs diverged (`failed`: `diverged`), a line per such
    run under it, and `footnote` (e.g. `code_note`'s) under those. Rows of the test split go
    to runs_test.csv and summary_test.md."""
    suffix = scored_splits.split_naming(split)[1]
    keys = sorted({k for r in rows for k in r} - {"variant", "seed"})
    with writers.replaced(os.path.join(workdir, f"runs{suffix}.csv"), newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["variant", "seed", *keys])
        writer.writeheader()
        writer.writerows(rows)
    columns = summary_keys(rows, extra_keys, split)
    table = markdown(summarize(rows, columns, pooled, summed if isinstance(summed, dict) else None), columns)
    note = f"; '{POOLED}': over every run of every variant" if pooled else ""
    if isinstance(summed, dict):
        note += f"; '{SUMMED}': every run's pixel counts together (each fold's images once), scored as one run"
    elif summed:
        table += f"\n\nNo '{SUMMED}' row: {summed}."
    if failed:  # the loss's first clause: "non-finite loss/gradient at step 37 (loss=nan)"
        from segjax import workdirs

        lines = "".join(f"\n- `{run}`: {error.split('; ')[0]}" for run, error in failed)
        skip = f"a rerun skips them until their {workdirs.FAILED_FILE} is deleted"
        table += f"\n\nDiverged (not in the table; {skip}):{lines}"
    if footnote:
        table += f"\n\n{footnote}"
    with writers.replaced(os.path.join(workdir, f"summary{suffix}.md")) as f:
        f.write(f"Mean ± sample std over seeds ({split} split; n = finished runs{note}).\n\n{table}\n")
    return table


def write_comparison(
    workdir: str, rows: list[dict], reference: str, extra_keys=(), split: str = "validation", images=None, groups=None
) -> str:
    """comparison.md (test split: comparison_test.md): each variant minus `reference`, paired by
    seed (`segjax.compare`), over the summary's columns, and, with `images` = (class names, eval
    config) the variants share (`study_report.shared_eval`; a string: why there are none), on the same
    images too (`same_images.versus_table` over the runs' per-image tables: an interval also for
    one seed), and with `groups` = (CSV, column, id column) on each group's images alone
    (`same_images.versus_groups_table`); returns the markdown."""
    from segjax import compare, intervals, same_images  # scipy only when asked

    columns = summary_keys(rows, extra_keys, split)
    table = compare.markdown(compare.paired(rows, columns, reference), columns, reference)
    text = (
        f"Each variant minus {reference!r}, paired by seed: mean difference [{compare.CONFIDENCE:.0%} CI], "
        "the paired t-test's p and p adjusted for the number of variants (Holm).\n\n" + table
    )
    if isinstance(images, str):
        text += f"\n\nNo comparison on the same images: {images}."
    elif images is not None:
        tables = {}
        for r, path in zip(rows, run_tables(workdir, rows, split), strict=True):
            tables.setdefault(r["variant"], []).append(path)
        try:  # compare.paired made sure the reference has runs
            class_names, eval_cfg = images
            over, n = same_images.versus_table(tables, reference, columns, eval_cfg, class_names)
        except ConfigError as err:
            text += f"\n\nNo comparison on the same images: {err}."
        else:
            text += (
                f"\n\nEach variant minus {reference!r} on the same {n} images: the difference of the scores of "
                f"every seed's pixel counts together [{intervals.LEVEL:.0%} paired percentile-bootstrap interval "
                f"over the images, {intervals.RESAMPLES} resamples], the p of no difference (paired permutation test: "
                "each image's counts swapped between the runs or not) and p adjusted for the number of variants "
                "(Holm); segjax.intervals --versus.\n\n" + over
            )
            if groups:
                text += _by_group(tables, reference, columns, images, groups)
    with writers.replaced(os.path.join(workdir, f"comparison{scored_splits.split_naming(split)[1]}.md")) as f:
        f.write(text + "\n")
    return text


def _by_group(tables: dict[str, list[str]], reference: str, columns, images, groups) -> str:
    """comparison.md's table of each variant minus `reference` on each group's images alone, or a
    note saying why there is none (an image the groups file does not name), and each variant's
    scores there."""
    from segjax import intervals, same_images

    (class_names, eval_cfg), (path, column, id_column) = images, groups
    try:
        table = same_images.versus_groups_table(
            tables, reference, columns, eval_cfg, class_names, path, column, id_column
        )
        scores = same_images.groups_scores_table(tables, columns, eval_cfg, class_names, path, column, id_column)
    except ConfigError as err:
        return f"\n\nNo comparison by {column}: {err}."
    return (
        f"\n\nThe same on each {column}'s images alone ({os.path.basename(path)}; p adjusted over every row of "
        "this table, Holm; one image: no interval).\n\n" + table + f"\n\nEach variant's scores on each {column}'s "
        f"images alone (every seed's counts together) [{intervals.LEVEL:.0%} percentile-bootstrap interval over "
        "those images].\n\n" + scores
    )
