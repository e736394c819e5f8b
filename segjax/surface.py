"""Surface metrics in evaluation (`eval.surface_metrics`): per image and class, HD95 and the
normalised surface Dice at `eval.nsd_tolerance`, computed on the host from the eval step's class
maps, as MONAI and the Medical Segmentation Decathlon report them next to Dice.

Conventions (also in the README): classes 1..C-1 are scored (class 0 is the background, whose
contour is the others'); each image is cropped to its valid pixels (padding of mixed sizes) and
pixels outside `valid` (ignore label) count as background in truth and prediction; distances are
in pixels/voxels. Per image: a class absent from both truth and prediction is nan (left out);
present in only one, NSD is 0 and HD95 is inf. The split's `val/nsd/<c>` is the mean over the
images with that class in truth or prediction; `val/hd95/<c>` the mean over the images with it in
both (a missed or invented class is penalised by Dice and NSD, and would make any HD mean inf);
`val/mnsd`, `val/mhd95` average those over classes.
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np

from segjax import metrics
from segjax.errors import ConfigError


def check_config(config: ml_collections.ConfigDict) -> None:
    if not config.eval.surface_metrics:
        return
    if config.eval.nsd_tolerance < 0:
        raise ConfigError(f"eval.nsd_tolerance={config.eval.nsd_tolerance} must be >= 0 (pixels)")
    if config.instances.enabled:
        raise ConfigError("eval.surface_metrics scores semantic runs; instance runs report PQ (instances.enabled)")
    if config.train.num_seeds > 1 or jax.process_count() > 1:
        raise ConfigError("eval.surface_metrics scores on one host with train.num_seeds=1 (computed on the host)")


def _crop(valid: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the valid pixels (the image inside its padding)."""
    where = np.nonzero(valid)
    return tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)


def per_image(outputs: list[dict], class_names, tolerance: float) -> list[dict | None]:
    """One entry per output row (None for a padding copy): `hd95/<name>` and `nsd/<name>` for
    classes 1..C-1, from the rows' `pred`, `label` and `valid` (the per-image table's columns)."""
    rows: list[dict | None] = []
    for out in outputs:
        for pred, label, valid in zip(out["pred"], out["label"], out["valid"], strict=True):
            valid = np.asarray(valid) > 0
            if not valid.any():
                rows.append(None)
                continue
            box = _crop(valid)
            keep = valid[box]
            truth, guess = np.where(keep, np.asarray(label)[box], 0), np.where(keep, np.asarray(pred)[box], 0)
            row = {}
            for c, name in enumerate(class_names[1:], start=1):
                row[f"hd95/{name}"] = metrics.hausdorff_distance(truth == c, guess == c, 95.0)
                row[f"nsd/{name}"] = metrics.surface_dice(truth == c, guess == c, tolerance)
            rows.append(row)
    return rows


def split_scores(rows: list[dict | None], class_names) -> dict[str, float]:
    """`val/hd95/<c>`, `val/nsd/<c>`, `val/mhd95`, `val/mnsd` over the images of a split (see the
    module docstring for which images count)."""
    images = [r for r in rows if r is not None]
    out, hd_means, nsd_means = {}, [], []
    for name in class_names[1:]:
        nsd = np.array([r[f"nsd/{name}"] for r in images], np.float64)
        hd = np.array([r[f"hd95/{name}"] for r in images], np.float64)
        nsd, hd = nsd[~np.isnan(nsd)], hd[np.isfinite(hd)]
        out[f"val/nsd/{name}"] = float(nsd.mean()) if len(nsd) else float("nan")
        out[f"val/hd95/{name}"] = float(hd.mean()) if len(hd) else float("nan")
        nsd_means.append(out[f"val/nsd/{name}"])
        hd_means.append(out[f"val/hd95/{name}"])
    with np.errstate(invalid="ignore"):
        out["val/mnsd"] = float(np.nanmean(nsd_means)) if not np.all(np.isnan(nsd_means)) else float("nan")
        out["val/mhd95"] = float(np.nanmean(hd_means)) if not np.all(np.isnan(hd_means)) else float("nan")
    return out
