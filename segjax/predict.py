"""Apply a trained run to new images: one class-id mask per image file, optionally probabilities.

    python -m segjax.predict --config=configs/isbi.py --workdir=runs/isbi \\
        --images=../shared/data/isbi2012_membrane/test_images --out=runs/isbi/test_masks

Every image file in `--images` (PNG, TIFF, JPEG, ...; NIfTI volumes for 3D `data.name='nifti'`
runs) is prepared exactly as a validation image (channels, `data.resize`, `data.image_shift`,
0..1 scaling or the volume's intensity normalisation, zero padding to a multiple of 2**depth,
masked out) and predicted with the config's eval settings (`eval.window`, `eval.tta`; pass the
run's config, overriding those if wanted) from the run's `best` or `latest` checkpoint. Writes
`<out>/<name>.png` (class ids at the file's own size: uint8, uint16 above 256 classes), for
volumes `<out>/<name>.nii.gz` (on the image's grid: its affine and axis order), and with
`--probabilities` `<out>/<name>.npy` (float16 softmax [H, W, C]; volumes [D, H, W, C], D the
slice axis). Instance runs (`instances.enabled`) also write `<out>/<name>_instances.png` (uint16
ids, 0 = none), post-processed as evaluation does; their masks are the semantic classes and
their probabilities include the boundary class. Files already in `--out` are never replaced
unless `--overwrite`; `--resume` keeps them and predicts the files whose outputs are missing
(outputs are written whole or not at all: partial file, then rename). `--shard=i/N`: this
process segments files i, i+N, i+2N, ... of the sorted folder, so N independent processes (one
per host or accelerator) split a large folder between them, writing into the same `--out`.
Subfolders of `--images` are not read (a warning names them). Each start appends what made the
masks to `<out>/environment.jsonl` (`segjax.provenance`: the run, checkpoint and step, the code's
commit, versions, devices).
"""

from __future__ import annotations

import collections
import functools
import os

import jax
import jax.numpy as jnp
import ml_collections
import nibabel as nib
import numpy as np
from absl import app, flags, logging
from PIL import Image
from tqdm import tqdm

from segjax import (
    checkpointing,
    configuration,
    inference,
    instances,
    preflight,
    provenance,
    rescore,
    seeds,
    workdirs,
    writers,
)
from segjax.data import alignment, folder, nifti, pipeline, sources
from segjax.errors import ConfigError, DataError, WorkdirError, exit_on_user_error


class _Files:
    """The files of one folder as a random-access source of examples prepared as the validation
    split's are (`sources.DecodedSource`), labels all zeros (there are none). `shapes` keeps each
    read example's prepared and original size, to which its prediction is brought back."""

    extension = ""
    what = ""  # the kind of file read, for messages

    def __init__(self, directory: str, cfg: ml_collections.ConfigDict, suffixes: tuple[str, ...], shard=(0, 1)):
        if not os.path.isdir(directory):
            raise DataError(f"--images={directory} is not a folder")
        entries = [n for n in sorted(os.listdir(directory)) if not n.startswith(".")]
        files = [n for n in entries if os.path.isfile(os.path.join(directory, n))]
        folders = [n for n in entries if os.path.isdir(os.path.join(directory, n))]
        if folders:  # a nested layout (one folder per case) is not walked: named, so none goes missing unseen
            logging.warning(
                "predict: %d subfolders of %s are not read (only its own files are): %s; run once per folder",
                len(folders),
                directory,
                folders[:5],
            )
        kept = [n for n in files if n.lower().endswith(suffixes)]
        if len(kept) < len(files):  # notes, CSVs: named, not read (a corrupt file of an image type is an error)
            other = [n for n in files if n not in kept]
            logging.warning(
                "predict: %d files in %s are not %s files, skipped: %s", len(other), directory, self.what, other[:5]
            )
        self.paths = [os.path.join(directory, n) for n in kept]
        if not self.paths:
            raise DataError(f"no {self.what} files in {directory}")
        self.names = [folder.stem(os.path.basename(p)) for p in self.paths]
        twice = sorted(n for n, k in collections.Counter(self.names).items() if k > 1)
        if twice:
            raise DataError(
                f"{directory}: several files share the names {twice[:3]} (masks would overwrite each other)"
            )
        self.keep(range(shard[0], len(self.paths), shard[1]))
        self.cfg = cfg
        self.shapes: dict[int, tuple] = {}  # index -> (prepared spatial shape, the file's), once read

    def __len__(self) -> int:
        return len(self.paths)

    def keep(self, indices) -> None:
        """Only these files (by index), in this order: a shard's, or those --resume has not done."""
        self.paths, self.names = [self.paths[i] for i in indices], [self.names[i] for i in indices]


