"""PNG bytes <-> numpy arrays with PIL; corrupt bytes raise a DataError that names the source."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from segjax.errors import ConfigError, DataError

EXIF_POLICIES = ("error", "apply", "ignore")  # data.folder.exif
# EXIF orientation tag values other than 1 (as stored) -> how viewers turn the stored pixels
_TURNS = {
    2: "mirrored",
    3: "rotated 180°",
    4: "flipped",
    5: "transposed",
    6: "rotated 90°",
    7: "transversed",
    8: "rotated 270°",
}


# zlib level of the PNGs a dataset is prepared with: level 1 encodes the DSB nuclei 3-4x faster
# than PIL's default 6 (most of a folder's preparation time) for files ~16 % larger, which decode
# as fast (benchmarks/prepare_bench.py); the pixels are the same at every level
COMPRESS_LEVEL = 1


def encode(array: np.ndarray) -> bytes:
    """uint8 [H,W] / [H,W,1] / [H,W,3] or uint16 [H,W] (instance ids) -> PNG bytes."""
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype == np.uint16:
        image = Image.fromarray(array.astype(np.uint16), mode=None)
    elif array.dtype == np.uint8:
        image = Image.fromarray(array)
    else:
        raise DataError(f"cannot store {array.dtype} arrays as PNG; use uint8 (images, labels) or uint16 (instances)")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=COMPRESS_LEVEL)
    return buffer.getvalue()


def lossy(image: Image.Image) -> str:
    """What made a decoded file lossy ('' if nothing): JPEG (and MPO, a camera's multi-picture
    JPEG) or a TIFF with JPEG compression. (WebP decodes as RGB, which masks may not be.)"""
    if image.format in ("JPEG", "MPO"):
        return image.format
    if image.format == "TIFF" and "jpeg" in str(image.info.get("compression", "")):
        return "JPEG-compressed TIFF"
    return ""


def intensities(image: Image.Image) -> Image.Image:
    """An image file's pixels as intensities, not codes: a palette image (GIF, pngquant's PNGs) as
    the colours its indices stand for (gray when every palette entry is: one channel), CMYK (print
    JPEGs) as RGB, gray with alpha as gray (RGBA's alpha is dropped later, `folder.read_image`).
    Read as arrays directly, a palette photo was its index map and a CMYK one four channels taken
    for RGBA. Masks keep a palette's indices: those are the ids (VOC's masks are palette PNGs)."""
    if image.mode in ("P", "PA"):
        palette = np.asarray(image.getpalette("RGB") or [0, 0, 0], np.uint8).reshape(-1, 3)
        return image.convert("L" if (palette == palette[:, :1]).all() else "RGB")
    if image.mode == "CMYK":
        return image.convert("RGB")
    if image.mode == "LA":
        return image.convert("L")
    return image


def stacked(image: Image.Image, where: str) -> None:
    """A DataError for a file of several pages (a multi-page TIFF stack such as ISBI 2012's
    train-volume.tif, an animated PNG or GIF): PIL reads its first page only, so a stack of 30
    images and its 30 masks would silently train as one example. A camera's MPO keeps its main
    picture first (the others are previews), so it reads as that picture."""
    pages = getattr(image, "n_frames", 1)
    if pages > 1 and image.format != "MPO":
        raise DataError(
            f"{where}: a {image.format} file of {pages} pages; segjax reads one image per file: write each page "
            "as its own file (`python -m segjax.data.pages --stack=FILE --out=FOLDER`), a 3D volume as NIfTI"
        )


def turned(image: Image.Image, where: str, exif: str) -> Image.Image:
    """`image` with its EXIF orientation (phone photos: the pixels are stored sideways and a tag
    says how to turn them) handled per `exif`: 'apply' turns it as viewers and annotation tools
    show it, 'ignore' keeps the stored pixels, 'error' refuses to guess. Which one is right depends
    on what the masks were drawn on, and the wrong one misaligns every label: silently where the
    turn keeps the size (180°, mirrored) or the image is square."""
    if exif not in EXIF_POLICIES:
        raise ConfigError(f"data.folder.exif={exif!r}; choose one of {list(EXIF_POLICIES)}")
    tag = image.getexif().get(0x0112, 1)  # Orientation
    if tag not in _TURNS or exif == "ignore":
        return image
    if exif == "error":
        raise DataError(
            f"{where}: EXIF orientation {tag} (viewers show it {_TURNS[tag]}); set data.folder.exif='apply' if the "
            "masks were drawn on the image as viewers and annotation tools show it, 'ignore' if on its stored pixels"
        )
    return ImageOps.exif_transpose(image)


def decode(
    data: bytes, where: str, ids: bool = False, exif: str = "ignore", lossless: bool | None = None
) -> np.ndarray:
    """PNG bytes (or another image file's) -> uint8 [H,W(,C)] or uint16 [H,W]; `where` names the
    file or example in errors; `exif`: an EXIF orientation's policy (`turned`).
    `ids=True` (class-id masks, instance maps) keeps a palette's indices and refuses lossy files
    (`lossy`): their compression moves ids near edges to other ids that are still in range (a
    32x32 0/1/2 mask saved as JPEG at quality 95 comes back with 45 pixels changed), so no later
    label check could notice. `lossless` (default: `ids`) refuses them for values decoded as
    intensities (masks whose gray levels or colours stand for ids)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            stacked(image, where)
            kind = (ids if lossless is None else lossless) and lossy(image)
            image = turned(image, where, exif)
            array = np.array(image if ids else intensities(image))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, DataError | ConfigError):
            raise
        raise DataError(f"{where}: corrupt or truncated image ({err})") from err
    if kind:
        raise DataError(
            f"{where}: a {kind} file; ids must be stored losslessly (PNG, TIFF), as lossy compression changes "
            "them near edges: export the masks as PNG"
        )
    if array.dtype == np.int32 and array.size and 0 <= array.min() and array.max() <= 65535:
        array = array.astype(np.uint16)  # PIL mode 'I' (16-bit PNGs on some PIL versions); wider stays int32
    if array.dtype == bool:  # PIL mode '1' (1-bit files, e.g. ImageJ's binary masks): ids 0/1, images 0/255
        array = array.astype(np.uint8) * np.uint8(1 if ids else 255)
    return array


def as_array(value, where: str, ids: bool = False) -> np.ndarray:
    """A stored feature as an array: PNG bytes (2D images, read with decoding skipped) are
    decoded (`ids`: labels and instance maps, whose palette indices are the ids); tensors (3D
    volumes) are arrays already."""
    return decode(value, where, ids=ids) if isinstance(value, bytes) else np.asarray(value)
