"""One mask file per object (the Data Science Bowl 2018 layout) -> the image/mask/instance folder
segjax reads: `ROOT/<case>/images/<case>.png` and `ROOT/<case>/masks/*.png` (each a binary mask
of one object, any nonzero value) become `OUT/images/<case>.png` (the file copied as it is),
`OUT/masks/<case>.png` (class ids: 0 background, 1 object) and `OUT/instances/<case>.png` (uint16
ids 1..n, in the sorted order of the case's mask files).

    python -m segjax.data.object_masks --root=stage1_train --out=dsb
    python -m segjax.main --config=configs/folder.py --workdir=runs/dsb --config.data.dir=dsb \\
        --config.data.class_names="('background','nucleus')" --config.instances.enabled=True

Two objects claiming one pixel, a mask of another size than its image, a case without one image
or without masks are errors naming the files, never merged silently. Files already in --out are
never replaced unless --overwrite.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
from absl import app, flags
from PIL import Image

from segjax import writers
from segjax.data import mask_codes, png
from segjax.errors import DataError, WorkdirError, exit_on_user_error


def convert_case(case_dir: str) -> tuple[str, np.ndarray, np.ndarray]:
    """(the case's image path, class ids uint8, instance ids uint16) of one case folder."""
    image_dir = os.path.join(case_dir, "images")
    images = sorted(n for n in os.listdir(image_dir) if not n.startswith(".")) if os.path.isdir(image_dir) else []
    if len(images) != 1:
        raise DataError(f"{case_dir}/images holds {len(images)} files; a case has one image")
    image_path = os.path.join(case_dir, "images", images[0])
    with open(image_path, "rb") as f:
        size = png.decode(f.read(), image_path).shape[:2]
    mask_dir = os.path.join(case_dir, "masks")
    names = sorted(n for n in os.listdir(mask_dir) if not n.startswith(".")) if os.path.isdir(mask_dir) else []
    if not names:
        raise DataError(f"{case_dir}: no object masks in {mask_dir}")
    ids, owner = np.zeros(size, np.int64), {}
    for k, name in enumerate(names, 1):
        path = os.path.join(mask_dir, name)
        with open(path, "rb") as f:
            mask = png.decode(f.read(), path, ids=True)
        if mask.ndim == 3:  # a colour mask: an object wherever a colour channel is (alpha left out)
            mask = mask_codes.colour_channels(mask).max(axis=-1)
        if mask.shape != size:
            raise DataError(f"{path}: mask size {mask.shape} differs from its image's {size}")
        taken = (mask > 0) & (ids > 0)
        if taken.any():
            other = owner[int(ids[taken][0])]
            raise DataError(f"{path} and {other} both claim {int(taken.sum())} pixels; one object per pixel")
        ids[mask > 0], owner[k] = k, path
    if len(names) > np.iinfo(np.uint16).max:
        raise DataError(f"{case_dir}: {len(names)} objects do not fit uint16 instance ids")
    return image_path, (ids > 0).astype(np.uint8), ids.astype(np.uint16)


def convert(root: str, out: str, overwrite: bool = False) -> list[str]:
    """Convert every case folder of `root` into `out` (layout in the module docstring); returns
    the case names in sorted order."""
    if not os.path.isdir(root):
        raise DataError(f"--root={root} is not a folder")
    cases = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and not n.startswith("."))
    if not cases:
        raise DataError(f"{root} holds no case folders (<case>/images/, <case>/masks/)")
    converted = [(case, *convert_case(os.path.join(root, case))) for case in cases]  # every error before a write
    targets = {}
    for case, image_path, _, _ in converted:
        image_name = case + os.path.splitext(image_path)[1]
        targets[case] = [os.path.join(out, "images", image_name)]
        targets[case] += [os.path.join(out, kind, f"{case}.png") for kind in ("masks", "instances")]
    present = [p for paths in targets.values() for p in paths if os.path.exists(p)]
    if present and not overwrite:
        raise WorkdirError(f"{len(present)} files already exist (e.g. {present[0]}); use another --out or --overwrite")
    for kind in ("images", "masks", "instances"):
        os.makedirs(os.path.join(out, kind), exist_ok=True)
    for case, image_path, semantic, instances in converted:
        image_target, mask_target, instance_target = targets[case]
        with writers.whole(image_target) as partial:
            shutil.copyfile(image_path, partial)
        for array, target in ((semantic, mask_target), (instances, instance_target)):
            with writers.whole(target) as partial:
                Image.fromarray(array).save(partial, format="PNG")
    return cases


def main(argv):
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not f.root or not f.out:
        raise app.UsageError("--root and --out are required")
    with exit_on_user_error():
        cases = convert(f.root, f.out, f.overwrite)
        print(f"{len(cases)} cases -> {f.out} (images/, masks/, instances/)")


if __name__ == "__main__":  # flags defined here: importing the module defines none
    flags.DEFINE_string("root", None, "Folder of case folders, each with images/ and masks/ (one per object).")
    flags.DEFINE_string("out", None, "Folder to write images/, masks/ and instances/ to.")
    flags.DEFINE_bool("overwrite", False, "Replace files already in --out.")
    app.run(main)