class ImageFiles(_Files):
    """2D image files (PNG, TIFF, JPEG, ...): masks as PNG at the file's own size (turned as
    viewers show it where `data.folder.exif='apply'` turned the image)."""

    extension = ".png"
    what = "image"

    def __init__(self, directory: str, cfg: ml_collections.ConfigDict, shard=(0, 1)):
        super().__init__(directory, cfg, tuple(Image.registered_extensions()), shard)  # any format PIL reads

    def __getitem__(self, index: int) -> dict:
        path = self.paths[index]
        image = folder.read_image(path, self.cfg.folder.rescale, *self.cfg.folder.percentiles, self.cfg.folder.exif)
        label = np.zeros(image.shape[:2], np.int32)
        sources.check_example(image, label, self.cfg, path)
        size = image.shape[:2]
        if self.cfg.resize and size != (self.cfg.resize,) * 2:
            image, label = sources.resize(image, label, self.cfg.resize)
        if any(self.cfg.image_shift):
            image = alignment.shift_image(image, self.cfg.image_shift, path)
        self.shapes[index] = (image.shape[:2], size)
        return {"image": image, "label": label, "name": self.names[index]}

    def save(self, index: int, mask: np.ndarray, path: str) -> None:
        Image.fromarray(mask).save(path)


class VolumeFiles(_Files):
    """NIfTI volumes (`data.name='nifti'` runs), normalised as the training volumes were; masks
    as NIfTI on the image's grid (its affine, its axis order)."""

    extension = ".nii.gz"
    what = "NIfTI (.nii, .nii.gz)"

    def __init__(self, directory: str, cfg: ml_collections.ConfigDict, shard=(0, 1)):
        super().__init__(directory, cfg, (".nii", ".nii.gz"), shard)
        self.affines: dict[int, np.ndarray] = {}

    def __getitem__(self, index: int) -> dict:
        raw, self.affines[index] = nifti.read_image(self.paths[index], self.cfg.channels)
        image = nifti.normalize(raw, self.cfg.nifti.normalize, *self.cfg.nifti.percentiles)
        self.shapes[index] = (image.shape[:3], image.shape[:3])
        return {"image": image, "label": np.zeros(image.shape[:3], np.int32), "name": self.names[index]}

    def save(self, index: int, mask: np.ndarray, path: str) -> None:
        nib.save(nib.Nifti1Image(np.transpose(mask, (2, 1, 0)), self.affines[index]), path)  # [D,H,W] -> (x,y,z)


