"""A multi-page image file (a TIFF stack such as ISBI 2012's train-volume.tif) -> one PNG per page,
the layout image/mask folders are read in (one image per file; a stack is refused there).

    python -m segjax.data.pages --stack=train-volume.tif --out=isbi/images
    python -m segjax.data.pages --stack=train-labels.tif --out=isbi/masks --name=train-volume

Page k becomes `<name>_<k:03d>.png` (`name`: the stack's file stem unless --name; give a label
stack its image stack's name so that the pairs match), its pixels as stored: nothing is scaled or
mapped. A label stack storing other values than the ids says which in the config: ISBI's
train-labels.tif stores cells as 255 and membranes as 0, so `--config.data.folder.mask_values="(255,0)"`
gives cell 0 and membrane 1, as configs/isbi.py names them. Files already in --out are never
replaced unless --overwrite.
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags
from PIL import Image, ImageSequence, UnidentifiedImageError

from segjax.data import folder
from segjax.errors import DataError, WorkdirError, exit_on_user_error

# page modes a PNG holds as they are (1-bit, 8-bit gray/colour/palette, 16-bit gray)
_PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I;16B", "I;16L")


def split(stack: str, out: str, name: str = "", overwrite: bool = False) -> list[str]:
    """Write each page of `stack` to `out/<name>_<k:03d>.png`; returns the paths in page order."""
    name = name or folder.stem(os.path.basename(stack))
    try:
        with Image.open(stack) as image:
            pages = [_storable(page.copy(), stack, k) for k, page in enumerate(ImageSequence.Iterator(image))]
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"{stack}: not a readable image file ({err})") from err
    digits = max(3, len(str(len(pages) - 1)))
    paths = [os.path.join(out, f"{name}_{k:0{digits}d}.png") for k in range(len(pages))]
    present = [p for p in paths if os.path.exists(p)]
    if present and not overwrite:
        raise WorkdirError(f"{len(present)} pages already exist (e.g. {present[0]}); use another --out or --overwrite")
    os.makedirs(out, exist_ok=True)
    for page, path in zip(pages, paths, strict=True):
        page.save(path, format="PNG")
    return paths


def _storable(page: Image.Image, stack: str, k: int) -> Image.Image:
    """`page` in a mode PNG holds without changing a value: 32-bit integer pages whose values fit
    16 bits become 16-bit; anything else PNG cannot hold (float, wider ints) is a DataError."""
    if page.mode in _PNG_MODES:
        return page
    values = np.asarray(page)
    if page.mode == "I" and (values.size == 0 or (values.min() >= 0 and values.max() <= np.iinfo(np.uint16).max)):
        return Image.fromarray(values.astype(np.uint16))
    raise DataError(f"{stack}: page {k} has PIL mode {page.mode!r}, which a PNG cannot hold without changing values")


def main(argv):
    f = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    with exit_on_user_error():
        paths = split(f.stack, f.out, f.name, f.overwrite)
        print(f"{len(paths)} pages -> {f.out} ({os.path.basename(paths[0])} ... {os.path.basename(paths[-1])})")


if __name__ == "__main__":  # flags defined here: importing the module defines none
    flags.DEFINE_string("stack", None, "The multi-page image file (e.g. a TIFF stack).", required=True)
    flags.DEFINE_string("out", None, "Folder for the pages (PNG).", required=True)
    flags.DEFINE_string("name", "", "Page files are <name>_<k>.png; default: the stack's file stem.")
    flags.DEFINE_bool("overwrite", False, "Replace page files already in --out.")
    app.run(main)
