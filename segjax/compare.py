"""Is a variant better than the reference, or within seed noise? Paired differences over seeds.

A study trains every variant with the same seeds (`train.seed` s: the same data order, and the
same initial weights where the variants' networks have the same parameters), so variant and
reference runs of one seed form a pair and the seed-to-seed spread they share cancels in their
difference. Per variant and metric: the mean difference (variant - reference) over the seeds
both finished, its 95 % confidence interval (Student t on the paired differences) and the
two-sided paired t-test's p-value, and that p-value adjusted for comparing several variants
(Holm's step-down method over the variants, per metric: it keeps the chance of any false
"better" or "worse" among them at 5 %). With one pair there is no spread to test against: n/a.

    python -m segjax.study --study=configs/studies/unet_ablations.py:skips --workdir=runs/skips \
        --seeds=5 --compare_to=unet

writes `<workdir>/comparison.md` next to summary.md.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


def paired(rows: list[dict], keys, reference: str) -> list[dict]:
    """One dict per variant other than `reference` (first-seen order): `variant`, and per key
    `<key>_n` (seeds both finished with the key), `<key>` (mean difference variant - reference),
    `<key>_low` / `<key>_high` (its 95 % CI) and `<key>_p` (paired t-test); NaN where n < 2. A
    reference no row has is a KeyError naming the variants."""
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    if reference not in variants:
        raise KeyError(f"reference variant {reference!r} has no finished run; the runs are of {variants}")
    by_seed = {r["seed"]: r for r in rows if r["variant"] == reference}
    out = []
    for variant in variants:
        if variant == reference:
            continue
        entry = {"variant": variant}
        for key in keys:
            pairs = [
                (r[key], by_seed[r["seed"]][key])
                for r in rows
                if r["variant"] == variant
                and r["seed"] in by_seed
                and r.get(key) is not None
                and by_seed[r["seed"]].get(key) is not None
            ]
            diffs = np.array([a - b for a, b in pairs], np.float64)
            entry.update(_interval(diffs, key))
        out.append(entry)
    for key in keys:
        for entry, adjusted in zip(out, holm([e[f"{key}_p"] for e in out]), strict=True):
            entry[f"{key}_p_holm"] = adjusted
    return out


def holm(pvalues) -> list[float]:
    """Holm's step-down adjustment of m p-values (NaN ones left out of m and left NaN): the i-th
    smallest p times (m - i + 1), made non-decreasing in that order, at most 1."""
    ranked = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    out, running = [math.nan] * len(pvalues), 0.0
    for rank, (p, i) in enumerate(ranked):
        running = max(running, min(1.0, (len(ranked) - rank) * p))
        out[i] = running
    return out


def _interval(diffs: np.ndarray, key: str) -> dict[str, float]:
    n = len(diffs)
    mean = float(diffs.mean()) if n else math.nan
    low = high = p = math.nan
    if n >= 2:
        sd = float(diffs.std(ddof=1))
        half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * sd / math.sqrt(n)
        low, high = mean - half, mean + half
        if sd > 0:
            p = float(2 * stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
        else:  # every pair differs by the same amount: no spread, certain unless that amount is 0
            p = 1.0 if mean == 0 else 0.0
    return {f"{key}_n": n, key: mean, f"{key}_low": low, f"{key}_high": high, f"{key}_p": p}


def markdown(comparison: list[dict], keys, reference: str) -> str:
    """The comparison as a markdown table: per key `+0.0012 [-0.0005, +0.0029] p=0.07 (Holm 0.14, n=5)`."""
    head = f"| variant - {reference} | " + " | ".join(keys) + " |"
    lines = [head, "|" + "---|" * (len(keys) + 1)]
    for e in comparison:
        cells = []
        for k in keys:
            mean, n = e[k], e[f"{k}_n"]
            if math.isnan(mean):
                cells.append("n/a")
            elif math.isnan(e[f"{k}_p"]):
                cells.append(f"{mean:+.4f} (n={n})")
            else:
                low, high, p, p_holm = (e[f"{k}_{part}"] for part in ("low", "high", "p", "p_holm"))
                cells.append(cell(mean, low, high, p, p_holm, f", n={n}"))
        lines.append(f"| {e['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cell(difference: float, low: float, high: float, p: float, p_holm: float, note: str = "") -> str:
    """One difference of a comparison table: `+0.0012 [-0.0005, +0.0029] p=0.07 (Holm 0.14<note>)`."""
    return f"{difference:+.4f} [{low:+.4f}, {high:+.4f}] p={p:.2g} (Holm {p_holm:.2g}{note})"
