"""Surface metrics in evaluation (`eval.surface_metrics`): per image and class, HD95 and the
normalised surface Dice at `eval.nsd_tolerance`, computed on the host from the eval step's class
maps, as MONAI and the Medical Segmentation Decathlon report them next to Dice.

Conventions (also in the README): classes 1..C-1 are scored (class 0 is the background, whose
contour is the others'); each image is cropped to its valid pixels (padding of mixed sizes) and
pixels outside `valid` (ignore label) count as background in truth and prediction. Distances (HD95,
and the NSD tolerance) are in pixels/voxels (`eval.surface_units='pixels'`, the default) or in
physical units (`'physical'`): in mm with each volume's voxel spacing as the NIfTI builder stores
it, so anisotropic voxels are measured as they are; for data that stores none (image folders,
TFDS, synthetic) in `data.spacing_unit` with the one pixel size `data.spacing` the config gives
(e.g. ISBI's 4 x 4 nm: `(0.004, 0.004)` in 'um'). Per image: a class absent from both
truth and prediction is nan (left out); present in only one, NSD is 0 and HD95 is inf. The
split's `val/nsd/<c>` is the mean over the images with that class in truth or prediction;
`val/hd95/<c>` the mean over the images with it in both (a missed or invented class is penalised
by Dice and NSD, and would make any HD mean inf); `val/mnsd`, `val/mhd95` average those over
classes.
"""

from __future__ import annotations

import ml_collections
import numpy as np

from segjax import metrics
from segjax.errors import ConfigError, DataError

UNITS = ("pixels", "physical")  # eval.surface_units
STORED = "stored"  # spacing_of(config): each example's own (NIfTI), as `gt_spacing` rows


def check_config(config: ml_collections.ConfigDict) -> None:
    if config.eval.surface_units not in UNITS:
        raise ConfigError(f"eval.surface_units={config.eval.surface_units!r}; choose one of {list(UNITS)}")
    given = config.data.spacing
    if given is not None:
        dims = config.model.spatial_dims
        if config.data.name == "nifti":
            raise ConfigError("data.spacing: NIfTI volumes carry their own voxel spacing (mm); leave it None")
        if len(given) != dims or not all(float(v) > 0 for v in given):
            raise ConfigError(f"data.spacing={tuple(given)} must be {dims} positive sizes, one per spatial axis")
        if config.data.resize and config.eval.surface_units == "physical":
            raise ConfigError(
                f"data.resize={config.data.resize} changes each image's pixel size, so data.spacing no longer "
                "holds: evaluate physical distances at native size (data.resize=0)"
            )
    if not config.eval.surface_metrics:
        return
    if config.eval.surface_units == "physical" and config.data.name != "nifti" and given is None:
        raise ConfigError(
            "eval.surface_units='physical' needs voxel spacing stored with the data (data.name='nifti') "
            f"or a pixel size in data.spacing; data.name={config.data.name!r} has none: set data.spacing "
            "or use 'pixels'"
        )
    if config.eval.nsd_tolerance < 0:
        raise ConfigError(f"eval.nsd_tolerance={config.eval.nsd_tolerance} must be >= 0 (in eval.surface_units)")
    if config.instances.enabled:
        raise ConfigError("eval.surface_metrics scores semantic runs; instance runs report PQ (instances.enabled)")


def spacing_of(config: ml_collections.ConfigDict):
    """What distances are measured with: None (pixels), STORED (each row's `gt_spacing`) or the
    config's one pixel size `data.spacing` (a tuple of floats)."""
    if config.eval.surface_units == "pixels":
        return None
    return STORED if config.data.spacing is None else tuple(float(v) for v in config.data.spacing)


def unit(config: ml_collections.ConfigDict) -> str:
    """The unit surface distances are reported in: 'px', 'mm' (NIfTI) or `data.spacing_unit`."""
    found = spacing_of(config)
    return "px" if found is None else "mm" if found == STORED else config.data.spacing_unit


def _crop(valid: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of the valid pixels (the image inside its padding)."""
    where = np.nonzero(valid)
    return tuple(slice(int(w.min()), int(w.max()) + 1) for w in where)


def per_image(outputs: list[dict], class_names, tolerance: float, spacing=None) -> list[dict | None]:
    """One entry per output row (None for a padding copy): `hd95/<name>` and `nsd/<name>` for
    classes 1..C-1, from the rows' `pred`, `label` and `valid` (the per-image table's columns).
    `spacing` (see `spacing_of(config)`): None measures in pixels, STORED in the units of the rows'
    `gt_spacing` (voxel sizes, mm), a tuple with that one pixel size for every row."""
    rows: list[dict | None] = []
    for out in outputs:
        if spacing == STORED and "gt_spacing" not in out:
            raise DataError(
                "eval.surface_units='physical' but the evaluated data carries no voxel spacing; give data.spacing"
            )
        spacings = out["gt_spacing"] if spacing == STORED else [spacing] * len(out["pred"])
        for pred, label, valid, size in zip(out["pred"], out["label"], out["valid"], spacings, strict=True):
            valid = np.asarray(valid) > 0
            if not valid.any():
                rows.append(None)
                continue
            box = _crop(valid)
            keep = valid[box]
            truth, guess = np.where(keep, np.asarray(label)[box], 0), np.where(keep, np.asarray(pred)[box], 0)
            row = {}
            for c, name in enumerate(class_names[1:], start=1):
                hd, nsd = metrics.surface_scores(truth == c, guess == c, 95.0, tolerance, size)  # one EDT pair
                row[f"hd95/{name}"], row[f"nsd/{name}"] = hd, nsd
            rows.append(row)
    return rows


def score_keys(class_names) -> set[str]:
    """The keys `split_scores` gives for these classes (known before any evaluation)."""
    return {"val/mnsd", "val/mhd95"} | {f"val/{k}/{n}" for n in class_names[1:] for k in ("nsd", "hd95")}


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
