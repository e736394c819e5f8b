"""A dataset folder's classes from a small metadata file (`data.folder.classes_file`), as nnU-Net's
dataset.json and MMSeg's metainfo give them: the file, not the config, then defines
`data.num_classes` and `data.class_names`, and the run's config.json records what it said.

Formats: JSON, a list of names in id order (`["background", "cell"]`) or an object of id -> name
with the ids 0..C-1 (`{"0": "background", "1": "cell"}`); any other extension, one name per line
(blank lines skipped; YOLO's and labelme's classes.txt). A name given twice, ids with gaps, an
empty or unreadable file are errors naming the file.
"""

from __future__ import annotations

import json
import os

import ml_collections
from absl import logging

from segjax.errors import ConfigError, DataError

FOLDER_DATASETS = ("folder", "nifti")  # data.name values whose data.dir may hold the file


def read(path: str) -> tuple[str, ...]:
    """The class names `path` lists, in id order; DataError for a missing or malformed file."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise DataError(f"data.folder.classes_file: cannot read {path} ({err.strerror or err})") from None
    if path.endswith(".json"):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not JSON ({err})") from None
        if isinstance(data, dict):
            ids = sorted(data, key=lambda k: int(k) if str(k).lstrip("-").isdigit() else -1)
            if [str(k) for k in ids] != [str(i) for i in range(len(data))]:
                raise DataError(f"{path}: its ids {list(data)} must be 0..{len(data) - 1}, each once")
            data = [data[k] for k in ids]
        if not isinstance(data, list):
            raise DataError(f"{path}: give a list of class names, or an object of id -> name")
        names = data
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"{path}: needs one non-empty name per class, got {names!r}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"{path}: names {repeated} are given twice; each class needs its own")
    return tuple(names)


def apply(config: ml_collections.ConfigDict) -> None:
    """Set `data.num_classes` and `data.class_names` from `data.folder.classes_file` (relative to
    `data.dir`) when one is named; nothing otherwise. Applying it again gives the same config."""
    name = config.data.folder.classes_file
    if not name:
        return
    if config.data.name not in FOLDER_DATASETS:
        raise ConfigError(
            f"data.folder.classes_file={name!r} is read from a folder dataset's data.dir "
            f"(data.name in {list(FOLDER_DATASETS)}, here {config.data.name!r})"
        )
    path = name if os.path.isabs(name) else os.path.join(os.path.expanduser(config.data.dir), name)
    names = read(path)
    if tuple(config.data.class_names) != names:
        logging.info("classes from %s: %s", path, ", ".join(names))
    config.data.num_classes, config.data.class_names = len(names), names