def _back_to_size(probs: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """Probabilities [h, w, C] of a `data.resize`d image -> the file's size (bilinear per class);
    unchanged when they have it (every volume: `data.resize` is 2D only)."""
    if probs.shape[:-1] == tuple(size):
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
    shard: tuple[int, int] = (0, 1),
    seed: int | None = None,
    resume: bool = False,
) -> list[str]:
    """Write a mask (and optionally probabilities) per image file of `images` into `out`;
    returns the mask paths of the files predicted, in file order. `shard=(i, N)`: only files i, i+N, ... (sorted).
    `seed`: which replica of a `train.num_seeds` > 1 run predicts (its `train.seed + k`).
    `resume`: files whose outputs are all in `out` already are skipped, and no existing file is
    replaced (every output is written to a hidden partial file and renamed into place, so one that
    exists is whole)."""
    preflight.check(config)
    if resume and overwrite:
        raise ConfigError("--resume keeps the outputs already written and --overwrite replaces them: choose one")
    replica = _replica_index(config, seed)
    if config.model.spatial_dims == 3 and config.data.name != "nifti":
        raise ConfigError("segjax.predict reads 3D volumes as NIfTI files (data.name='nifti' runs)")
    part, parts = shard
    if not (parts >= 1 and 0 <= part < parts):
        raise ConfigError(f"--shard={part}/{parts}: needs 0 <= i < N")
    workdirs.require_folder(out, "--out")
    rescore.require_run(config, workdir, which)  # before a file is read
    source = (VolumeFiles if config.model.spatial_dims == 3 else ImageFiles)(images, config.data, shard=shard)
    if not source.paths:  # more shards than files
        logging.info("predict: shard %d/%d of %s holds no file", part, parts, images)
        return []
    with_instances = config.instances.enabled  # the boundary-class network (2D): also instance ids

    def outputs(name: str) -> list[str]:  # the mask first
        extra = ([f"{name}_instances.png"] if with_instances else []) + ([f"{name}.npy"] if probabilities else [])
        return [os.path.join(out, n) for n in [name + source.extension, *extra]]

    if resume:
        partial = writers.leftovers(out)
        if partial:  # not removed here: another process (of --shard, on another host) may be writing one
            logging.warning(
                "predict: %s holds %d hidden partial file(s) of writes that did not finish (e.g. %s): no outputs; "
                "delete them once no predict job writes there",
                out,
                len(partial),
                partial[0],
            )
        todo = [i for i, name in enumerate(source.names) if not all(map(os.path.exists, outputs(name)))]
        if len(todo) < len(source.names):
            logging.info(
                "predict: %d of %d files have their outputs in %s: kept",
                len(source.names) - len(todo),
                len(source.names),
                out,
            )
        source.keep(todo)
        if not source.paths:
            return []
    present = [p for name in source.names for p in outputs(name) if os.path.exists(p)]
    if present and not overwrite and not resume:
        raise WorkdirError(
            f"{len(present)} outputs already exist (e.g. {present[0]}); use another --out, --resume (keep them and "
            "predict the other files) or --overwrite"
        )
    targets = [outputs(n)[0] for n in source.names]
    model, state, _ = rescore.load_run(config, workdir, which, source[0]["image"])
    state = state if replica is None else seeds.replica(state, replica)

    need_probabilities = probabilities or bool(config.data.resize)  # resized back before the argmax

    @jax.jit
    def classes_and_probabilities(variables, images):
        logits = inference.predict(lambda x: model.apply(variables, x, train=False)[0], images, config.eval)
        classes = jnp.argmax(logits, -1)
        return classes, jax.nn.softmax(logits.astype(jnp.float32), -1) if need_probabilities else classes

    os.makedirs(out, exist_ok=True)
    step = int(np.max(jax.device_get(state.step)))
    provenance.record(
        out,
        "predict",
        run=os.path.abspath(workdir),
        checkpoint=which,
        step=step,
        checkpoint_id=checkpointing.fingerprint(workdir, which, step),
        shard=f"{part}/{parts}",
    )
    dtype = np.uint8 if config.data.num_classes <= 256 else np.uint16
    batch_size = min(config.eval.batch_size, len(source))  # no copies computed for a few images
    batches = pipeline.eval_batches(source, config.data, batch_size, pad_multiple=2**config.model.depth)
    written, index = [], 0
    bar = tqdm(total=len(source), desc="predict", unit="image", dynamic_ncols=True)
    variables = state.eval_variables()

    def dispatch(batch: dict):
        return classes_and_probabilities(variables, jnp.asarray(batch["image"]))

    for on_device in pipeline.one_ahead(batches, dispatch):  # masks written while the next batch computes
        classes, probs = jax.device_get(on_device)
        for row_classes, row_probs in zip(classes, probs, strict=True):
            if index == len(source):  # copies that fill the last batch
                break
            prepared, size = source.shapes[index]
            crop = tuple(slice(0, n) for n in prepared)
            p = _back_to_size(row_probs[crop], size) if need_probabilities else None
            # the logits' argmax, as evaluation scores it; after data.resize, of the resized probabilities
            mask = row_classes[crop] if prepared == tuple(size) else np.argmax(p, -1)
            saves = []  # (path, write(partial path)); the mask last: then every output of the file is there
            if with_instances:  # C+1 classes -> semantic classes and instance ids, as evaluation does
                mask, ids = instances.to_instances(mask, config)
                if ids.max() > np.iinfo(np.uint16).max:
                    raise DataError(f"{source.paths[index]}: {ids.max()} instances do not fit a uint16 PNG")
                saves.append(
                    (
                        f"{source.names[index]}_instances.png",
                        functools.partial(source.save, index, ids.astype(np.uint16)),
                    )
                )
            if probabilities:
                values = p.astype(np.float16)
                saves.append((f"{source.names[index]}.npy", lambda path, values=values: np.save(path, values)))
            saves.append((os.path.basename(targets[index]), functools.partial(source.save, index, mask.astype(dtype))))
            for name, save in saves:
                if resume and os.path.exists(os.path.join(out, name)):
                    continue  # --resume never replaces a file: a stopped run's outputs of this file are kept
                with writers.whole(os.path.join(out, name)) as partial:
                    save(partial)
            written.append(targets[index])
            index += 1
            bar.update(1)
    bar.close()
    logging.info("predict: %d masks from the %s checkpoint of %s in %s", len(written), which, workdir, out)
    return written


