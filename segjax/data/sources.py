"""Prepared TFDS datasets -> random-access sources of decoded, validated numpy examples.

Each example is a dict: `image` uint8 [H,W,C], `label` int32 [H,W], plus `index` (its position in
the split, for error messages and padding). Labels are checked against `num_classes` and
`ignore_label` here, once per example, so a 0/255 mask fails loudly instead of training on garbage.
"""

from __future__ import annotations

import collections
import os

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from segjax import locks, parallel
from segjax.data import alignment, builders, folder, nifti, png, validation
from segjax.errors import ConfigError, DataError


def _synthetic_builder(cfg: ml_collections.ConfigDict, data_dir: str | None):
    knobs = cfg.synthetic.to_dict()
    return builders.SyntheticShapes(
        data_dir=data_dir,
        file_format="array_record",
        config=builders.SyntheticShapesConfig.from_knobs(**knobs),
    )


def _synthetic3d_builder(cfg: ml_collections.ConfigDict, data_dir: str | None):
    return builders.SyntheticVolumes(
        data_dir=data_dir,
        file_format="array_record",
        config=builders.SyntheticVolumesConfig.from_knobs(**cfg.synthetic3d.to_dict()),
    )


def _folder_builder(cfg: ml_collections.ConfigDict, data_dir: str | None):
    return folder.SegFolder(
        data_dir=data_dir, file_format="array_record", config=folder.FolderConfig.from_config(cfg, digest_dir(cfg))
    )


def _nifti_builder(cfg: ml_collections.ConfigDict, data_dir: str | None):
    return nifti.SegNifti(
        data_dir=data_dir, file_format="array_record", config=nifti.NiftiConfig.from_data_config(cfg, digest_dir(cfg))
    )


def _catalogue_builder(cfg: ml_collections.ConfigDict, data_dir: str | None):
    """A dataset from the TFDS catalogue, prepared as array_record (`data.tfds.name`)."""
    if not cfg.tfds.name:
        raise ConfigError("data.name='tfds' needs data.tfds.name (e.g. 'oxford_iiit_pet:4.*.*'; see configs/pets.py)")
    try:
        return tfds.builder(cfg.tfds.name, data_dir=data_dir, file_format="array_record")
    except tfds.core.registered.DatasetNotFoundError as err:
        raise ConfigError(f"data.tfds.name={cfg.tfds.name!r} is not in the TFDS catalogue ({err})") from err


# data.name -> function(data config, tfds data_dir) -> TFDS builder. No registry: add a line here.
DATASETS = {
    "synthetic_shapes": _synthetic_builder,
    "synthetic_volumes": _synthetic3d_builder,
    "folder": _folder_builder,
    "nifti": _nifti_builder,
    "tfds": _catalogue_builder,
}
SPLITS = ("train", "validation")
TFDS_SPLIT_KEYS = {"train": "train_split", "validation": "val_split", "test": "test_split"}  # data.tfds.<key>
# where a dataset's held-out test split comes from, per data.name (said when it has none)
TEST_SPLIT_SOURCES = {
    "synthetic_shapes": "data.synthetic.num_test > 0",
    "synthetic_volumes": "data.synthetic3d.num_test > 0",
    "folder": "a test/ subfolder with images/ and masks/, or split-file rows 'test'",
    "nifti": "a test/ subfolder with images/ and masks/, or split-file rows 'test'",
    "tfds": "data.tfds.test_split (a stored split name)",
}


def data_dir(cfg: ml_collections.ConfigDict) -> str | None:
    return cfg.tfds_dir or os.environ.get("TFDS_DATA_DIR") or None


def digest_dir(cfg: ml_collections.ConfigDict) -> str:
    """Where folder datasets' file digests are cached: the prepared datasets' folder."""
    return data_dir(cfg) or tfds.core.constants.DATA_DIR


