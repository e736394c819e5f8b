"""The one label-range check shared by every data path (folder builder, decoded sources)."""

from __future__ import annotations

import numpy as np

from segjax.errors import DataError


def check_labels(label: np.ndarray, num_classes: int, ignore_label: int, where: str) -> None:
    """Labels must lie in 0..num_classes-1 or equal `ignore_label` (>= 0); never remapped."""
    bad = (label < 0) | (label >= num_classes)
    if ignore_label >= 0:
        bad &= label != ignore_label
    if bad.any():
        values = np.unique(label[bad])[:5].tolist()
        hint = " (a 0/255 mask? store class ids 0..C-1, or set data.ignore_label=255)" if 255 in values else ""
        raise DataError(
            f"{where}: label values {values} are outside 0..{num_classes - 1} "
            f"(data.num_classes={num_classes}, data.ignore_label={ignore_label}){hint}"
        )
