"""Ablation studies: one command trains every variant x seed and writes a mean +- std table.

A study file is a Python config file with two functions (see configs/studies/):
    get_config(arg)   -> the base ConfigDict (any config: start from configs/default.py)
    get_variants(arg) -> {variant name: {"dotted.config.key": value, ...}}
(an `arg` a study file does not know raises `segjax.errors.ConfigError`: a one-line error, as
configs/studies/ do)
Each (variant, seed) trains in `<workdir>/<variant>/seed_<s>` with the base config, the variant's
overrides and `train.seed = s`. Finished runs are skipped and interrupted ones resume, so rerunning
the command continues a study; a run that diverges (NaN loss) records `failed.json`, is listed
under the table and is not retried, and the study goes on; a run folder of another config than
the study file now gives (an edited variant) is refused before anything trains. The same command
started several times (one process per GPU, `CUDA_VISIBLE_DEVICES=i`, or per task of an array job
on shared storage) shares the work: a run another process is training is skipped (its workdir
lock), and the last process to finish writes the complete table. With `vmap_seeds` each variant
trains all its seeds as replicas of one vmapped step (`train.num_seeds`; for accelerators) in
`<workdir>/<variant>/`.

    python -m segjax.study --study=configs/studies/unet_ablations.py:skips --workdir=runs/skips --seeds=3

Writes `<workdir>/runs.csv` (one row per run) and `<workdir>/summary.md` (per variant: mean +- sample
std over seeds of each metric, n), and prints the summary. `--eval_split=test` then scores each
finished run's best checkpoint (chosen by validation) on the dataset's held-out test split, once
per run (`eval_best_test.json`; with `--collect_only` too, as nothing trains), and writes the same
tables of the test scores: runs_test.csv, summary_test.md (comparison_test.md).
"""

from __future__ import annotations

import json
import os
import sys

import ml_collections
from absl import app, flags, logging

from segjax import configuration, study_report, writers
from segjax.errors import BusyError, ConfigError, NonFiniteLossError, exit_on_user_error
from segjax.study_plan import (  # re-exported: `segjax.study` is where a notebook or test plans a study
    check_groups,
    check_summary_keys,
    load_study,
    planned_runs,
    variant_config,
)


def _finished(run_dir: str, config: ml_collections.ConfigDict) -> bool:
    """A run trained to its last step, or a baseline variant's run scored (`baseline.enabled`)."""
    path = os.path.join(run_dir, writers.SUMMARY_FILE)
    if not os.path.exists(path):
        return False
    saved = writers.read_json(path)
    if config.baseline.enabled:
        return saved.get("baseline") == config.baseline.method
    return saved.get("step") == config.train.steps


def _diverged(run_dir: str) -> str:
    """The error a run that diverged recorded in its `workdirs.FAILED_FILE` ('' if none)."""
    from segjax import workdirs  # jax only when a study is run or reported

    path = os.path.join(run_dir, workdirs.FAILED_FILE)
    return writers.read_json(path)["error"] if os.path.exists(path) else ""


def diverged(workdir: str, order: list[str], seeds: list[int]) -> list[tuple[str, str]]:
    """(run folder relative to `workdir`, error) of every asked-for run that diverged: a seed's
    folder, or a variant's folder for runs of vmapped seeds."""
    out = []
    for variant in order:
        for sub in ["", *(f"seed_{s}" for s in seeds)]:
            error = _diverged(os.path.join(workdir, variant, sub))
            if error:
                out.append((os.path.join(variant, sub).rstrip("/"), error))
    return out


def run_study(
    base: ml_collections.ConfigDict,
    variants: dict[str, dict],
    seeds: list[int],
    workdir: str,
    vmap_seeds: bool = False,
) -> list[dict]:
    """Train every variant x seed (skipping finished runs); return `collect(workdir, variants, seeds)`."""
    import jax  # heavy imports only when training

    from segjax import baselines, train, workdirs

    for _, c, run_dir in planned_runs(base, variants, seeds, workdir, vmap_seeds):  # checked before any trains
        if _finished(run_dir, c):
            logging.info("study: %s is finished, skipping", run_dir)
            continue
        if c.baseline.enabled:  # seconds: scored, not trained (the same for every seed)
            try:
                with workdirs.lock(run_dir):
                    logging.info("study: scoring baseline %s in %s", c.baseline.method, run_dir)
                    baselines.run(c, run_dir)
            except BusyError as err:
                logging.info("study: skipping %s (%s)", run_dir, err)
            continue
        if _diverged(run_dir):  # it would diverge again: same seed, same data order, exact resume
            logging.info("study: %s diverged earlier, skipping (delete its %s to retry)", run_dir, workdirs.FAILED_FILE)
            continue
        logging.info("study: training %s", run_dir)
        try:
            result = train.train_and_evaluate(c, run_dir)
        except BusyError as err:  # another process of this study trains it: take the next one
            logging.info("study: skipping %s (%s)", run_dir, err)
            continue
        except NonFiniteLossError as err:  # a result of the ablation (this lr diverges), not the study's end
            logging.warning("study: %s diverged, going on with the next run: %s", run_dir, err)
            if jax.process_index() == 0:
                with writers.replaced(os.path.join(run_dir, workdirs.FAILED_FILE)) as f:
                    json.dump({"error": str(err)}, f)
            continue
        if result.get("preempted"):  # SIGTERM: that run saved its step; the next must not start
            logging.warning("study: stopped by SIGTERM during %s; rerun the command to continue the study", run_dir)
            break
    return collect(workdir, list(variants), seeds)


