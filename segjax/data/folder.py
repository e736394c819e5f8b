"""A TFDS builder for a user's folder of images and masks (array_record, no TensorFlow).

Layout (file stems pair an image with its mask; any format PIL reads):
    ROOT/images/NAME.png     the images (gray or RGB)
    ROOT/masks/NAME.png      class ids 0..C-1 per pixel (not 0/255: that is an error); with
                             `mask_suffix` (e.g. '_mask', ISIC's '_segmentation') NAME<suffix>.png;
                             binary masks stored 0/255 (or as JPEG, Kvasir-SEG) read as ids 0/1
                             with `mask_threshold`, other values or RGB colours with `mask_values`
                             (segjax/data/mask_codes.py)
    ROOT/instances/NAME.png  optional uint16 instance ids (0 = none)
Splits, first rule that applies:
    1. ROOT/train/, ROOT/val/ (or validation/), ROOT/test/ subfolders, each laid out as above
       (a test/ without masks/ holds unlabelled images, as a challenge's do: it is not prepared);
    2. `split_file` (CSV, relative to ROOT) with an `id` column and a `split_column` of train / val
       (or validation) / test; any other value is an error;
    3. k-fold: `num_folds` > 0 -> the `fold`-th contiguous block of the sorted names is validation;
    4. `val_fraction` of the names, chosen with `split_seed`.
Without a val/ subfolder or split-file rows `val`, rules 3-4 hold validation out of train/ (or the
rows `train`), and test/ (the rows `test`) stays the held-out test split: k-fold cross-validation
next to a fixed test set. A val/ subfolder, or rows `val`, next to `num_folds`, a split file next
to subfolders, or a `fold` without `num_folds` are errors: no rule is chosen silently.
Every pair is decoded and validated while the dataset is prepared, so a corrupt file, a missing
mask, a size or channel mismatch or an out-of-range label fails once, naming the file.
The prepared copy's name hashes the config and every read file's name and contents (SHA-256,
`file_digests`), so a folder changed since (an edited mask, an added image) is prepared anew,
never trained on as it was, and the earlier copy stays where it is; the same files copied, moved
or re-synced keep the name, the prepared copy and the runs that recorded it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from segjax.data import file_digests, intensity, mask_codes, png, validation
from segjax.errors import ConfigError, DataError

SPLIT_FOLDERS = {"train": ("train",), "validation": ("val", "validation"), "test": ("test",)}


@dataclasses.dataclass
class FolderConfig(tfds.core.BuilderConfig):
    root: str = ""
    channels: int = 3
    num_classes: int = 2
    ignore_label: int = -1
    split_file: str = ""
    split_column: str = "split"
    num_folds: int = 0
    fold: int = 0
    val_fraction: float = 0.2
    split_seed: int = 0
    rescale: str = "none"
    rescale_low: float = 0.5
    rescale_high: float = 99.5
    exif: str = "error"
    mask_suffix: str = ""
    mask_threshold: int = -1
    mask_values: tuple = ()
    label_map: tuple = ()
    contents: str = ""  # `contents_digest` of the files read

    @classmethod
    def from_config(cls, cfg, cache_dir: str, **extra) -> FolderConfig:
        """From `config.data` (data.dir, data.folder.*) and a subclass's `extra` fields; the name
        hashes everything that matters (not where the folder is), so each variant is prepared
        once. `cache_dir` keeps the files' digests (`file_digests`)."""
        if not cfg.dir:
            raise ConfigError("data.dir is empty: point it at a folder with images/ and masks/ (see configs/folder.py)")
        root = os.path.abspath(os.path.expanduser(cfg.dir))
        if not os.path.isdir(root):
            raise DataError(f"data.dir={cfg.dir!r} is not a folder")
        f = cfg.folder
        if f.rescale not in intensity.RESCALES:
            raise ConfigError(f"data.folder.rescale={f.rescale!r}; choose one of {list(intensity.RESCALES)}")
        if f.exif not in png.EXIF_POLICIES:
            raise ConfigError(f"data.folder.exif={f.exif!r}; choose one of {list(png.EXIF_POLICIES)}")
        low, high = f.percentiles
        if not 0 <= low < high <= 100:
            raise ConfigError(f"data.folder.percentiles={tuple(f.percentiles)} must satisfy 0 <= low < high <= 100")
        knobs = dict(
            root=root,
            channels=cfg.channels,
            num_classes=cfg.num_classes,
            ignore_label=cfg.ignore_label,
            split_file=f.split_file,
            split_column=f.split_column,
            num_folds=f.num_folds,
            fold=f.fold,
            val_fraction=f.val_fraction,
            split_seed=f.split_seed,
            rescale=f.rescale,
            rescale_low=float(low),
            rescale_high=float(high),
            exif=f.exif,
            contents=contents_digest(root, f.split_file, cache_dir),
            **extra,
        )
        knobs.update(_mask_knobs(cls, cfg))  # hashed only when set: folders prepared before them keep their names
        # 16-bit labels (`label_dtype`) get their own copy: never an 8-bit one prepared before, whose ids wrapped
        wide = max(cfg.num_classes - 1, cfg.ignore_label, len(cfg.label_map or ()) - 1) > 255
        hashed = {k: v for k, v in knobs.items() if k != "root"}  # the contents say which files
        if wide:
            hashed["labels"] = "uint16"
        digest = hashlib.sha1(repr(sorted(hashed.items())).encode()).hexdigest()[:10]
        base = "".join(c if c.isalnum() else "_" for c in os.path.basename(root))[:40]
        return cls(name=f"{base}_{digest}", **knobs)


