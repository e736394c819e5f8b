"""The per-class results table printed at the end of a run, and per-image results by group."""

from __future__ import annotations

import csv
import math

import numpy as np


def _fmt(value) -> str:
    return "   n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:6.4f}"


def results_table(results: dict, class_names, prefix: str = "val", distance_unit: str = "px") -> str:
    """Rows = classes + mean; columns = IoU, Dice, precision, recall; then the split-wide scores
    present in `results` (HD95 in `distance_unit`)."""
    cols = ("iou", "dice", "precision", "recall")
    width = max(len(n) for n in [*class_names, "mean"])
    lines = [f"{'class':<{width}}  " + "  ".join(f"{c:>9}" for c in cols)]
    for name in class_names:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{_fmt(results.get(f'{prefix}/{c}/{name}')):>9}" for c in cols))
    lines.append(f"{'mean':<{width}}  " + "  ".join(f"{_fmt(results.get(f'{prefix}/m{c}')):>9}" for c in cols))
    lines.append(f"pixel accuracy {_fmt(results.get(f'{prefix}/accuracy'))}")
    if f"{prefix}/mbiou" in results:
        lines.append(f"boundary IoU   {_fmt(results.get(f'{prefix}/mbiou'))}")
    if f"{prefix}/mnsd" in results:
        nsd, hd95 = _fmt(results.get(f"{prefix}/mnsd")), _fmt(results.get(f"{prefix}/mhd95"))
        lines.append(f"surface Dice   {nsd} (HD95 {hd95} {distance_unit})")
    if f"{prefix}/pq" in results:
        pq, sq, rq = (_fmt(results.get(f"{prefix}/{k}")) for k in ("pq", "sq", "rq"))
        lines.append(f"panoptic quality {pq} (SQ {sq}, RQ {rq})")
    if f"{prefix}/ap50_95" in results:
        ap50, ap75, ap = (_fmt(results.get(f"{prefix}/{k}")) for k in ("ap50", "ap75", "ap50_95"))
        lines.append(f"instance AP     {ap} over IoU 0.50:0.95 (AP50 {ap50}, AP75 {ap75})")
    return "\n".join(lines)


def groups(groups_csv: str, column: str, id_column: str = "id") -> dict[str, str]:
    """Image name -> its group: `groups_csv`'s `column` by its `id_column` (e.g. a dataset's
    index.csv: `stratum` by `id`). A missing column is a KeyError naming the file's columns."""
    with open(groups_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if id_column not in reader.fieldnames or column not in reader.fieldnames:
            raise KeyError(f"{groups_csv} has columns {reader.fieldnames}; no {id_column!r} or {column!r}")
        return {row[id_column]: row[column] for row in reader}


def by_group(per_image_csv: str, groups_csv: str, column: str, keys, id_column: str = "id") -> list[dict]:
    """Mean per-image scores by subgroup, e.g. by imaging modality: the rows of a run's
    `val_per_image.csv` joined on their `name` with `groups_csv`'s `id_column`, grouped by its
    `column`. One dict per group (sorted): `group`, `n` images, and the mean of each of `keys`
    over the images where it is finite (empty cells: class absent; an infinite HD95: the class in
    only one of truth and prediction, left out as the split's `val/hd95` leaves it). An image
    missing from `groups_csv`, or a key or column that is not in its file, is an error naming it."""
    group_of = groups(groups_csv, column, id_column)
    with open(per_image_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [k for k in keys if k not in reader.fieldnames]
        if missing:
            raise KeyError(f"{per_image_csv} has no columns {missing}; it has {reader.fieldnames}")
        rows = list(reader)
    grouped: dict[str, list[dict]] = {}
    for row in rows:
        if row["name"] not in group_of:
            raise KeyError(f"{per_image_csv}: image {row['name']!r} has no {id_column!r} row in {groups_csv}")
        grouped.setdefault(group_of[row["name"]], []).append(row)
    out = []
    for group in sorted(grouped):
        entry = {"group": group, "n": len(grouped[group])}
        for key in keys:
            values = np.array([float(r[key]) for r in grouped[group] if r[key] != ""], np.float64)
            values = values[np.isfinite(values)]
            entry[key] = float(values.mean()) if len(values) else math.nan
        out.append(entry)
    return out