def _check_name(cfg: ml_collections.ConfigDict) -> None:
    if cfg.name not in DATASETS:
        raise ConfigError(f"unknown data.name={cfg.name!r}; valid datasets: {sorted(DATASETS)}")


def make_builder(cfg: ml_collections.ConfigDict):
    """The TFDS builder `cfg` names (`DATASETS`), not prepared."""
    _check_name(cfg)
    return DATASETS[cfg.name](cfg, data_dir(cfg))


def dataset_id(cfg: ml_collections.ConfigDict) -> str:
    """`builder/config/version` of the prepared copy `cfg` reads (nothing is prepared): for folders
    the config name hashes the files' names and contents, so it changes when they do. A run
    records it (workdirs.prepare) so that resuming on changed data is not silent."""
    builder = make_builder(cfg)
    config = builder.builder_config.name if builder.builder_config else ""
    return "/".join(p for p in (builder.name, config, str(builder.version)) if p)


def preparation_lock(builder):
    """Held while `builder`'s dataset is prepared, so that processes on one machine (seeds or
    study variants started side by side) take turns: the first writes the files, the others
    wait and then read them. TFDS alone would fail in the second one when it renames its
    finished copy into place. The lock file sits beside the dataset's folder."""
    path = os.path.dirname(os.fspath(builder.data_dir)) + ".lock"
    return locks.held(path, wait=True, what=f"dataset {builder.name}")


def _download_and_prepare(cfg: ml_collections.ConfigDict):
    """The prepared builder, made once the lock is held (a builder made earlier would not see
    files another process has just finished)."""
    with preparation_lock(make_builder(cfg)):
        builder = make_builder(cfg)
        builder.download_and_prepare()
    if hasattr(builder, "check_generator"):  # synthetic data: a copy made by an older generator
        builder.check_generator()
    return builder


def prepare(cfg: ml_collections.ConfigDict):
    """Build the dataset's array_record files if they are not there yet; return the builder."""
    _check_name(cfg)  # on every process, before any waits for process 0
    try:
        if jax.process_count() > 1:  # one process writes the files, the others wait and read them
            if jax.process_index() == 0:
                _download_and_prepare(cfg)
            parallel.host_barrier(f"segjax: prepared {cfg.name}")
        return _download_and_prepare(cfg)
    except ImportError as err:  # catalogue builders that need TensorFlow to prepare (not to read)
        raise DataError(
            f"preparing {cfg.tfds.name or cfg.name} needs TensorFlow ({err}); prepare it once with "
            "`pip install -r requirements-tf.txt`, then train without it (see configs/pets.py)"
        ) from err


def check_example(image: np.ndarray, label: np.ndarray, cfg: ml_collections.ConfigDict, where: str) -> None:
    """Raise DataError (naming `where`) for wrong channels, shape mismatch or out-of-range labels."""
    if image.ndim == label.ndim:
        image = image[..., None]
    if image.shape[-1] != cfg.channels:
        raise DataError(
            f"{where}: image has {image.shape[-1]} channels but data.channels={cfg.channels}; "
            "convert the images or set data.channels"
        )
    if image.shape[:-1] != label.shape:
        raise DataError(f"{where}: image size {image.shape[:-1]} differs from label size {label.shape}")
    validation.check_labels(label, cfg.num_classes, cfg.ignore_label, where)