def _mask_knobs(cls, cfg) -> dict:
    """The set knobs that say how masks are named or encode their ids (at most one encoding):
    `mask_suffix`, `mask_threshold` / `mask_values` (image folders; segjax/data/mask_codes.py),
    `data.label_map` (stored value -> class id, many to one: mapped at load, checked here)."""
    f, knobs = cfg.folder, {}
    if f.mask_suffix:
        knobs["mask_suffix"] = f.mask_suffix
    if sum((f.mask_threshold != -1, bool(f.mask_values), bool(cfg.label_map))) > 1:
        raise ConfigError(
            "data.folder.mask_threshold, data.folder.mask_values and data.label_map all decode masks; set one"
        )
    if f.mask_threshold != -1:
        if cls is not FolderConfig or not 0 <= f.mask_threshold < 65535 or cfg.num_classes != 2:
            raise ConfigError(
                f"data.folder.mask_threshold={f.mask_threshold}: -1 (off), or 0..65534 for binary masks of image "
                f"folders (data.name='folder', data.num_classes=2; here {cfg.name!r}, {cfg.num_classes})"
            )
        knobs["mask_threshold"] = f.mask_threshold
    if f.mask_values:
        if cls is not FolderConfig:
            raise ConfigError("data.folder.mask_values decodes image folders' masks (data.name='folder')")
        mask_codes.check_values(f.mask_values, cfg.num_classes, cfg.ignore_label)
        knobs["mask_values"] = tuple(tuple(v) if isinstance(v, tuple | list) else v for v in f.mask_values)
    if cfg.label_map:
        knobs["label_map"] = tuple(int(v) for v in cfg.label_map)
    return knobs


def stem(filename: str) -> str:
    """The name that pairs an image with its mask: the file name without its extension(s)."""
    for double in (".nii.gz",):
        if filename.endswith(double):
            return filename[: -len(double)]
    return os.path.splitext(filename)[0]


def contents_digest(root: str, split_file: str, cache_dir: str) -> str:
    """A digest of the name (relative to `root`) and contents of every file the splits can read
    (images/, masks/, instances/ at `root` and in its split subfolders, and the split file; the
    files `_stems` lists), each file hashed once until its stat changes (`file_digests`)."""
    folders = ["", *(d for dirs in SPLIT_FOLDERS.values() for d in dirs)]
    paths = [os.path.join(root, split_file)] if split_file else []
    for base in folders:
        for kind in ("images", "masks", "instances"):
            paths += _stems(os.path.join(root, base, kind)).values()
    paths = [p for p in paths if os.path.exists(p)]
    digests = file_digests.digests(root, paths, file_digests.cache_path(cache_dir, root))
    listing = "".join(f"{rel}\0{sha}\n" for rel, sha in digests.items())
    return hashlib.sha1(listing.encode()).hexdigest()[:16]


