"""Classic (non-learned) segmentation baselines, scored by exactly the metrics the networks get.

Methods (scikit-image), each turning a grayscale image into a mask of *bright* regions:
    otsu       Gaussian smoothing, then Otsu's global threshold
    adaptive   Gaussian smoothing, then a local (block mean) threshold
    edges      Canny edges, widened by `edge_width` pixels (a boundary map, e.g. for membranes);
               edge_width=0 fills the closed contours instead (an object map)
    watershed  region growing: Otsu mask, markers at the peaks of its distance transform, watershed
               on the negated distance with watershed lines, so touching objects are split
    multiotsu  multi-class: multi-Otsu intensity levels per image, each level a class
               (`baseline.level_classes`, or fitted on the training split: segjax/baseline_levels.py)
The prediction is class 1 where the mask is on (`baseline.invert`: where it is off, for dark
targets such as ISBI's membranes), class 0 elsewhere. `baseline.auto_polarity` decides per image
instead, for datasets that mix bright and dark objects (fluorescence and stained tissue): objects
are the minority, so when the bright side of Otsu's threshold covers more than half of the image
the method runs on the negated image (its dark regions become the bright objects it finds).
The one-threshold methods score datasets with more than two classes as foreground (label > 0) vs
background, the question they can answer; `multiotsu` predicts, and is scored on, every class.

    python -m segjax.baselines --config=configs/isbi.py --workdir=runs/isbi_otsu --config.baseline.invert=True

Scores go through `segjax.evaluate.scores` (same conventions, boundary IoU, table), into
`<workdir>/metrics.json`; a study folder of baselines and networks is collected alike. `--split=test`
scores the dataset's held-out test split into `metrics_test.json` (keys `test/...`), next to a
network's `--eval_only=best --eval_split=test`.
"""

from __future__ import annotations

import os
import time

import ml_collections
import numpy as np
from absl import app, flags, logging
from scipy import ndimage
from skimage import feature, filters, segmentation
from tqdm import tqdm

from segjax import (
    baseline_levels,
    configuration,
    evaluate,
    intervals,
    provenance,
    report,
    scored_splits,
    surface,
    workdirs,
    writers,
)
from segjax.data import class_file, pipeline, validation
from segjax.errors import ConfigError, SegjaxError, exit_on_user_error

METHODS = ("otsu", "adaptive", "edges", "watershed", "multiotsu")
MULTICLASS = ("multiotsu",)  # methods that predict every class (the others: foreground vs background)


def check(cfg: ml_collections.ConfigDict) -> None:
    """ConfigError for `baseline.*` settings `bright_mask` cannot use."""
    if cfg.method not in METHODS:
        raise ConfigError(f"baseline.method={cfg.method!r}; choose one of {list(METHODS)}")
    if cfg.method == "adaptive" and (cfg.block_size % 2 == 0 or cfg.block_size < 3):
        raise ConfigError(f"baseline.block_size={cfg.block_size} must be odd and >= 3")


def check_config(config: ml_collections.ConfigDict) -> None:
    """The baseline's settings, before any data is prepared."""
    if config.model.spatial_dims != 2:
        raise ConfigError("classic baselines are 2D (model.spatial_dims=2)")
    check(config.baseline)
    if config.baseline.method in MULTICLASS:
        baseline_levels.check(config)


