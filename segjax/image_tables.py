"""Per-image tables on disk: a split's rows (`val_per_image.csv`, `eval_<which>_per_image.csv`, a
baseline's), each image's scores and the counts they are made of, and the confusion matrix
written beside every such table; and reading both back (for intervals, pooled rows, plots).
"""

from __future__ import annotations

import csv
import os

import numpy as np

from segjax import metrics, writers
from segjax.scoring import AP_KINDS, BOUNDARY_KINDS, COUNT_KINDS, PQ_KINDS, SURFACE_KINDS, image_counts


def confusion_csv(per_image_csv: str) -> str:
    """Where the split's confusion matrix goes beside a per-image table: `val_per_image.csv` ->
    `val_confusion.csv`, `eval_best_per_image.csv` -> `eval_best_confusion.csv`."""
    stem = per_image_csv[: -len(".csv")] if per_image_csv.endswith(".csv") else per_image_csv
    stem = stem[: -len("_per_image")] if stem.endswith("_per_image") else stem
    return f"{stem}_confusion.csv"


def write_per_image(path: str, outputs: list[dict], order, names, empty: str, row_names, extra) -> None:
    """The per-image table (`per_image_rows`) at `path` and, beside it (`confusion_csv`), the
    split's confusion matrix: pixel counts, a row per true class (`truth`), a column per predicted
    class (which classes are taken for which: what per-class scores cannot show)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)  # a replica's seed_<s>/
    writers.write_table(path, per_image_rows(outputs, order, names, empty, row_names, extra))
    confusion = np.concatenate([np.asarray(o["confusion"], np.int64) for o in outputs])
    matrix = confusion[[r for r, index in enumerate(order) if index is not None]].sum(axis=0)
    write_confusion(confusion_csv(path), matrix, names)


CONFUSION_CORNER = "truth"  # the confusion table's first header cell: its rows are true classes


def write_confusion(path: str, matrix: np.ndarray, names) -> None:
    """A [C, C] confusion matrix as CSV: header `truth,<class>...`, then a row per true class, its
    name first (cells by position: a class may be named `truth` too). Replaced whole."""
    with writers.replaced(path, newline="") as f:
        writer = csv.writer(f)
        writer.writerow([CONFUSION_CORNER, *names])
        writer.writerows([name, *(int(v) for v in row)] for name, row in zip(names, matrix, strict=True))


def read_confusion(path: str) -> tuple[list[str], np.ndarray]:
    """(class names, [C, C] int64 counts) of a `write_confusion` table; another CSV is a
    ValueError naming the file."""
    with open(path, newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f)) or [[]]
    names = header[1:]
    if header[:1] != [CONFUSION_CORNER] or [r[:1] for r in rows] != [[n] for n in names]:
        raise ValueError(f"{path} is not a confusion table (a 'truth' column, a row and a column per class)")
    if any(len(r) != len(header) for r in rows):
        raise ValueError(f"{path}: every row of a confusion table has {len(header)} cells")
    return names, np.array([[int(v) for v in r[1:]] for r in rows], np.int64).reshape(len(names), len(names))


def read_per_image_counts(path: str) -> tuple[list[str], list[str], dict[str, np.ndarray], bool]:
    """(image names, class names, {tp, fp, fn, tn: [N, C] int64, and binter, bunion where the table
    has boundary bands, the `PQ_KINDS` [N, K] where it has segment counts (an instance run's:
    classes 1..K) and the `AP_KINDS` where it has their matches, `hd95`, `nsd` [N, C - 1] where it
    has surface distances}, named) of a per-image
    table (`per_image_rows`): the classes are its `tp/<class>` columns in order, an image without a
    `name` is named by its `index`, and `named` is False when every image's name is its index (a
    dataset that stores no file names, e.g. the synthetic one, names its images so). A table
    without counts (written before they were) is a ValueError naming the file."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
        header = rows[0].keys() if rows else []
    classes = [c[len("tp/") :] for c in header if c.startswith("tp/")]
    columns = [f"{kind}/{name}" for kind in COUNT_KINDS for name in classes]
    if not rows or not classes or any(c not in header for c in columns):
        raise ValueError(f"{path} holds no per-image pixel counts (tp/<class>, ...; scored before they were?)")
    names = [r.get("name") or r["index"] for r in rows]
    kinds = [*COUNT_KINDS, *(k for k in BOUNDARY_KINDS if all(f"{k}/{c}" in header for c in classes))]
    counts = {k: np.array([[int(r[f"{k}/{c}"]) for c in classes] for r in rows], np.int64) for k in kinds}
    segment_classes = [c[len("pq_tp/") :] for c in header if c.startswith("pq_tp/")]
    if segment_classes:
        if segment_classes != classes[1 : 1 + len(segment_classes)]:
            raise ValueError(f"{path}: segment counts of {segment_classes}, not the classes after {classes[0]!r}")
        matched = all(f"{k}/{c}" in header for k in AP_KINDS for c in segment_classes)  # none in older tables
        for kind in (*PQ_KINDS, *(AP_KINDS if matched else ())):
            # pq_iou: sums of IoUs; the others segment counts (none: an image without valid pixels)
            values = [[float(r[f"{kind}/{c}"] or 0) for c in segment_classes] for r in rows]
            counts[kind] = np.array(values, np.float64 if kind == "pq_iou" else np.int64)
    for kind in SURFACE_KINDS:  # each image's distances, where the run measured them (an empty cell: NaN)
        columns = [f"{kind}/{c}" for c in classes[1:]]
        if all(c in header for c in columns):
            counts[kind] = np.array([[float(r[c] or "nan") for c in columns] for r in rows], np.float64)
    return names, classes, counts, any(n != r["index"] for n, r in zip(names, rows, strict=True))