def collect(
    workdir: str, order: list[str] | None = None, seeds: list[int] | None = None, split: str = "validation"
) -> list[dict]:
    """One row per finished run under `workdir`: variant, seed and every numeric metric.
    With `seeds`, only those seeds' runs: a study asked for 3 seeds reports 3, also where an
    earlier command of it trained 5 (`other_seeds` counts the runs left out). `split='test'`:
    the runs' test-split scores (`score_test_split`), one row per run scored."""
    return [r for r in _all_runs(workdir, order, split) if seeds is None or r["seed"] in seeds]


TEST_SCORES = "eval_best_test.json"  # a run's best checkpoint on the test split (rescore, split='test')
BASELINE_TEST_SCORES = "metrics_test.json"  # a baseline variant's test split (baselines.run, split='test')


def test_scores(run_dir: str) -> str:
    """The file of a run's test-split scores (a network's best checkpoint, or a baseline's), or ''."""
    found = [os.path.join(run_dir, n) for n in (TEST_SCORES, BASELINE_TEST_SCORES)]
    return next((path for path in found if os.path.exists(path)), "")


def score_test_split(todo: list[tuple[str, ml_collections.ConfigDict, str]]) -> int:
    """Score every finished run of `todo` (`planned_runs`) on the held-out test split, once: its
    best checkpoint (chosen by validation), into the run's TEST_SCORES (for vmapped seeds, each
    replica's in seed_<s>/ too). A run another process trains or scores is skipped (its lock).
    Returns how many runs were scored now."""
    from segjax import baselines, rescore, workdirs

    scored = 0
    for _, c, run_dir in todo:
        if not _finished(run_dir, c) or test_scores(run_dir):
            continue
        try:
            with workdirs.lock(run_dir):
                if not test_scores(run_dir):  # not scored meanwhile
                    logging.info("study: scoring %s on the test split", run_dir)
                    if c.baseline.enabled:
                        baselines.run(c, run_dir, split="test")
                    else:
                        rescore.evaluate_checkpoint(c, run_dir, "best", "test")
                    scored += 1
        except BusyError as err:
            logging.info("study: skipping %s (%s)", run_dir, err)
    return scored


def other_seeds(workdir: str, order: list[str], seeds: list[int]) -> int:
    """How many finished runs of these variants `collect(workdir, order, seeds)` leaves out."""
    return sum(r["seed"] not in seeds for r in _all_runs(workdir, order))


def _all_runs(workdir: str, order: list[str] | None, split: str = "validation") -> list[dict]:
    rows = []
    variants = order or sorted(d for d in os.listdir(workdir) if os.path.isdir(os.path.join(workdir, d)))
    for variant in variants:
        vdir = os.path.join(workdir, variant)
        if not os.path.isdir(vdir):
            continue
        for entry in sorted(os.listdir(vdir), key=lambda e: (len(e), e)):  # seed_2 before seed_10
            run = os.path.join(vdir, entry)
            path = os.path.join(run, writers.SUMMARY_FILE) if split == "validation" else test_scores(run)
            if entry.startswith("seed_") and path and os.path.exists(path):
                metrics = writers.read_json(path)
                numeric = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                rows.append({"variant": variant, "seed": int(entry[len("seed_") :]), **numeric})
    return rows