def class_names(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The classes the baseline is scored on: the dataset's, or background and foreground for a
    one-threshold method on data of more than two classes."""
    if config.baseline.method in MULTICLASS or config.data.num_classes == 2:
        return tuple(config.data.class_names)
    return ("background", "foreground")


def gray(image: np.ndarray) -> np.ndarray:
    """[H, W, C] uint8 or float -> [H, W] float in 0..1 (RGB by luminance weights)."""
    x = image.astype(np.float64)
    if image.dtype == np.uint8:
        x = x / 255.0
    if x.ndim == 3 and x.shape[-1] == 3:
        return x @ np.array([0.2125, 0.7154, 0.0721])
    return x[..., 0] if x.ndim == 3 else x


def smoothed(img: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """The image after `baseline.smooth_sigma`'s Gaussian (unchanged at 0)."""
    return filters.gaussian(img, sigma=cfg.smooth_sigma) if cfg.smooth_sigma > 0 else img


def bright_mask(
    img: np.ndarray, cfg: ml_collections.ConfigDict, smooth: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """(mask of bright regions, instance ids or None) of a [H, W] image in 0..1; `smooth`: the
    image already smoothed (`smoothed`), when the caller has it."""
    check(cfg)
    if cfg.method in MULTICLASS:
        raise ConfigError(f"baseline.method={cfg.method!r} gives classes, not a mask: use baselines.predict")
    smooth = smoothed(img, cfg) if smooth is None else smooth
    if cfg.method == "otsu":
        return smooth > filters.threshold_otsu(smooth), None
    if cfg.method == "adaptive":
        return smooth > filters.threshold_local(smooth, cfg.block_size, offset=cfg.offset), None
    if cfg.method == "edges":
        edges = feature.canny(img, sigma=cfg.edge_sigma)
        if cfg.edge_width > 0:
            return ndimage.binary_dilation(edges, iterations=cfg.edge_width), None
        return ndimage.binary_fill_holes(edges), None
    # watershed
    fg = smooth > filters.threshold_otsu(smooth)
    distance = ndimage.distance_transform_edt(fg)
    peaks = feature.peak_local_max(distance, min_distance=cfg.min_distance, labels=ndimage.label(fg)[0])
    markers = np.zeros(img.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    instances = segmentation.watershed(-distance, markers, mask=fg, watershed_line=True)
    return instances > 0, instances


def dark_objects(img: np.ndarray, cfg: ml_collections.ConfigDict, smooth: np.ndarray | None = None) -> bool:
    """`auto_polarity`: True when the bright side of Otsu's threshold (after the smoothing) is
    the majority of the image, i.e. the objects are the dark regions."""
    smooth = smoothed(img, cfg) if smooth is None else smooth
    return bool(np.mean(smooth > filters.threshold_otsu(smooth)) > 0.5)


def predict(image: np.ndarray, cfg: ml_collections.ConfigDict, level_classes=None) -> np.ndarray:
    """Class map (int32) of one image: 0/1, or for `multiotsu` each level's class
    (`level_classes`, default `cfg.level_classes`; `fit_level_classes` fits them)."""
    img = gray(image)
    smooth = smoothed(img, cfg)  # once: the Gaussian is linear, so the negated image's is 1 - smooth
    if cfg.method in MULTICLASS:
        classes = np.asarray(cfg.level_classes if level_classes is None else level_classes, np.int32)
        if classes.size < 2:
            raise ConfigError("baseline.level_classes is empty: fit it (fit_level_classes) or give one class per level")
        return classes[baseline_levels.levels(smooth, classes.size)]
    if cfg.auto_polarity:
        if cfg.invert:
            raise ConfigError("baseline.auto_polarity chooses the polarity per image; leave baseline.invert=False")
        if dark_objects(img, cfg, smooth):
            img, smooth = 1.0 - img, 1.0 - smooth
    mask, _ = bright_mask(img, cfg, smooth)
    return (mask != cfg.invert).astype(np.int32)


def fit_level_classes(source, config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], float]:
    """`multiotsu`: (the class of each intensity level, darkest first; the training mIoU it gives)
    fitted on every example of `source` (the training split), as baseline_levels describes."""
    check_config(config)
    n, num_classes = baseline_levels.num_levels(config), config.data.num_classes
    counts = np.zeros((n, num_classes), np.int64)
    for i in tqdm(range(len(source)), desc=f"{n} levels' classes", unit="image", dynamic_ncols=True):
        ex = source[i]
        label, valid = pipeline.label_and_valid(ex["label"], config.data.ignore_label)
        level_map = baseline_levels.levels(smoothed(gray(ex["image"]), config.baseline), n)
        counts += baseline_levels.count(level_map, label, valid, n, num_classes)
    return baseline_levels.best_assignment(counts)


def evaluate_split(source, config: ml_collections.ConfigDict, per_image_csv: str = "", level_classes=None) -> dict:
    """Named scores of `config.baseline` on every example of `source` (foreground vs background
    when a one-threshold method meets more than two classes); `per_image_csv`: each image's scores
    there too, as a network run writes them; `level_classes`: `multiotsu`'s fitted classes."""
    check_config(config)
    names = class_names(config)
    binary = len(names) < config.data.num_classes

    def maps():
        for i in range(len(source)):
            ex = source[i]
            label, valid = pipeline.label_and_valid(ex["label"], config.data.ignore_label)
            if binary:
                label = (label > 0).astype(np.int32)
            pred = predict(ex["image"], config.baseline, level_classes)
            yield {"name": pipeline.example_name(ex, i), "label": label, "pred": pred, "valid": valid}

    return evaluate.score_maps(maps(), config, names, per_image_csv)


def run(config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False, split: str = "validation") -> dict:
    """Score the baseline on the validation split (`<workdir>/metrics.json`, `val_per_image.csv`,
    the printed intervals over the images in `intervals.json`) or the held-out test split
    (`metrics_test.json`, `test_per_image.csv`, `intervals_test.json`, keys `test/...`, as a
    network's `--eval_split=test`), and write `config.json`. A network run's folder is refused; so
    is a baseline run of another config unless `overwrite` (which moves it aside, as training's
    --overwrite does)."""
    from segjax.data import sources

    prefix, suffix = scored_splits.split_naming(split)

    class_file.apply(config)
    configuration.validate(config)
    check_config(config)
    surface.check_config(config)
    validation.check_ignore_label(config.data.num_classes, config.data.ignore_label)
    path = os.path.join(workdir, writers.SUMMARY_FILE)
    trained = os.path.isdir(os.path.join(workdir, workdirs.CHECKPOINT_FOLDERS["latest"]))  # also one still training
    if not trained and os.path.exists(path):
        trained = "baseline" not in writers.read_json(path)
    if trained:
        raise SegjaxError(f"{workdir} holds a trained run; use another --workdir for the baseline")
    dataset = sources.dataset_id(config.data)
    workdirs.prepare(config, workdir, overwrite, allow_config_changes=False, resumable=False, dataset=dataset)
    provenance.record(workdir, f"baseline {config.baseline.method}", split=split)
    start = time.perf_counter()
    fit = config.baseline.method in MULTICLASS and not config.baseline.level_classes
    opened = sources.open_splits(config.data, splits=(split, "train") if fit else (split,))
    source, fitted = opened[split], {}
    if fit:
        level_classes, train_miou = fit_level_classes(opened["train"], config)
        fitted = {"baseline_level_classes": list(level_classes), "baseline_fit_train_miou": train_miou}
        logging.info("baseline levels' classes fitted on %d training images: %s", len(opened["train"]), fitted)
    logging.info(
        "scoring baseline %s on %d images of %s/%s", config.baseline.method, len(source), config.data.name, split
    )
    table = os.path.join(workdir, f"{prefix}_per_image.csv")
    results = evaluate_split(source, config, table, fitted.get("baseline_level_classes"))
    results = scored_splits.split_keys(results, prefix)
    results.update(fitted)
    results["baseline"] = config.baseline.method
    results["split"] = split
    results["seconds"] = time.perf_counter() - start
    results["metrics_convention"] = evaluate.convention(config)
    writers.write_summary(os.path.join(workdir, f"metrics{suffix}.json"), results)
    names = class_names(config)
    levels = f"; levels' classes {fitted['baseline_level_classes']}, fitted on the training split" if fit else ""
    print(
        f"\nbaseline {config.baseline.method} on {config.data.name}/{split} ({results['seconds']:.1f} s; "
        f"{results['metrics_convention']}{levels}):"
    )
    print(report.results_table(results, names, prefix=prefix, distance_unit=surface.unit(config)))
    out = os.path.join(workdir, f"intervals{suffix}.json")
    intervals.print_results([table], config, split, out, names)
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_on_user_error():
        run(flags.FLAGS.config, flags.FLAGS.workdir, flags.FLAGS.overwrite, flags.FLAGS.split)


if __name__ == "__main__":
    from ml_collections import config_flags

    default_config = "configs/default.py"
    config_flags.DEFINE_config_file("config", default_config, "Config file (data and baseline).")
    flags.DEFINE_string("workdir", None, "Where metrics.json goes.", required=True)
    flags.DEFINE_bool("overwrite", False, "Move a baseline run of another config in --workdir aside and score anew.")
    flags.DEFINE_enum("split", "validation", ["validation", "test"], "Split scored; test writes metrics_test.json.")
    configuration.run_program(main, default_config)
