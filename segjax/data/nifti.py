"""A TFDS builder for a folder of NIfTI volumes and label volumes (nibabel; array_record, no TF).

Layout and split rules are those of the 2D folder builder (segjax/data/folder.py):
    ROOT/images/NAME.nii.gz   intensity volumes (3D, or 4D with channels last)
    ROOT/masks/NAME.nii.gz    class ids 0..C-1 per voxel, same grid as the image
plus ROOT/train|val|test/ subfolders, a split file, k-fold or a seeded fraction.

Volumes are stored as [D, H, W, C] float32 (NIfTI's (x, y, z) axes reversed, so D is the slice
axis) after per-volume intensity normalisation (`data.nifti.normalize`):
    'percentile'  clip to the volume's (low, high) percentiles, then scale to 0..1 (nnU-Net's CT
                  scheme per volume; keeps the 0..1 range the intensity augmentations expect)
    'zscore'      (x - mean) / std over the volume (nnU-Net's MRI scheme; gamma augmentation,
                  which clips to 0..1, should stay off)
    'minmax'      scale min..max to 0..1
Each channel is normalised on its own. Labels must hold integral class ids; an image and a mask
whose shapes or affines differ, or a corrupt file, fail while preparing, naming the file.

Each volume's voxel spacing is stored too, as `spacing` (D, H, W) in millimetres (the header's
spatial unit converted; a header without one is taken as mm, the NIfTI tools' convention), so
that surface metrics can be reported in mm (`eval.surface_units='physical'`).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import nibabel as nib
import numpy as np
import tensorflow_datasets as tfds

from segjax.data import folder, validation
from segjax.data.intensity import NORMALIZATIONS, normalize
from segjax.errors import ConfigError, DataError


@dataclasses.dataclass
class NiftiConfig(folder.FolderConfig):
    normalize: str = "percentile"
    low: float = 0.5
    high: float = 99.5

    @classmethod
    def from_data_config(cls, cfg, cache_dir: str) -> NiftiConfig:
        n = cfg.nifti
        if n.normalize not in NORMALIZATIONS:
            raise ConfigError(f"data.nifti.normalize={n.normalize!r}; choose one of {list(NORMALIZATIONS)}")
        low, high = n.percentiles
        if not 0 <= low < high <= 100:
            raise ConfigError(f"data.nifti.percentiles={tuple(n.percentiles)} must satisfy 0 <= low < high <= 100")
        return cls.from_config(cfg, cache_dir, normalize=n.normalize, low=float(low), high=float(high))


MM_PER_UNIT = {"mm": 1.0, "unknown": 1.0, "meter": 1000.0, "micron": 0.001}  # NIfTI xyz units


def load(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(data in NIfTI axis order, affine); a corrupt or unreadable file raises DataError."""
    data, affine, _ = load_with_spacing(path)
    return data, affine


def load_with_spacing(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data in NIfTI axis order, affine, voxel spacing (D, H, W) in mm); a corrupt or unreadable
    file raises DataError."""
    try:
        img = nib.load(path)
        data, affine = np.asarray(img.dataobj), np.asarray(img.affine)
        unit = img.header.get_xyzt_units()[0]
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, ...)
        raise DataError(f"{path}: corrupt or unreadable NIfTI file ({type(err).__name__}: {err})") from err
    xyz = np.linalg.norm(affine[:3, :3], axis=0) * MM_PER_UNIT.get(unit, 1.0)  # voxel size along x, y, z
    return data, affine, xyz[::-1].astype(np.float32)


def read_image(image_path: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw intensities [D,H,W,C], affine) of one image volume, its shape and channels checked."""
    image, affine = load(image_path)
    return _as_dhwc(image, image_path, channels), affine


def _as_dhwc(image: np.ndarray, image_path: str, channels: int) -> np.ndarray:
    if image.ndim == 3:
        image = image[..., None]
    if image.ndim != 4:
        raise DataError(f"{image_path}: expected a 3D volume (or 4D with channels last), got shape {image.shape}")
    image = np.transpose(image, (2, 1, 0, 3))  # (x, y, z, c) -> (z, y, x, c) = [D, H, W, C]
    if image.shape[-1] != channels:
        raise DataError(f"{image_path}: volume has {image.shape[-1]} channels but data.channels={channels}")
    return image


def read_label(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(class ids [D,H,W] in their stored dtype, affine) of a label volume (a dataset's mask, or a
    predicted one scored by segjax.score_masks): 3D, or 4D with one channel; non-integer values
    are a DataError naming the file."""
    label, affine = load(path)
    if label.ndim == 4 and label.shape[-1] == 1:
        label = label[..., 0]
    if label.ndim != 3:
        raise DataError(f"{path}: label volumes must be 3D class-id volumes, got shape {label.shape}")
    if not np.issubdtype(label.dtype, np.integer):
        if not np.all(np.isfinite(label)) or not np.array_equal(label, np.round(label)):
            raise DataError(f"{path}: label volume holds non-integer values; store class ids")
    return np.transpose(label, (2, 1, 0)), affine


def read_pair(cfg: NiftiConfig, image_path: str, mask_path: str) -> dict[str, np.ndarray]:
    """Decode, check and normalise one volume pair: image [D,H,W,C] float32, label [D,H,W] uint8,
    spacing (D, H, W) in mm."""
    raw, image_affine, spacing = load_with_spacing(image_path)
    image = _as_dhwc(raw, image_path, cfg.channels)
    label, label_affine = read_label(mask_path)
    if label.shape != image.shape[:3]:
        raise DataError(f"{mask_path}: label shape {label.shape} differs from image shape {image.shape[:3]} (D,H,W)")
    if not np.allclose(image_affine, label_affine, atol=1e-3):
        raise DataError(f"{mask_path}: affine differs from the image's; resample the label onto the image grid")
    mapped = (
        validation.map_labels(label.astype(np.int64), np.asarray(cfg.label_map), mask_path) if cfg.label_map else label
    )
    validation.check_labels(mapped, cfg.num_classes, cfg.ignore_label, mask_path)  # stored as they are: mapped at load
    image = normalize(image, cfg.normalize, cfg.low, cfg.high)
    return {"image": image, "label": label.astype(folder.label_dtype(cfg)), "spacing": spacing}


class SegNifti(tfds.core.GeneratorBasedBuilder):
    """A folder of NIfTI image/label volumes as a TFDS dataset; see the module docstring."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.1.0": "voxel spacing (D, H, W) in mm per volume",
        "1.0.0": "volumes and labels",
    }
    BUILDER_CONFIGS = (NiftiConfig(name="default"),)

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config.channels
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(
                {
                    "name": tfds.features.Text(),
                    "image": tfds.features.Tensor(shape=(None, None, None, c), dtype=np.float32, encoding="zlib"),
                    "label": tfds.features.Tensor(
                        shape=(None, None, None), dtype=folder.label_dtype(self.builder_config), encoding="zlib"
                    ),
                    "spacing": tfds.features.Tensor(shape=(3,), dtype=np.float32),
                }
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        splits = folder.assign_splits(self.builder_config)
        return {split: self._generate_examples(pairs) for split, pairs in splits.items()}

    def _generate_examples(self, pairs):
        for name, image_path, mask_path, _ in pairs:
            yield name, {"name": name, **read_pair(self.builder_config, image_path, mask_path)}