def _replica_index(config: ml_collections.ConfigDict, seed: int | None) -> int | None:
    """The replica of a run of `train.num_seeds` > 1 replicas that `seed` names (None: one seed)."""
    choices = seeds.replica_seeds(config.train.seed, config.train.num_seeds)
    if config.train.num_seeds == 1:
        if seed not in (None, config.train.seed):
            raise ConfigError(f"--seed={seed}: this run trained one seed, train.seed={config.train.seed}")
        return None
    if seed not in choices:
        raise ConfigError(
            f"the run trained {len(choices)} seeds as replicas of one step (train.num_seeds): choose the one "
            f"that predicts with --seed, one of {choices}"
        )
    return choices.index(seed)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    index, _, count = f.shard.partition("/")
    if not (index.isdigit() and count.isdigit()):
        raise app.UsageError(f"--shard={f.shard}: write i/N, e.g. 0/4")
    with exit_on_user_error():
        written = predict_folder(
            f.config,
            f.workdir,
            f.images,
            f.out,
            f.checkpoint,
            f.probabilities,
            f.overwrite,
            (int(index), int(count)),
            f.seed,
            f.resume,
        )
        print(f"{len(written)} masks written to {f.out}")


if __name__ == "__main__":
    from ml_collections import config_flags

    default_config = "configs/default.py"
    config_flags.DEFINE_config_file("config", default_config, "The run's config file (eval.* may differ).")
    flags.DEFINE_string("workdir", None, "The trained run's folder.", required=True)
    flags.DEFINE_string("images", None, "Folder of image files to segment.", required=True)
    flags.DEFINE_string("out", None, "Folder for the masks (<name>.png).", required=True)
    flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint of the run.")
    flags.DEFINE_bool("probabilities", False, "Also write <name>.npy: float16 softmax [H, W, C].")
    flags.DEFINE_bool("overwrite", False, "Replace files already in --out.")
    flags.DEFINE_bool("resume", False, "Keep the outputs already in --out and predict the other files only.")
    flags.DEFINE_integer("seed", None, "A train.num_seeds > 1 run: the replica (its seed) that predicts.")
    flags.DEFINE_string("shard", "0/1", "i/N: segment files i, i+N, ... of the sorted folder (N processes).")
    configuration.run_program(main, default_config)