def per_image_rows(
    outputs: list[dict], order: list[int | None], class_names, empty: str = "nan", row_names=None, extra=None
) -> list[dict]:
    """One row per evaluated image, in split order: `index` (position in the split), `name` (the
    stored file name, when `row_names` gives one per output row, e.g. the outputs' `gt_name`),
    `pixels` scored, pixel `accuracy` and per class `dice/<c>`, `iou/<c>`, `precision/<c>`,
    `recall/<c>` (empty classes follow `empty`) and the pixel counts `tp/<c>`, `fp/<c>`, `fn/<c>`,
    `tn/<c>` (nnU-Net's per-case summary); where the outputs carry boundary bands, `biou/<c>` and
    its counts `binter/<c>`, `bunion/<c>`; and the columns of `extra[row]` when given (e.g.
    `instances.table_rows`', `surface.per_image`'s). `order` maps each output row to its split
    index (None = padding; `pipeline.eval_order`)."""
    confusion = np.concatenate([np.asarray(o["confusion"], np.int64) for o in outputs])
    if len(confusion) != len(order):
        raise ValueError(f"{len(confusion)} evaluated rows but an order of {len(order)}")
    if row_names is not None and len(row_names) != len(order):
        raise ValueError(f"{len(row_names)} names for {len(order)} evaluated rows")
    keep = [r for r, index in enumerate(order) if index is not None]
    cms = confusion[keep]
    per_class = {k: np.asarray(v) for k, v in metrics.class_scores(cms, empty).items()}
    per_class.update({k: v[keep] for k, v in image_counts(outputs, len(class_names)).items()})
    kinds = [*COUNT_KINDS]
    if "binter" in per_class:
        per_class["biou"] = np.asarray(
            metrics.boundary_iou_from_counts(per_class["binter"], per_class["bunion"], empty)["biou"]
        )
        kinds += ["biou", *BOUNDARY_KINDS]
    pixels = cms.sum(axis=(1, 2))
    correct = np.trace(cms, axis1=1, axis2=2)
    rows = []
    for i, r in enumerate(keep):
        row = {"index": order[r]}
        if row_names is not None:
            row["name"] = str(row_names[r])
        row["pixels"] = int(pixels[i])
        row["accuracy"] = float(correct[i] / pixels[i]) if pixels[i] else float("nan")
        for key in ("dice", "iou", "precision", "recall"):
            for c, name in enumerate(class_names):
                row[f"{key}/{name}"] = float(per_class[key][i, c])
        for key in kinds:
            for c, name in enumerate(class_names):
                value = per_class[key][i, c]
                row[f"{key}/{name}"] = float(value) if key == "biou" else int(value)
        if extra is not None and extra[r]:
            row.update(extra[r])
        rows.append(row)
    return sorted(rows, key=lambda row: row["index"])
