"""What a study writes and prints from its finished runs (`segjax.study.collect`'s rows):
summary(_test).md with `--pooled`'s rows, the summed-counts row's intervals over images and the
note on mixed code, and comparison(_test).md (`--compare_to`: by seed and on the same images).
The tables themselves are `study_tables`'; this module decides which to write for a study.
"""

from __future__ import annotations

import ml_collections

from segjax import scored_splits, study_tables


def shared_eval(configs: list[ml_collections.ConfigDict]):
    """(class names, eval config) every variant's config shares, for scores of the runs' counts
    taken together, or a string saying why there are none."""
    from segjax import instances  # jax only when a study reports

    shared = {(instances.class_names(c), c.eval.average, c.eval.empty, c.eval.include_background) for c in configs}
    if len(shared) > 1:
        return "the variants differ in their classes or eval.average / eval.empty / eval.include_background"
    return instances.class_names(configs[0]), configs[0].eval


def summed_counts(
    configs: list[ml_collections.ConfigDict], rows: list[dict], workdir: str, split: str
) -> tuple[dict | str, str]:
    """`--pooled`'s row of summed pixel counts (`study_tables.summed_counts`) over `rows`, under
    `shared_eval` (a string says why there is none), with each score's percentile-bootstrap
    interval over the runs' images and a note on it for under the table
    (`study_tables.summed_interval`)."""
    shared = shared_eval(configs)
    if isinstance(shared, str):
        return shared, ""
    names, ev = shared
    tables = study_tables.run_tables(workdir, rows, split)
    try:
        summed = study_tables.summed_counts(rows, ev, names, split, tables)
    except KeyError as err:
        return err.args[0], ""
    return study_tables.summed_interval(summed, tables, ev, names)


def report(workdir: str, configs: list[ml_collections.ConfigDict], rows: list[dict], f, split: str, failed=()):
    """The tables of `split`'s `rows`, printed (`f`: the study's flags `summary_keys`, `pooled`,
    `compare_to`): summary(_test).md (with --pooled, its rows and the interval's note) and, with
    --compare_to, comparison(_test).md; `failed`: `study.diverged`'s runs, listed under the table."""
    summed, interval = summed_counts(configs, rows, workdir, split) if f.pooled and rows else (None, "")
    note = "\n\n".join(filter(None, [interval, study_tables.code_note(workdir, rows)]))
    kwargs = dict(split=split, summed=summed, footnote=note)
    print(study_tables.write_results(workdir, rows, f.summary_keys, f.pooled, failed, **kwargs))
    if f.compare_to and rows:
        groups = (f.groups, f.group_by, f.group_id) if f.groups else None
        write_comparison(workdir, rows, f.compare_to, f.summary_keys, split, shared_eval(configs), groups)


def write_comparison(
    workdir: str, rows: list[dict], reference: str, extra_keys, split: str, images, groups=None
) -> None:
    """comparison.md (or comparison_test.md) of `rows` against `reference`, printed (`images`:
    `shared_eval`'s, for the comparison on the same images; `groups`: (CSV, column, id column),
    for it group by group); a note when the reference has no finished run."""
    name = f"comparison{scored_splits.split_naming(split)[1]}.md"
    try:
        table = study_tables.write_comparison(workdir, rows, reference, extra_keys, split, images, groups)
    except KeyError as err:  # the reference's runs failed or are still training elsewhere
        print(f"\nno {name}: {err.args[0]}")
    else:
        print(f"\n{name}:\n{table}")
