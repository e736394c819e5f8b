"""How much of each image a class covers and how wide its structures are drawn.

Dice on thin structures (membranes, vessels, boundaries) depends on how wide the annotators drew
them: the same one-pixel uncertainty at a label's edges costs a 5 px wide membrane twice what it
costs a 10 px one. When one split scores lower than another, its label widths tell whether the
labels or the network differ (ISBI 2012, README: the protocol's validation membranes are the
thinnest-drawn of the six folds).

  python -m segjax.data.label_stats --config=configs/isbi.py --split=validation [--class_id=1]

prints, per image of the split, the class's pixel fraction and mean width and the image's mean
intensity and contrast (standard deviation), then the means and how the width correlates with the
image's statistics (a width that follows none of them is the annotators', not the images').

  python -m segjax.data.label_stats --masks=runs/isbi/masks [--class_id=1]

measures a folder of class-id PNG masks instead (a dataset's `masks/`, or what `segjax.predict`
wrote: how wide the network draws the structures; no image statistics there).
Width = area / skeleton length, the skeleton's length counted in pixels (scikit-image's
`skeletonize`; a diagonal step counts as one pixel, so obliquely running structures read up to
1.4x wider: compare images of similar texture, not a vertical against a diagonal one).
"""

from __future__ import annotations

import os

import numpy as np
from skimage.morphology import skeletonize

from segjax.data import class_file
from segjax.errors import ConfigError, DataError, exit_on_user_error


def mean_width(mask: np.ndarray) -> float:
    """Area / skeleton length in pixels of a 2D boolean mask; NaN where the mask is empty."""
    mask = np.asarray(mask, bool)
    if mask.ndim != 2:
        raise ValueError(f"mean_width needs a 2D mask, got shape {mask.shape}")
    length = int(skeletonize(mask).sum())
    return float(mask.sum() / length) if length else float("nan")


def per_image(examples, class_id: int) -> list[dict]:
    """One row per example (a dict with 'label' [H, W], optionally 'image' and 'name'):
    name, fraction and width of `class_id`, and the image's mean and standard deviation (NaN without one)."""
    rows = []
    for i, example in enumerate(examples):
        label = np.asarray(example["label"])
        if label.ndim != 2:
            raise ConfigError(f"label statistics need 2D labels, got shape {label.shape} (example {i})")
        mask = label == class_id
        name = example.get("name", str(i))
        image = np.asarray(example.get("image", np.nan), np.float64)
        rows.append(
            {
                "name": name,
                "fraction": float(mask.mean()),
                "width": mean_width(mask),
                "image_mean": float(image.mean()),
                "image_std": float(image.std()),
            }
        )
    return rows


def split_rows(data_config, split: str, class_id: int) -> list[dict]:
    """`per_image` over one split of the dataset `data_config` describes (labels as training sees them)."""
    from segjax.data import sources

    if split not in (*sources.SPLITS, "test"):
        raise ConfigError(f"--split={split}: choose train, validation or test")
    source = sources.open_splits(data_config, splits=(split,))[split]  # test: where the dataset has one
    return per_image((source[i] for i in range(len(source))), class_id)


def folder_rows(path: str, class_id: int) -> list[dict]:
    """`per_image` over the class-id PNG masks in folder `path` (sorted; `*_instances.png` left out);
    a corrupt file is a DataError naming it (`png.decode`, as the dataset builders read masks)."""
    from segjax.data import folder, png

    if not os.path.isdir(path):
        raise DataError(f"--masks={path}: no such folder")
    names = sorted(n for n in os.listdir(path) if n.lower().endswith(".png") and not n.endswith("_instances.png"))
    if not names:
        raise DataError(f"--masks={path}: no .png masks in the folder")

    def read(name: str) -> dict:
        file = os.path.join(path, name)
        with open(file, "rb") as f:
            return {"label": png.decode(f.read(), file, ids=True), "name": folder.stem(name)}

    return per_image((read(n) for n in names), class_id)


def main(argv) -> None:
    from absl import flags

    config, masks = flags.FLAGS.config, flags.FLAGS.masks
    with exit_on_user_error():
        if (config is None) == (masks is None):
            raise ConfigError("give either --config (a dataset's split) or --masks (a folder of class-id PNGs)")
        if masks is not None:
            rows = folder_rows(masks, flags.FLAGS.class_id)
        else:
            config.data.cache = False
            class_file.apply(config)  # a folder's classes file: the ids its masks may hold
            rows = split_rows(config.data, flags.FLAGS.split, flags.FLAGS.class_id)
    with_images = masks is None  # a mask folder has no images to describe
    keys = ("fraction", "width", "image_mean", "image_std") if with_images else ("fraction", "width")
    print(f"{'image':<16}" + "".join(f"{k:>12}" for k in keys))
    for row in rows:
        print(f"{row['name']:<16}" + "".join(f"{row[k]:12.4f}" for k in keys))
    columns = {k: np.array([row[k] for row in rows]) for k in keys}
    print(f"{'mean':<16}" + "".join(f"{np.nanmean(columns[k]):12.4f}" for k in keys) + f"  ({len(rows)} images)")
    if with_images and len(rows) >= 3:
        print(
            "correlation of the width with "
            + ", ".join(f"{k}: {correlation(columns['width'], columns[k]):+.2f}" for k in keys[2:])
        )


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over the entries where both are finite (NaN with fewer than 3)."""
    keep = np.isfinite(a) & np.isfinite(b)
    return float(np.corrcoef(a[keep], b[keep])[0, 1]) if keep.sum() >= 3 else float("nan")


if __name__ == "__main__":
    from absl import flags
    from ml_collections import config_flags

    from segjax import configuration

    config_flags.DEFINE_config_file("config", None, "experiment config", lock_config=True)
    flags.DEFINE_integer("class_id", 1, "the class whose structures are measured")
    flags.DEFINE_string("split", "validation", "which split: train, validation or test")
    flags.DEFINE_string("masks", None, "a folder of class-id PNG masks to measure instead of a dataset")
    configuration.run_program(main)