class DecodedSource:
    """Random-access view of one split that decodes PNGs and validates each example."""

    def __init__(self, raw, cfg: ml_collections.ConfigDict, name: str, with_instances: bool = False):
        self._raw = raw
        self._cfg = cfg
        self._name = name
        self._with_instances = with_instances
        catalogue = cfg.name == "tfds"
        self._keys = (cfg.tfds.image_key, cfg.tfds.label_key) if catalogue else ("image", "label")
        self._label_map = np.asarray(cfg.label_map, np.int64) if cfg.label_map else None

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        where = f"{self._name}[{index}]"
        record = self._raw[index]
        image, label = (png.as_array(record[k], where, ids=k == self._keys[1]) for k in self._keys)
        if label.ndim == image.ndim and label.shape[-1] == 1:
            label = label[..., 0]
        label = label.astype(np.int32)
        if self._label_map is not None:
            label = validation.map_labels(label, self._label_map, where)
        if image.ndim == label.ndim:
            image = image[..., None]
        check_example(image, label, self._cfg, where)
        instances = None
        if self._with_instances and "instances" in record:
            instances = png.as_array(record["instances"], where, ids=True).reshape(label.shape).astype(np.int32)
        if self._cfg.resize and label.ndim == 2 and label.shape != (self._cfg.resize,) * 2:
            if instances is not None:
                instances = nearest(instances, self._cfg.resize)
            image, label = resize(image, label, self._cfg.resize)
        if any(self._cfg.image_shift):
            image = alignment.shift_image(image, self._cfg.image_shift, where)
        example = {"image": image, "label": label, "index": np.int32(index)}
        if "name" in record:  # folder / NIfTI builders store the file name (per-image results)
            name = record["name"]
            example["name"] = name.decode() if isinstance(name, bytes) else str(name)
        if "spacing" in record:  # NIfTI volumes: voxel size (D, H, W) in mm (surface metrics in mm)
            example["spacing"] = np.asarray(record["spacing"], np.float32)
        if instances is not None:
            example["instances"] = instances
        return example


