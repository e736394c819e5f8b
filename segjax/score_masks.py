"""Score mask files written by any tool (another framework's predictions, a second annotator, a
`segjax.predict` run) against a dataset split, with exactly the metrics and conventions a segjax
run reports: so nnU-Net's or MONAI's masks and a segjax network compare number for number.

    python -m segjax.score_masks --config=configs/isbi.py --masks=runs/other/masks \
        --out=runs/other/scores.json [--split=validation|test] [--overwrite]

Each image of the split (named by its file, as `segjax.predict` names its masks) pairs with the
mask file of the same stem in `--masks`: class ids 0..C-1 at the label's own size, stored
losslessly (PNG, TIFF; `.npy` files are skipped), or for NIfTI datasets `.nii` / `.nii.gz` volumes
on the image's grid, as nnU-Net and `segjax.predict` write them. With `--instances`,
`<name>_instances.png` (uint16 instance ids, 0 = none, as `segjax.predict` writes them) is scored
too, with panoptic quality against the dataset's instance maps (`val/pq`, `val/sq`, `val/rq`,
`val/pq/<class>`; thing classes: `instances.thing_classes`). A missing, lossy, colour, mis-sized
or out-of-range mask is an error naming the file. Writes `--out` (`val/...` keys, `test/...` for the
test split, the conventions, the masks folder) and `<out>_per_image.csv`; an existing `--out` is
kept unless `--overwrite`.
"""

from __future__ import annotations

import os

import ml_collections
import numpy as np
from absl import app, flags, logging

from segjax import configuration, evaluate, instances, metrics, report, scored_splits, surface, writers
from segjax.data import class_file, folder, mask_codes, nifti, pipeline, png, sources
from segjax.errors import ConfigError, DataError, WorkdirError, exit_on_user_error

SKIPPED_EXTENSIONS = (".npy",)  # segjax.predict's probabilities beside its masks
INSTANCES = "_instances"  # <name>_instances.png: an image's instance map


def mask_files(directory: str, kind: str = "masks") -> dict[str, str]:
    """{image name: path} of the class-id masks (`kind='masks'`) or of the `<name>_instances.*`
    maps (`kind='instances'`) in `directory` (hidden files, subfolders and .npy files left out);
    two files of one image are an error."""
    if not os.path.isdir(directory):
        raise DataError(f"--masks={directory} is not a folder")
    out = {}
    for name in sorted(os.listdir(directory)):
        path, stem = os.path.join(directory, name), folder.stem(name)
        if name.startswith(".") or not os.path.isfile(path) or name.lower().endswith(SKIPPED_EXTENSIONS):
            continue
        if stem.endswith(INSTANCES) != (kind == "instances"):
            continue
        stem = stem[: -len(INSTANCES)] if kind == "instances" else stem
        if stem in out:
            raise DataError(f"{path} and {out[stem]} are files of one image; keep one of them")
        out[stem] = path
    return out


def read_mask(path: str, shape: tuple[int, ...], num_classes: int | None, resize: int) -> np.ndarray:
    """The class ids of the mask file at `path` (int32), checked against the label's `shape` and
    the classes (`num_classes` None: an instance map, uint16 ids or colour-coded); DataError naming
    the file otherwise."""
    if path.endswith((".nii", ".nii.gz")):  # [D, H, W], as the dataset stores labels
        mask = nifti.read_label(path)[0].astype(np.int64)
    else:
        with open(path, "rb") as f:
            mask = png.decode(f.read(), path, ids=True)
    if num_classes is None:
        mask = mask_codes.instance_ids(mask, path)
    if mask.ndim != len(shape):
        raise DataError(
            f"{path}: a mask of shape {mask.shape} for a label of shape {shape}; write one class id per pixel"
        )
    if mask.shape != shape:
        hint = f" (data.resize={resize} resized the labels: score with --config.data.resize=0)" if resize else ""
        size = "x".join(map(str, mask.shape))
        raise DataError(f"{path}: {size}, but its label is {'x'.join(map(str, shape))}{hint}")
    outside = (mask < 0) | (mask >= num_classes) if num_classes is not None else np.zeros(mask.shape, bool)
    if outside.any():
        values = np.unique(mask[outside])[:5].tolist()
        raise DataError(f"{path}: holds {values}, outside the class ids 0..{num_classes - 1}")
    return mask.astype(np.int32)


