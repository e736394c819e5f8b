"""The per-class results table printed at the end of a run."""

from __future__ import annotations

import math


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
    return "\n".join(lines)
