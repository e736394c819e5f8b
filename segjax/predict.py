"""Apply a trained run to new images: one class-id mask per image file, optionally probabilities.

    python -m segjax.predict --config=configs/isbi.py --workdir=runs/isbi \\
        --images=../shared/data/isbi2012_membrane/test_images --out=runs/isbi/test_masks

Every image file in `--images` (PNG, TIFF, JPEG, ...; 2D runs) is prepared exactly as a
validation image (channels, `data.resize`, `data.image_shift`, 0..1 scaling, zero padding to a
multiple of 2**depth, masked out) and predicted with the config's eval settings (`eval.window`,
`eval.tta`; pass the run's config, overriding those if wanted) from the run's `best` or `latest`
checkpoint. Writes `<out>/<name>.png` (class ids at the file's own size: uint8, uint16 above 256
classes) and with `--probabilities` `<out>/<name>.npy` (float16 softmax [H, W, C]). Files
already in `--out` are never replaced unless `--overwrite`.
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from PIL import Image
from tqdm import tqdm

from segjax import inference, rescore, train
from segjax.data import alignment, folder, pipeline, png, sources
from segjax.errors import ConfigError, DataError, SegjaxError, WorkdirError


class ImageFiles:
    """Random-access source of the image files in a folder, prepared as the validation split's
    images are (`sources.DecodedSource`); labels are zeros (there are none). `shapes` keeps each
    read image's prepared and original size, to which its prediction is brought back."""

    def __init__(self, directory: str, cfg: ml_collections.ConfigDict):
        if not os.path.isdir(directory):
            raise DataError(f"--images={directory} is not a folder")
        self._paths = [
            os.path.join(directory, n)
            for n in sorted(os.listdir(directory))
            if not n.startswith(".") and os.path.isfile(os.path.join(directory, n))
        ]
        if not self._paths:
            raise DataError(f"no image files in {directory}")
        self.names = [folder.stem(os.path.basename(p)) for p in self._paths]
        twice = sorted({n for n in self.names if self.names.count(n) > 1})
        if twice:
            raise DataError(
                f"{directory}: several files share the names {twice[:3]} (masks would overwrite each other)"
            )
        self._cfg = cfg
        self.shapes: dict[int, tuple] = {}  # index -> ((h, w) as prepared, (H, W) of the file), once read

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: int) -> dict:
        path = self._paths[index]
        with open(path, "rb") as f:
            image = png.decode(f.read(), path)
        if image.dtype != np.uint8:
            raise DataError(f"{path}: {image.dtype} image; segjax trains on 8-bit images, convert it to uint8")
        if image.ndim == 3 and image.shape[-1] == 4:  # RGBA with an unused alpha channel, as in training
            image = image[..., :3]
        if image.ndim == 2:
            image = image[..., None]
        label = np.zeros(image.shape[:2], np.int32)
        sources.check_example(image, label, self._cfg, path)
        size = image.shape[:2]
        if self._cfg.resize and size != (self._cfg.resize,) * 2:
            image, label = sources.resize(image, label, self._cfg.resize)
        if any(self._cfg.image_shift):
            image = alignment.shift_image(image, self._cfg.image_shift, path)
        self.shapes[index] = (image.shape[:2], size)
        return {"image": image, "label": label, "name": self.names[index]}


def _back_to_size(probs: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Probabilities [h, w, C] of a `data.resize`d image -> the file's size (bilinear per class)."""
    if probs.shape[:2] == tuple(size):
        return probs
    planes = [
        np.asarray(Image.fromarray(probs[..., c]).resize(size[::-1], Image.BILINEAR)) for c in range(probs.shape[-1])
    ]
    return np.stack(planes, -1)


def predict_folder(
    config: ml_collections.ConfigDict,
    workdir: str,
    images: str,
    out: str,
    which: str = "best",
    probabilities: bool = False,
    overwrite: bool = False,
) -> list[str]:
    """Write a mask (and optionally probabilities) per image file of `images` into `out`;
    returns the mask paths in file order."""
    train.check_config(config)
    if config.model.spatial_dims != 2:
        raise ConfigError("segjax.predict reads 2D image files; 3D volumes (NIfTI) are not supported yet")
    if config.instances.enabled:
        raise ConfigError("segjax.predict writes semantic masks; instance runs (instances.enabled) are not supported")
    source = ImageFiles(images, config.data)
    targets = [os.path.join(out, f"{n}.png") for n in source.names]
    targets += [os.path.join(out, f"{n}.npy") for n in source.names] if probabilities else []
    present = [t for t in targets if os.path.exists(t)]
    if present and not overwrite:
        raise WorkdirError(
            f"{len(present)} outputs already exist (e.g. {present[0]}); use another --out or --overwrite"
        )
    sample = source[0]["image"][None].astype(np.float32) / 255.0
    model, state, _ = rescore.load_run(config, workdir, which, sample)

    @jax.jit
    def classes_and_probabilities(variables, images):
        logits = inference.predict(lambda x: model.apply(variables, x, train=False)[0], images, config.eval)
        return jnp.argmax(logits, -1), jax.nn.softmax(logits.astype(jnp.float32), axis=-1)

    os.makedirs(out, exist_ok=True)
    dtype = np.uint8 if config.data.num_classes <= 256 else np.uint16
    batch_size = min(config.eval.batch_size, len(source))  # no copies computed for a few images
    batches = pipeline.eval_batches(source, config.data, batch_size, pad_multiple=2**config.model.depth)
    written, index = [], 0
    bar = tqdm(total=len(source), desc="predict", unit="image", dynamic_ncols=True)
    for batch in batches:
        classes, probs = jax.device_get(classes_and_probabilities(state.eval_variables(), jnp.asarray(batch["image"])))
        for row_classes, row_probs in zip(classes, probs, strict=True):
            if index == len(source):  # copies that fill the last batch
                break
            (h, w), size = source.shapes[index]
            p = _back_to_size(row_probs[:h, :w], size)
            # the logits' argmax, as evaluation scores it; after data.resize, of the resized probabilities
            mask = row_classes[:h, :w] if (h, w) == tuple(size) else np.argmax(p, -1)
            Image.fromarray(mask.astype(dtype)).save(targets[index])
            if probabilities:
                np.save(os.path.join(out, f"{source.names[index]}.npy"), p.astype(np.float16))
            written.append(targets[index])
            index += 1
            bar.update(1)
    bar.close()
    logging.info("predict: %d masks from the %s checkpoint of %s in %s", len(written), which, workdir, out)
    return written


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    try:
        written = predict_folder(f.config, f.workdir, f.images, f.out, f.checkpoint, f.probabilities, f.overwrite)
        print(f"{len(written)} masks written to {f.out}")
    except SegjaxError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", "configs/default.py", "The run's config file (eval.* may differ).")
    flags.DEFINE_string("workdir", None, "The trained run's folder.", required=True)
    flags.DEFINE_string("images", None, "Folder of image files to segment.", required=True)
    flags.DEFINE_string("out", None, "Folder for the masks (<name>.png).", required=True)
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint of the run.")
    flags.DEFINE_bool("probabilities", False, "Also write <name>.npy: float16 softmax [H, W, C].")
    flags.DEFINE_bool("overwrite", False, "Replace files already in --out.")
    app.run(main)