def resize(image: np.ndarray, label: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Image bilinear, label nearest neighbour, to size x size (`data.resize`)."""
    channels = [
        np.asarray(Image.fromarray(image[..., k]).resize((size, size), Image.BILINEAR)) for k in range(image.shape[-1])
    ]
    return np.stack(channels, -1), nearest(label, size)


def nearest(label: np.ndarray, size: int) -> np.ndarray:
    """An integer map (labels, instance ids) resized to size x size by nearest neighbour."""
    return np.asarray(Image.fromarray(label.astype(np.int32)).resize((size, size), Image.NEAREST)).astype(np.int32)


class InMemorySource:
    """A split decoded once and kept in memory (`data.cache=True`, for small datasets); `decoded`
    holds examples decoded already ({index: example}, the sample of `check_cache_fits`)."""

    def __init__(self, source, decoded: dict | None = None):
        decoded = decoded or {}
        self._examples = [decoded[i] if i in decoded else source[i] for i in range(len(source))]
        if not self._examples:
            raise DataError("the split is empty")

    def __len__(self) -> int:
        return len(self._examples)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return self._examples[index]


CACHE_SAMPLE = 16  # examples decoded per split to estimate its size in memory (`check_cache_fits`)


def available_memory() -> int:
    """Bytes the host can still give without swapping (Linux MemAvailable; elsewhere free pages)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_cache_fits(sources: dict, fraction: float) -> tuple[int, dict]:
    """(bytes the decoded `sources` would hold in memory (`data.cache`), the sample decoded for
    the estimate: {split: {index: example}}, for the cache to keep), from up to CACHE_SAMPLE evenly
    spaced examples per split; more than `fraction` of the available memory is a ConfigError
    before the rest is decoded (process 0's estimate decides for every process). A large folder
    cached by default decoded for minutes and was then killed by the kernel's OOM killer, with no
    message."""
    need, decoded = 0, {}
    for split, source in sources.items():
        n = len(source)
        picks = np.unique(np.linspace(0, n - 1, min(n, CACHE_SAMPLE)).round().astype(int)) if n else []
        decoded[split] = {int(i): source[int(i)] for i in picks}
        sizes = [sum(np.asarray(v).nbytes for v in example.values()) for example in decoded[split].values()]
        need += int(np.mean(sizes) * n) if sizes else 0
    have = available_memory()
    if parallel.decided_by_process_0("cache_refused", need > fraction * have):
        raise ConfigError(
            f"data.cache=True would hold about {need / 2**30:.1f} GiB of decoded examples in memory, more than "
            f"data.cache_memory_fraction={fraction} of the {have / 2**30:.1f} GiB available: set data.cache=False "
            "(examples are then decoded as they are read)"
        )
    return need, decoded


HISTOGRAM_IMAGES = 256  # a split larger than this (and not cached) is sampled for the histogram


def class_histogram(source, num_classes: int, max_images: int = HISTOGRAM_IMAGES) -> tuple[np.ndarray, int]:
    """(pixels per class 0..C-1, images counted): every image of a cached split, else up to
    `max_images` evenly spaced ones (decoding a large split only to log its histogram would
    delay training); ignored pixels are not counted."""
    n = len(source)
    every = isinstance(source, InMemorySource) or n <= max_images
    indices = range(n) if every else np.linspace(0, n - 1, max_images).round().astype(int)
    hist = np.zeros(num_classes, np.int64)
    for i in indices:
        lab = source[int(i)]["label"]
        hist += np.bincount(lab[(lab >= 0) & (lab < num_classes)].ravel(), minlength=num_classes)
    return hist, len(indices)


def _is_image(features, key: str) -> bool:
    return key in features and isinstance(features[key], tfds.features.Image)


def open_splits(cfg: ml_collections.ConfigDict, with_instances: bool = False, splits=SPLITS) -> dict[str, object]:
    """Prepare the dataset and return {split: random-access decoded source} for `splits` (train and
    validation; `test` where the dataset has one: `TEST_SPLIT_SOURCES`); `with_instances` also decodes
    the instance maps (`instances` int32 [H,W]) where the dataset has them. Opening the train
    split logs its class histogram."""
    if len(cfg.class_names) != cfg.num_classes:
        raise ConfigError(f"data.class_names has {len(cfg.class_names)} names but data.num_classes={cfg.num_classes}")
    repeated = sorted(n for n, count in collections.Counter(cfg.class_names).items() if count > 1)
    if repeated:  # per-class metric keys (val/iou/<name>) would overwrite each other
        raise ConfigError(f"data.class_names repeats {repeated}; give each class its own name")
    builder = prepare(cfg)
    features = builder.info.features
    keys = ("image", "label", "instances", cfg.tfds.image_key, cfg.tfds.label_key)
    skip = {k: tfds.decode.SkipDecoding() for k in keys if _is_image(features, k)}
    opened = {}
    for split in splits:
        stored = cfg.tfds[TFDS_SPLIT_KEYS[split]] if cfg.name == "tfds" else split
        try:
            if not stored:  # data.tfds.test_split = '' (its default): no test split named
                raise KeyError(f"data.tfds.{TFDS_SPLIT_KEYS[split]} is ''")
            raw = builder.as_data_source(split=stored, decoders=skip)
        except (KeyError, ValueError) as err:
            hint = f"a test split comes from {TEST_SPLIT_SOURCES[cfg.name]}" if split == "test" else ""
            hint = hint or "set data.tfds.train_split / val_split"
            have, named = sorted(builder.info.splits), f" {stored!r} ({err})" if cfg.name == "tfds" else ""
            raise DataError(f"{builder.name} has no {split} split{named}; it has {have}: {hint}") from err
        opened[split] = DecodedSource(raw, cfg, f"{builder.name}/{stored}", with_instances and cfg.name != "tfds")
    if cfg.cache:
        _, decoded = check_cache_fits(opened, cfg.cache_memory_fraction)  # its sample is not decoded twice
        opened = {split: InMemorySource(source, decoded[split]) for split, source in opened.items()}
    if "train" in opened:
        hist, counted = class_histogram(opened["train"], cfg.num_classes)
        shares = ", ".join(f"{n}={h / max(hist.sum(), 1):.3f}" for n, h in zip(cfg.class_names, hist, strict=True))
        logging.info("train class histogram (pixel share, %d of %d images): %s", counted, len(opened["train"]), shares)
    return opened