def define_flags() -> None:
    """Command-line flags (defined only when run as a program, so importing stays side-effect free)."""
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        "study",
        None,
        "Study file FILE.py[:arg] with get_config and get_variants; --study.KEY=VALUE sets KEY of the base "
        "config, for every variant (e.g. --study.train.steps=20: a smoke run of the whole study).",
    )
    flags.DEFINE_string("workdir", None, "Study folder: one run folder per variant and seed.")
    flags.DEFINE_integer("seeds", 3, "Seeds per variant: train.seed .. train.seed + seeds - 1.")
    flags.DEFINE_bool("vmap_seeds", False, "Train each variant's seeds as one vmapped run (train.num_seeds).")
    flags.DEFINE_bool("collect_only", False, "Only rebuild runs.csv and summary.md from finished runs.")
    flags.DEFINE_list("summary_keys", [], "More metrics.json keys for summary.md, e.g. val/dice/membrane.")
    flags.DEFINE_bool(
        "pooled",
        False,
        "Add a row over every run of every variant (the folds of a cross-validation: mean ± std over folds) "
        "and a row of the scores of their pixel counts summed (each fold's images once), each with its 95% "
        "bootstrap interval over the images.",
    )
    flags.DEFINE_string(
        "compare_to", "", "A variant: write comparison.md, every other variant minus it, paired by seed."
    )
    flags.DEFINE_string(
        "groups",
        "",
        "With --compare_to: a CSV naming each image's group (e.g. the dataset's index.csv); comparison.md "
        "adds each group's images alone (where a variant wins and where it does not).",
    )
    flags.DEFINE_string("group_by", "", "With --groups: the column that holds the group, e.g. stratum.")
    flags.DEFINE_string("group_id", "id", "With --groups: the column that holds the image names.")
    flags.DEFINE_enum(
        "eval_split",
        "validation",
        ["validation", "test"],
        "test: also score each finished run's best checkpoint on the held-out test split (once; "
        "eval_best_test.json) and write runs_test.csv, summary_test.md (and comparison_test.md).",
    )


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    with exit_on_user_error():
        if f.study is None or not f.workdir:
            raise ConfigError("--study and --workdir are required")
        if f.seeds < 1:
            raise ConfigError(f"--seeds={f.seeds}: give at least one seed per variant")
        from ml_collections import config_flags

        path = config_flags.get_config_filename(f["study"])
        _, variants = load_study(path)
        base = f.study  # get_config(arg) with the --study.KEY overrides
        configuration.validate(base)
        if f.compare_to and f.compare_to not in variants:
            raise ConfigError(f"--compare_to={f.compare_to!r} is not a variant of this study: {list(variants)}")
        check_groups(f.groups, f.group_by, f.group_id, f.compare_to)
        from segjax import workdirs

        workdirs.require_folder(f.workdir)
        os.makedirs(f.workdir, exist_ok=True)
        seeds = [base.train.seed + k for k in range(f.seeds)]
        if f.collect_only:
            planned_runs(base, variants, seeds, f.workdir, f.vmap_seeds)  # an edited study's old runs are refused
            rows = collect(f.workdir, list(variants), seeds)
        else:
            check_summary_keys(base, variants, f.summary_keys)
            rows = run_study(base, variants, seeds, f.workdir, f.vmap_seeds)
        failed = diverged(f.workdir, list(variants), seeds)
        lost = sum(1 if os.path.dirname(run) else f.seeds for run, _ in failed)  # a vmapped run: all its seeds
        missing = len(variants) * f.seeds - len(rows) - lost  # one row per variant and seed (vmapped seeds too)
        notes = [f"{missing} not finished: in progress elsewhere or failed"] if missing > 0 else []
        notes += [f"{lost} diverged (see summary.md)"] if lost else []
        extra = other_seeds(f.workdir, list(variants), seeds)
        if extra:
            notes.append(f"{extra} of other seeds than {seeds[0]}..{seeds[-1]} left out: see --seeds")
        notes = f" ({'; '.join(notes)})" if notes else ""
        print(f"\nstudy {path}: {len(rows)} finished runs in {f.workdir}{notes}\n")
        configs = [variant_config(base, overrides, name) for name, overrides in variants.items()]
        study_report.report(f.workdir, configs, rows, f, "validation", failed)
        if f.eval_split == "test":
            todo = planned_runs(base, variants, seeds, f.workdir, f.vmap_seeds)
            score_test_split(todo)
            tested = collect(f.workdir, list(variants), seeds, "test")
            untested = (
                f" ({len(rows) - len(tested)} finished runs not scored yet: rerun)" if len(tested) < len(rows) else ""
            )
            print(f"\ntest split: {len(tested)} runs scored{untested} (summary_test.md)\n")
            study_report.report(f.workdir, configs, tested, f, "test")


if __name__ == "__main__":
    with exit_on_user_error():  # a missing study file, a bad argument or an unknown --study.KEY: one line
        configuration.check_command_line(sys.argv[1:], None, flag="study")
    define_flags()
    configuration.quiet_libraries()
    app.run(main)
