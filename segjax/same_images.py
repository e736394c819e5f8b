"""Runs compared on the same images: the p of a paired permutation test of no difference
(`permutation_p`, beside `segjax.intervals`' bootstrap interval of the difference), the tables of
each variant minus a reference over all images (`versus_table`: a study's comparison.md, the
notebook) and over each group's images alone (`versus_groups_table`, beside each variant's
scores there: `groups_scores_table`), and Holm's adjustment of their p's (`adjust`).
"""

from __future__ import annotations

import numpy as np

from segjax import compare, intervals, matched_tables


def permutation_p(
    counts: dict[str, np.ndarray], versus: dict[str, np.ndarray], eval_cfg, class_names, keys, resamples: int, seed: int
) -> dict[str, float]:
    """Per key, the two-sided p of the paired permutation (randomization) test of no difference:
    under it, either run's counts of an image are as likely to be one run's as the other's, so
    each image's counts ([N, K, C]: all its rows, e.g. its seeds) are swapped between the runs or
    not, the score difference recomputed, and p is twice the smaller share of those differences
    at or beyond the observed one on either side (at most 1), as `scipy.stats.permutation_test`
    with `permutation_type='samples'` computes it: over every one of the 2^N swaps where 2^N <=
    `resamples` (exact), else over `resamples` random ones, each share (k + 1) / (R + 1). Unlike
    a bootstrap's p it is valid with few images: five images allow no p under 2 / 32 = 0.0625."""
    from segjax import scoring

    n = len(counts["tp"])
    exact = n < 63 and 2**n <= resamples
    rng = np.random.default_rng(seed)
    swaps_total = 2**n if exact else resamples
    chunk = max(1, intervals.CHUNK_VALUES // max(1, 2 * counts["tp"].size))

    def differences(swap: np.ndarray) -> dict[str, np.ndarray]:  # [S, N] bool -> per key [S]
        picked, scored = swap[:, :, None, None], []
        for first, second in ((counts, versus), (versus, counts)):
            arrays = {k: np.where(picked, second[k][None], first[k][None]) for k in first}
            arrays = {k: v.reshape(len(swap), -1, v.shape[-1]) for k, v in arrays.items()}
            scored.append(scoring.count_score_arrays(arrays, eval_cfg, class_names, True))
        return {k: np.asarray(scored[0][k] - scored[1][k], np.float64) for k in keys}

    observed = {k: float(v[0]) for k, v in differences(np.zeros((1, n), bool)).items()}  # scored alike
    null = {k: [] for k in keys}
    for start in range(0, swaps_total, chunk):
        if exact:
            index = np.arange(start, min(start + chunk, swaps_total))
            swap = (index[:, None] >> np.arange(n)) & 1 == 1
        else:
            swap = rng.random((min(chunk, swaps_total - start), n)) < 0.5
        for k, v in differences(swap).items():
            null[k].append(v)
    out = {}
    for key in keys:
        values = np.concatenate(null[key])
        values = values[~np.isnan(values)]
        if not values.size or np.isnan(observed[key]):
            out[key] = float("nan")
            continue
        tie = 1e-6 * max(1.0, abs(observed[key]))  # float32 scores summed in other orders
        extra = 0 if exact else 1
        less = (np.sum(values <= observed[key] + tie) + extra) / (values.size + extra)
        greater = (np.sum(values >= observed[key] - tie) + extra) / (values.size + extra)
        out[key] = float(min(1.0, 2 * min(less, greater)))
    return out


def versus_table(tables: dict[str, list[str]], reference: str, keys, eval_cfg, class_names) -> tuple[str, int]:
    """(markdown, number of images): each variant of `tables` (variant -> its runs' per-image
    tables) minus `reference` on the same images, per key: the difference of the scores of
    every seed's counts together, `+0.0012 [-0.0005, +0.0029] p=0.14 (Holm 0.41)`, the paired
    percentile-bootstrap interval over the images (`bootstrap` with `versus`; an image drawn for
    both with all its seeds' rows), the paired permutation p of no difference (`permutation_p`)
    and that p adjusted for the number of variants (`compare.holm`, per key). Keys the tables
    cannot score (boundary IoU, PQ, AP, HD95 or NSD where either side's tables have no bands,
    segment counts or distances) are n/a; `keys` may name another split's scores (`test/...`).
    Tables that cannot be read or matched: a ConfigError."""
    n, pairs = _paired_variants(tables, reference, keys, eval_cfg, class_names)
    results = {
        variant: intervals.bootstrap(counts, eval_cfg, class_names, both, versus=other)
        for variant, _, counts, other, both in pairs
    }
    return _versus_markdown(results, f"variant - {reference}", keys), n


def versus_groups_table(
    tables: dict[str, list[str]], reference: str, keys, eval_cfg, class_names, groups: str, group_by: str, group_id="id"
) -> str:
    """`versus_table` over each group's images alone (`matched_tables.image_groups`: the CSV
    `groups` names each image's group in its column `group_by`): a row per variant and group,
    `variant, group (n images)`, its p adjusted for every row of the table (Holm per key over
    variants x groups: one test per row). One image gives no interval and no p."""
    _, pairs = _paired_variants(tables, reference, keys, eval_cfg, class_names)
    results = {}
    for variant, names, counts, other, both in pairs:
        rows = matched_tables.image_groups(names, groups, group_by, group_id)
        found = intervals.per_group(counts, rows, eval_cfg, class_names, both, versus=other)
        results.update({_group_label(variant, group, f["images"]): f["intervals"] for group, f in found.items()})
    return _versus_markdown(results, f"variant - {reference}, {group_by}", keys)


def groups_scores_table(
    tables: dict[str, list[str]], keys, eval_cfg, class_names, groups: str, group_by: str, group_id="id"
) -> str:
    """Each variant's score on each group's images alone (every seed's counts together), with its
    percentile-bootstrap interval over those images (`intervals.bootstrap`): the levels the
    per-group differences (`versus_groups_table`) are differences of. One image: no interval."""
    results = {}
    for variant, paths in tables.items():
        names, _, counts = matched_tables.image_counts(paths, class_names)
        usable = [k for k in _as_val(keys).values() if k in intervals.scorable(counts, eval_cfg, class_names)]
        rows = matched_tables.image_groups(names, groups, group_by, group_id)
        found = intervals.per_group(counts, rows, eval_cfg, class_names, usable)
        results.update({_group_label(variant, group, f["images"]): f["intervals"] for group, f in found.items()})
    lines = [f"| variant, {group_by} | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for label, result in results.items():
        cells = []
        for r in (result.get(k) for k in _as_val(keys).values()):
            if r is None:
                cells.append("n/a")
            elif np.isnan(r["low"]):
                cells.append(f"{r['estimate']:.4f} (no interval)")
            else:
                cells.append(f"{r['estimate']:.4f} [{r['low']:.4f}, {r['high']:.4f}]")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _group_label(variant: str, group: str, images: int) -> str:
    """A per-group table's row: `variant, group (n images)`."""
    return f"{variant}, {group} ({images} image{'s' if images > 1 else ''})"


def _paired_variants(tables, reference, keys, eval_cfg, class_names) -> tuple[int, list[tuple]]:
    """(the reference's number of images, per other variant (variant, image names, its counts,
    the reference's counts of the same images in that order, the `keys` both can score under
    their `val/` names))."""
    ref_names, _, ref_counts = matched_tables.image_counts(tables[reference], class_names)
    scored = intervals.scorable(ref_counts, eval_cfg, class_names)
    usable = [k for k in _as_val(keys).values() if k in scored]
    pairs = []
    for variant, paths in tables.items():
        if variant == reference:
            continue
        names, _, counts = matched_tables.image_counts(
            paths, class_names, [matched_tables.run_folder(p) for p in tables[reference]]
        )
        other = matched_tables.paired_counts(names, ref_names, ref_counts, variant, reference)
        pairs.append(
            (
                variant,
                names,
                counts,
                other,
                [k for k in usable if k in intervals.scorable(counts, eval_cfg, class_names)],
            )
        )
    return len(ref_names), pairs


def _as_val(keys) -> dict[str, str]:
    """Each key under the name `scoring.count_scores` gives every split's scores (`val/...`)."""
    return {k: "val/" + k.split("/", 1)[1] for k in keys}


def _versus_markdown(results: dict[str, dict], head: str, keys) -> str:
    """The rows of paired differences (`bootstrap` with `versus`), each p beside its Holm
    adjustment over the rows that could score the key (`compare.holm`; NaN p's, of one image,
    are left out of it); keys a row cannot score are n/a."""
    as_val = _as_val(keys)
    adjust(list(results.values()), as_val.values())
    lines = [f"| {head} | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 1)]
    for label, result in results.items():
        cells = []
        for r in (result.get(as_val[key]) for key in keys):
            if r is None:
                cells.append("n/a")
            elif np.isnan(r["p"]):  # one image: no interval, no p
                cells.append(f"{r['estimate']:+.4f} (no interval)")
            else:
                cells.append(compare.cell(r["estimate"], r["low"], r["high"], r["p"], r["p_holm"]))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def adjust(found: list[dict], keys) -> None:
    """Each result's paired p (`bootstrap` with `versus`) adjusted for the number of results
    that test the key (`compare.holm` per key, as `p_holm`; a result of one image has no p and is
    left out): with several variants or groups, one small p is not evidence on its own."""
    for key in dict.fromkeys(keys):
        tested = [r[key] for r in found if key in r and not np.isnan(r[key]["p"])]
        for r, adjusted in zip(tested, compare.holm([r["p"] for r in tested]), strict=True):
            r["p_holm"] = adjusted