def _stems(folder: str) -> dict[str, str]:
    """{stem: path} of the files in `folder` (hidden files and subfolders are no data); two files
    of one stem (a.png and a.tif) are an error, as either could be the pair's half."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if name.startswith(".") or not os.path.isfile(path):
            continue
        if stem(name) in out:
            raise DataError(f"{path} and {out[stem(name)]} have one name; keep one of them")
        out[stem(name)] = path
    return out


def _pairs(base: str, mask_suffix: str = "") -> list[tuple[str, str, str | None, str | None]]:
    """(name, image, mask, instances) for every image under `base`; a missing mask is an error.
    The mask of images/NAME.* is masks/NAME<mask_suffix>.*."""
    images = _stems(os.path.join(base, "images"))
    if not images:
        raise DataError(f"no images found in {os.path.join(base, 'images')}")
    masks = {
        name[: len(name) - len(mask_suffix)]: path
        for name, path in _stems(os.path.join(base, "masks")).items()
        if name.endswith(mask_suffix)
    }
    inst = _stems(os.path.join(base, "instances"))
    out = []
    for name, path in images.items():
        if name not in masks:
            expected = os.path.join(base, "masks", name + mask_suffix)
            hint = "" if mask_suffix else " (masks named NAME_mask.*? set data.folder.mask_suffix)"
            raise DataError(f"{path}: no mask {expected}.* for this image{hint}")
        out.append((name, path, masks.get(name), inst.get(name)))
    return out


# a split file's values -> split; any other value is an error (a 'test' row must not train)
SPLIT_VALUES = {"train": "train", "val": "validation", "validation": "validation", "test": "test"}


def assign_splits(cfg: FolderConfig) -> dict[str, list]:
    """{split: [(name, image, mask, instances), ...]} by the rules in the module docstring. Two
    rules configured at once (a val/ subfolder or split-file rows `val` next to k-fold) are an
    error, not a silent choice."""
    root = cfg.root
    sub = {
        s: next((os.path.join(root, d) for d in dirs if os.path.isdir(os.path.join(root, d))), None)
        for s, dirs in SPLIT_FOLDERS.items()
    }
    if cfg.fold and not cfg.num_folds:
        raise ConfigError(f"data.folder.fold={cfg.fold} needs data.folder.num_folds (k-fold is off)")
    if sub["train"]:
        if cfg.split_file or (cfg.num_folds and sub["validation"]):
            raise ConfigError(
                f"{root} has split subfolders (train/, val/), which define the split; data.folder.split_file "
                "and num_folds would be ignored: set them to '' and 0"
            )
        if sub["test"] and not os.path.isdir(os.path.join(sub["test"], "masks")):
            logging.log_first_n(
                logging.WARNING,
                "%s has no masks/: its images are no split here (segment them with segjax.predict --images=%s)",
                1,
                sub["test"],
                os.path.join(sub["test"], "images"),
            )
            sub["test"] = None
        out = {s: _pairs(path, cfg.mask_suffix) for s, path in sub.items() if path}
        return out if sub["validation"] else {**out, **_hold_out(out["train"], cfg)}  # train/ (+ test/) only
    pairs = _pairs(root, cfg.mask_suffix)
    if not cfg.split_file:
        return _hold_out(pairs, cfg)
    out = {"train": [], "validation": []}
    for pair, split in zip(
        pairs, _split_file(os.path.join(root, cfg.split_file), cfg.split_column, [p[0] for p in pairs]), strict=True
    ):
        out.setdefault(split, []).append(pair)
    if out["validation"] and cfg.num_folds:
        raise ConfigError(
            "data.folder.split_file (its 'val' rows) and data.folder.num_folds both choose the split; set one"
        )
    return out if out["validation"] else {**out, **_hold_out(out["train"], cfg)}  # rows train (+ test) only


def _hold_out(pairs: list, cfg: FolderConfig) -> dict[str, list]:
    """{'train', 'validation'} of `pairs` (sorted by name): k-fold, the `fold`-th contiguous block
    held out (`num_folds` > 0), else `val_fraction` of them chosen with `split_seed`."""
    n = len(pairs)
    if cfg.num_folds:
        if not 0 <= cfg.fold < cfg.num_folds:
            raise ConfigError(f"data.folder.fold={cfg.fold} must be in 0..{cfg.num_folds - 1}")
        held_out = set(np.array_split(np.arange(n), cfg.num_folds)[cfg.fold].tolist())
    else:
        rng = np.random.default_rng(cfg.split_seed)
        held_out = set(rng.permutation(n)[: max(1, round(cfg.val_fraction * n))].tolist())
    return {
        "train": [p for i, p in enumerate(pairs) if i not in held_out],
        "validation": [p for i, p in enumerate(pairs) if i in held_out],
    }


def _split_file(path: str, column: str, names: list[str]) -> list[str]:
    """Each name's split from the CSV at `path` (`id` and `column`); errors name the file."""
    if not os.path.isfile(path):
        raise DataError(f"data.folder.split_file: no file {path}")
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if "id" not in (reader.fieldnames or []) or column not in reader.fieldnames:
            raise DataError(
                f"{path}: needs columns 'id' and {column!r} (data.folder.split_column); it has {reader.fieldnames}"
            )
        rows = {r["id"]: r[column].strip().lower() for r in reader}
    missing = [n for n in names if n not in rows]
    if missing:
        raise DataError(f"{path}: no {column!r} entry for {missing[:3]}")
    unknown = sorted({rows[n] for n in names} - set(SPLIT_VALUES))
    if unknown:
        raise DataError(f"{path}: {column!r} values {unknown[:5]} are not one of {sorted(SPLIT_VALUES)}")
    return [SPLIT_VALUES[rows[n]] for n in names]


