"""How a folder's mask files encode class ids, when they do not store them directly.

`data.folder.mask_threshold`: binary masks stored as 0/255, or as a JPEG whose edges hold values
in between (Kvasir-SEG) -> ids 0/1 by value > threshold. `data.folder.mask_values`: class k is
stored as the value or colour `mask_values[k]` (gray levels such as REFUGE's 0/128/255, or RGB
colours such as CamVid's); one more entry than classes is the ignore label's (VOC's void colour).
A stored value that is not in the table is an error naming the file, never a class by accident.
Instance maps are ids, or colour-coded (one colour per instance), numbered here.
"""

from __future__ import annotations

import numpy as np

from segjax.errors import ConfigError, DataError


def binarized(mask: np.ndarray, threshold: int) -> np.ndarray:
    """Ids 0/1, value > `threshold`; a colour or gray+alpha mask by its mean colour channel."""
    if mask.ndim == 3:
        mask = colour_channels(mask).mean(axis=-1)
    return (mask > threshold).astype(np.uint8)


def colour_channels(mask: np.ndarray) -> np.ndarray:
    """A multi-channel mask's colour channels: RGB(A)'s first three, gray+alpha's gray."""
    return mask[..., :3] if mask.shape[-1] >= 3 else mask[..., :1]


def check_values(values, num_classes: int, ignore_label: int) -> None:
    """`data.folder.mask_values`: one gray level or RGB colour per class (plus, optionally, the
    ignore label's last), all different; else a ConfigError."""
    try:
        table = np.asarray(values, np.int64)
    except (TypeError, ValueError):  # gray levels and colours mixed
        table = np.zeros((0, 0, 0))
    gray, colour = table.ndim == 1, table.ndim == 2 and table.shape[-1] == 3
    extra = len(table) - num_classes
    if not (gray or colour) or extra not in (0, 1) or (extra and ignore_label < 0) or (table < 0).any():
        raise ConfigError(
            f"data.folder.mask_values={tuple(values)}: one gray level or (r, g, b) colour per class, "
            f"{num_classes} (data.num_classes), and one more for data.ignore_label's pixels if set"
        )
    if len(np.unique(table, axis=0)) < len(table):
        raise ConfigError(f"data.folder.mask_values={tuple(values)} repeats a value: two classes cannot share one")


def classes(mask: np.ndarray, values, num_classes: int, ignore_label: int, where: str) -> np.ndarray:
    """The ids the stored `mask` encodes: k where it holds `values[k]` (the entry after the
    classes' -> `ignore_label`). Another value is a DataError naming `where` and the values."""
    table = np.asarray(values, np.int64)
    if table.ndim == 2:  # colours: (r, g, b) -> one integer code
        if mask.ndim != 3 or mask.shape[-1] < 3:
            raise DataError(f"{where}: a single-channel mask, but data.folder.mask_values are (r, g, b) colours")
        codes, keys = _rgb_codes(mask[..., :3].astype(np.int64)), _rgb_codes(table)
    else:
        if mask.ndim != 2:
            raise DataError(f"{where}: a {mask.shape[-1]}-channel mask, but data.folder.mask_values are gray levels")
        codes, keys = mask.astype(np.int64), table
    order = np.argsort(keys)
    position = np.clip(np.searchsorted(keys[order], codes), 0, len(keys) - 1)
    found = keys[order][position] == codes
    if not found.all():
        stray = np.unique(mask[~found], axis=0)[:5] if mask.ndim == 3 else np.unique(mask[~found])[:5]
        raise DataError(
            f"{where}: {int((~found).sum())} pixels hold values not in data.folder.mask_values, e.g. "
            f"{[tuple(int(c) for c in np.atleast_1d(v)) if mask.ndim == 3 else int(v) for v in stray]}"
        )
    ids = order[position]
    return np.where(ids == num_classes, ignore_label, ids) if len(keys) > num_classes else ids


def instance_ids(inst: np.ndarray, where: str) -> np.ndarray:
    """An instance map as uint16 ids (0 = none): single-channel ids as stored; a colour-coded map
    (each instance its own colour, black none, as many annotation tools export them) numbered by
    colour. More ids than 16 bits hold is a DataError (a cast would wrap them onto other ids)."""
    if inst.ndim == 3 and inst.shape[-1] < 3:  # gray ids with alpha: the ids
        inst = inst[..., 0]
    if inst.ndim == 3:
        codes = _rgb_codes(inst[..., :3].astype(np.int64))
        colours, inst = np.unique(codes, return_inverse=True)
        inst = inst.reshape(codes.shape) + (0 if colours[0] == 0 else 1)  # black -> 0; others 1, 2, ...
    if inst.min() < 0 or inst.max() > np.iinfo(np.uint16).max:
        raise DataError(f"{where}: instance ids {int(inst.min())}..{int(inst.max())} do not fit 0..65535")
    return inst.astype(np.uint16)


def _rgb_codes(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