def score(
    config: ml_collections.ConfigDict,
    masks: str,
    out: str,
    split: str = "validation",
    overwrite: bool = False,
    with_instances: bool = False,
) -> dict:
    """Score the mask files in `masks` against `split` of `config`'s dataset (`with_instances`:
    their instance maps too, with PQ); write `out` and its per-image CSV; return the results."""
    class_file.apply(config)
    configuration.validate(config)
    prefix, _ = scored_splits.split_naming(split)
    if config.model.spatial_dims == 3 and config.data.name != "nifti":
        raise ConfigError("segjax.score_masks reads 3D masks as NIfTI files (data.name='nifti')")
    if with_instances and config.model.spatial_dims != 2:
        raise ConfigError("--instances scores 2D instance maps")
    if os.path.isdir(out) or not out.endswith(".json"):
        raise ConfigError(f"--out={out}: give the path of a .json file to write")
    if os.path.exists(out) and not overwrite:
        raise WorkdirError(f"{out} exists; use another --out or --overwrite to replace it")
    files = mask_files(masks)
    instance_files = mask_files(masks, "instances") if with_instances else None
    source = sources.open_splits(config.data, with_instances=with_instances, splits=(split,))[split]
    if with_instances and len(source) and "instances" not in source[0]:
        raise DataError(f"{config.data.name} has no instance maps to score --instances against (an instances/ folder)")
    names = [str(source[i].get("name", i)) for i in range(len(source))]
    for what, found in (("mask", files), ("instance map", instance_files)):
        missing = [n for n in names if found is not None and n not in found]
        if missing:
            raise DataError(
                f"{masks} has no {what} for {len(missing)} of the {len(names)} {split} images, e.g. {missing[:3]}"
            )
    others = sorted(set(files) - set(names))
    if others:
        logging.warning(
            "score_masks: %d files in %s are no %s image's (e.g. %s): not scored", len(others), masks, split, others[0]
        )
    num_classes = config.data.num_classes
    panoptic = metrics.PanopticAccumulator(num_classes) if with_instances else None

    def maps():  # each file read once; with --instances its panoptic counts are added on the way
        for i, name in enumerate(names):
            ex = source[i]
            label, valid = pipeline.label_and_valid(ex["label"], config.data.ignore_label)
            pred = read_mask(files[name], label.shape, num_classes, config.data.resize)
            if panoptic is not None:  # ignored pixels void
                ids = read_mask(instance_files[name], label.shape, None, config.data.resize)
                instances.add_image(panoptic, config, label, ex["instances"], pred, ids, void=valid == 0)
            found = {"name": name, "label": label, "pred": pred, "valid": valid}
            yield {**found, "spacing": ex["spacing"]} if "spacing" in ex else found

    class_names = tuple(config.data.class_names)
    table = os.path.splitext(out)[0] + "_per_image.csv"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    results = evaluate.score_maps(maps(), config, class_names, table)
    if panoptic is not None:  # val/pq, sq, rq, pq/<class>: as evaluation names them
        results.update(instances.panoptic_scores([{"panoptic": panoptic}], config))
    results = scored_splits.split_keys(results, prefix)
    results.update(split=split, masks=os.path.abspath(masks), metrics_convention=evaluate.convention(config))
    writers.write_summary(out, results)
    print(f"\n{masks} on {config.data.name}/{split} ({results['metrics_convention']}):")
    print(report.results_table(results, class_names, prefix=prefix, distance_unit=surface.unit(config)))
    return results


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    f = flags.FLAGS
    with exit_on_user_error():
        score(f.config, f.masks, f.out, f.split, f.overwrite, f.instances)


if __name__ == "__main__":
    from ml_collections import config_flags

    default_config = "configs/default.py"
    config_flags.DEFINE_config_file("config", default_config, "The dataset's config (data.*, eval.* conventions).")
    flags.DEFINE_string("masks", None, "Folder of mask files, one per image of the split (<name>.png).", required=True)
    flags.DEFINE_string("out", None, "The .json file the scores go to (and <out>_per_image.csv).", required=True)
    flags.DEFINE_enum("split", "validation", ["validation", "test"], "The split the masks are of.")
    flags.DEFINE_bool("overwrite", False, "Replace an existing --out.")
    flags.DEFINE_bool("instances", False, "Also score <name>_instances.png with panoptic quality.")
    configuration.run_program(main, default_config)