def read_image(path: str, rescale: str, low: float, high: float, exif: str = "error") -> np.ndarray:
    """One image file as uint8 [H, W, C]: deeper than 8 bits scaled per `data.folder.rescale`
    (a cast would wrap 16-bit values around silently), RGBA's unused alpha dropped, gray given
    its channel axis, an EXIF orientation handled per `data.folder.exif` (`png.turned`). Used for
    the training data and for `segjax.predict`'s new images alike."""
    with open(path, "rb") as f:
        image = png.decode(f.read(), path, exif=exif)
    if image.dtype != np.uint8:
        image = intensity.to_uint8(image, rescale, low, high, path)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    return image[..., None] if image.ndim == 2 else image


def read_pair(cfg: FolderConfig, image_path: str, mask_path: str, inst_path: str | None) -> dict[str, np.ndarray]:
    """Decode and validate one image/mask(/instances) triple; errors name the file."""
    image = read_image(image_path, cfg.rescale, cfg.rescale_low, cfg.rescale_high, cfg.exif)
    if image.shape[-1] != cfg.channels:
        raise DataError(
            f"{image_path}: image has {image.shape[-1]} channels but data.channels={cfg.channels} "
            "(grayscale vs RGB?); convert the images or set data.channels"
        )
    coded = cfg.mask_threshold >= 0 or bool(cfg.mask_values)  # values or colours that stand for ids
    with open(mask_path, "rb") as f:  # thresholded masks may be lossy: the threshold absorbs the artefacts
        mask = png.decode(f.read(), mask_path, ids=not coded, exif=cfg.exif, lossless=cfg.mask_threshold < 0)
    if cfg.mask_threshold >= 0:
        mask = mask_codes.binarized(mask, cfg.mask_threshold)
    elif cfg.mask_values:
        mask = mask_codes.classes(mask, cfg.mask_values, cfg.num_classes, cfg.ignore_label, mask_path)
    if mask.ndim == 3:
        raise DataError(
            f"{mask_path}: masks must be single-channel class-id images, got shape {mask.shape} (colour-coded "
            "masks: give each class's colour in data.folder.mask_values)"
        )
    if not np.issubdtype(mask.dtype, np.integer):
        raise DataError(f"{mask_path}: masks must hold integer class ids, got {mask.dtype}")
    if mask.shape != image.shape[:2]:
        raise DataError(f"{mask_path}: mask size {mask.shape} differs from image size {image.shape[:2]}")
    mapped = validation.map_labels(mask, np.asarray(cfg.label_map), mask_path) if cfg.label_map else mask
    validation.check_labels(mapped, cfg.num_classes, cfg.ignore_label, mask_path)  # stored as they are: mapped at load
    out = {"image": image.astype(np.uint8), "label": mask.astype(label_dtype(cfg))[..., None]}
    if inst_path is not None:
        with open(inst_path, "rb") as f:
            inst = mask_codes.instance_ids(png.decode(f.read(), inst_path, ids=True, exif=cfg.exif), inst_path)
        if inst.shape != mask.shape:
            raise DataError(f"{inst_path}: instance map size {inst.shape} differs from mask size {mask.shape}")
        out["instances"] = inst[..., None]
    return out


def label_dtype(cfg: FolderConfig) -> type:
    """The stored labels' dtype: 8-bit, or 16-bit where an id (a class above 255, the ignore
    label) would not fit; 8 bits for all of them wrapped class 300 round to class 44."""
    return np.uint16 if max(cfg.num_classes - 1, cfg.ignore_label, len(cfg.label_map) - 1) > 255 else np.uint8


class SegFolder(tfds.core.GeneratorBasedBuilder):
    """A user's image/mask folder as a TFDS dataset; see the module docstring."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = (FolderConfig(name="default"),)

    def _has_instances(self) -> bool:
        return any(p[3] for pairs in assign_splits(self.builder_config).values() for p in pairs)

    def _info(self) -> tfds.core.DatasetInfo:
        features = {
            "name": tfds.features.Text(),
            "image": tfds.features.Image(shape=(None, None, self.builder_config.channels)),
            "label": tfds.features.Image(shape=(None, None, 1), dtype=label_dtype(self.builder_config)),
        }
        if self.builder_config.root and self._has_instances():
            features["instances"] = tfds.features.Image(shape=(None, None, 1), dtype=np.uint16)
        return tfds.core.DatasetInfo(
            builder=self, description=__doc__, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(pairs) for split, pairs in assign_splits(self.builder_config).items()}

    def _generate_examples(self, pairs):
        with_instances = "instances" in self.info.features
        for name, image_path, mask_path, inst_path in pairs:
            arrays = read_pair(self.builder_config, image_path, mask_path, inst_path)
            if with_instances and "instances" not in arrays:
                raise DataError(f"{image_path}: other images have instances/ maps, this one has none")
            example = {"name": name, **{k: png.encode(v) for k, v in arrays.items()}}
            yield name, example
