"""Segmentation metrics: a small public API usable on any arrays, in or out of training.

* `confusion`: confusion matrices -> IoU, Dice, precision, recall, specificity, accuracy (jit).
* `boundary`: Boundary IoU (jit), Hausdorff distances HD95/HD100 and normalised surface Dice
  (host, scipy).
* `panoptic`: panoptic quality PQ = SQ x RQ with per-class values (host, numpy).

See `confusion` for the named conventions (average, empty, include_background).
"""

from segjax.metrics.boundary import (
    boundary_counts,
    boundary_iou,
    boundary_iou_from_counts,
    hausdorff_distance,
    surface_dice,
    surface_scores,
)
from segjax.metrics.confusion import (
    AVERAGES,
    EMPTY_POLICIES,
    SCORES,
    class_scores,
    confusion_matrix,
    convention,
    counts,
    per_image_confusion,
    summarize,
    summarize_counts,
)
from segjax.metrics.panoptic import PanopticAccumulator, panoptic_quality

__all__ = [
    "AVERAGES",
    "EMPTY_POLICIES",
    "SCORES",
    "PanopticAccumulator",
    "boundary_counts",
    "boundary_iou",
    "boundary_iou_from_counts",
    "class_scores",
    "confusion_matrix",
    "convention",
    "counts",
    "hausdorff_distance",
    "panoptic_quality",
    "per_image_confusion",
    "summarize",
    "summarize_counts",
    "surface_dice",
    "surface_scores",
]
