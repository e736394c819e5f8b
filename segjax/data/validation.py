"""The one label-range check shared by every data path (folder builder, decoded sources), the
`data.label_map` lookup, and the config check that keeps `ignore_label` out of the class range."""

from __future__ import annotations

import numpy as np

from segjax.errors import ConfigError, DataError


def check_labels(label: np.ndarray, num_classes: int, ignore_label: int, where: str) -> None:
    """Labels must lie in 0..num_classes-1 or equal `ignore_label` (>= 0); never remapped."""
    bad = (label < 0) | (label >= num_classes)
    if ignore_label >= 0:
        bad &= label != ignore_label
    if bad.any():
        values = np.unique(label[bad])[:5].tolist()
        hint = (
            " (a 0/255 mask of two classes? in an image folder data.folder.mask_threshold=127 reads it as 0/1; "
            "if 255 marks unlabelled pixels, as in VOC, set data.ignore_label=255)"
            if 255 in values
            else ""
        )
        raise DataError(
            f"{where}: label values {values} are outside 0..{num_classes - 1} "
            f"(data.num_classes={num_classes}, data.ignore_label={ignore_label}){hint}"
        )


def check_ignore_label(num_classes: int, ignore_label: int) -> None:
    """An ignore label that is also a class id (0..num_classes-1) is refused: that class would be
    one of the network's outputs and of the averaged metrics, yet never trained (its pixels are
    excluded) and scored only by false positives."""
    if 0 <= ignore_label < num_classes:
        raise ConfigError(
            f"data.ignore_label={ignore_label} is one of the classes 0..{num_classes - 1}; use a value outside "
            "them (e.g. 255, or -1 for none), and store the other classes as 0..num_classes-1"
        )


def map_labels(label: np.ndarray, table: np.ndarray, where: str) -> np.ndarray:
    """`data.label_map`: stored value v -> table[v] (a trimap's 1/2/3, Cityscapes' label ids ->
    class ids); a stored value without an entry is a DataError naming `where`."""
    if label.min() < 0 or label.max() >= len(table):
        bad = int(label.min()) if label.min() < 0 else int(label.max())
        shown = table.tolist() if len(table) <= 40 else f"{len(table)} entries"
        raise DataError(f"{where}: stored label value {bad} has no entry in data.label_map={shown}")
    return table[label].astype(np.int32)
