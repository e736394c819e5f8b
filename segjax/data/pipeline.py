"""grain pipelines: an endless, shuffled, augmented training stream and padded eval batches.

Host batches are numpy dicts: `image` float32 [B,H,W,C] in 0..1, `label` int32 [B,H,W] (ignored
pixels set to 0) and `valid` float32 [B,H,W] (1 = counts in loss/metrics; 0 = ignore label or a
padding example). The training stream is a grain MapDataset, so batch k is a pure function of
(seed, k); its iterator state goes into each checkpoint for exact resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import grain
import ml_collections
import numpy as np

from segjax.data import augment
from segjax.errors import DataError

HOST_ONLY = "gt_"  # batch keys with this prefix stay on the host (truth for host-side metrics such as PQ)


def label_and_valid(label: np.ndarray, ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
    """(int32 label with the ignored pixels set to 0, float32 valid mask: 0 where `ignore_label`)."""
    label = np.asarray(label).astype(np.int32)
    valid = np.ones(label.shape, np.float32) if ignore_label < 0 else (label != ignore_label).astype(np.float32)
    return np.where(valid > 0, label, 0).astype(np.int32), valid


def to_model_batch(batch: dict[str, np.ndarray], ignore_label: int) -> dict[str, np.ndarray]:
    """Images (uint8, or float in 0..1 after augmentation) and raw labels -> float images,
    in-range labels and a valid mask (ignore label, padding pixels, padding examples -> 0)."""
    label, valid = label_and_valid(batch["label"], ignore_label)
    if "example_valid" in batch:
        valid *= batch["example_valid"].reshape((-1,) + (1,) * (label.ndim - 1)).astype(np.float32)
    if "pixel_valid" in batch:
        valid *= batch["pixel_valid"].astype(np.float32)
    image = batch["image"]
    out = {
        "image": image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else image.astype(np.float32),
        "label": np.where(valid > 0, label, 0).astype(np.int32),
        "valid": valid,
    }
    out.update({k: v for k, v in batch.items() if k.startswith(HOST_ONLY)})
    return out


def train_dataset(
    source,
    cfg: ml_collections.ConfigDict,
    host_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    targets: Callable[[dict], dict] | None = None,
) -> grain.MapDataset:
    """This host's rows of each global batch of the shuffled (anew each epoch), augmented stream.

    The global stream (shuffle order and augmentation keyed on the global element index) is the
    same for any number of hosts; host p takes rows [p*b, (p+1)*b) of every global batch of
    b*process_count examples, so 1 and N processes train on identical global batches.
    `targets` rewrites each example's label before augmentation (instance boundaries); with the
    split held in memory (`data.cache`) each label is rewritten once, not once per epoch.
    """
    if targets is not None and cfg.cache:
        elements = grain.MapDataset.source([targets(source[i]) for i in range(len(source))])
    else:
        elements = grain.MapDataset.source(source).map(targets or _image_and_label)
    elements = elements.shuffle(seed=seed).repeat()
    elements = elements.random_map(lambda ex, rng: augment.augment(ex, rng, cfg.augment), seed=seed + 1)
    global_batch = host_batch_size * process_count
    offset = process_index * host_batch_size

    def pick(j: int):
        return elements[(j // host_batch_size) * global_batch + offset + j % host_batch_size]

    ds = grain.MapDataset.range(0, len(elements) // process_count).map(pick)
    ds = ds.batch(host_batch_size, drop_remainder=True, batch_fn=_stack)
    return ds.map(lambda b: to_model_batch(b, cfg.ignore_label))


def _stack(examples) -> dict[str, np.ndarray]:
    """One training batch. Examples of different sizes (a folder of mixed sizes trained without
    crops) are a DataError that says what to set, not grain's "same structure" traceback."""
    sizes = sorted({e["label"].shape for e in examples})
    if len(sizes) > 1:
        shown = ", ".join("x".join(map(str, s)) for s in sizes)
        raise DataError(
            f"training examples of different sizes in one batch ({shown}): train on random crops "
            "(data.augment.crop=N) or resize every image (data.resize=N)"
        )
    return {key: np.stack([e[key] for e in examples]) for key in examples[0]}


def _image_and_label(example: dict) -> dict:
    return {"image": example["image"], "label": example["label"]}


def train_iterator(ds: grain.MapDataset, cfg: ml_collections.ConfigDict) -> grain.DatasetIterator:
    """Background threads prefetch `data.prefetch` batches so the step rarely waits for data."""
    options = grain.ReadOptions(num_threads=cfg.num_threads, prefetch_buffer_size=cfg.prefetch)
    return iter(ds.to_iter_dataset(options))


def padded_size(spatial, multiple: int) -> tuple[int, ...]:
    """Each spatial size rounded up to a multiple of `multiple` (2**depth): what evaluation pads to."""
    return tuple(-(-int(s) // multiple) * multiple for s in spatial)


def _pad_to(array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    widths = [(0, t - s) for s, t in zip(array.shape, shape, strict=False)]
    widths += [(0, 0)] * (array.ndim - len(widths))
    return np.pad(array, widths)


def eval_batches(
    source,
    cfg: ml_collections.ConfigDict,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    pad_multiple: int = 1,
    targets: Callable[[dict], dict] | None = None,
    with_names: bool = False,
    agree: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Every example of this host's slice exactly once, at full size. Images are zero-padded to
    the batch's largest size rounded up to `pad_multiple` (2**depth) and the last batch is filled
    with copies; padded pixels and copies have valid = 0, so every real pixel counts once. All
    hosts yield the same number of batches; with images of mixed sizes, `agree` (multi-host:
    `parallel.largest_over_hosts`) turns this host's padded size into the one every host pads
    its batch to, so the hosts' batches form one global batch.
    With `targets` (instance boundaries) the labels are rewritten and the original labels,
    instance maps and valid masks ride along as host-only `gt_label`, `gt_instances`, `gt_valid`.
    Examples that carry a voxel `spacing` (NIfTI) give host-only `gt_spacing` [B, 3].
    `with_names` adds host-only `gt_name`: each example's stored name (its split index when it has
    none; '' for the copies), for per-image results."""
    ds = grain.MapDataset.source(source)[process_index::process_count]
    per_host = -(-len(source) // process_count)  # every host runs the same number of batches
    for start in range(0, per_host, batch_size):
        examples = [ds[i] for i in range(start, min(start + batch_size, len(ds)))]
        real = len(examples)
        examples += [examples[-1] if examples else source[0]] * (batch_size - real)
        spatial = tuple(np.max([e["label"].shape for e in examples], axis=0))
        target = padded_size(spatial, pad_multiple)
        target = agree(target) if agree else target
        batch = {
            "image": np.stack([_pad_to(e["image"], target) for e in examples]),
            "label": np.stack([_pad_to((targets(e) if targets else e)["label"], target) for e in examples]),
            "pixel_valid": np.stack([_pad_to(np.ones(e["label"].shape, bool), target) for e in examples]),
            "example_valid": np.arange(batch_size) < real,
        }
        if targets:
            batch["gt_label"] = np.stack([_pad_to(e["label"], target) for e in examples])
            batch["gt_instances"] = np.stack([_pad_to(e["instances"], target) for e in examples])
        if "spacing" in examples[0]:  # voxel sizes (NIfTI), for surface distances in mm
            batch["gt_spacing"] = np.stack([e["spacing"] for e in examples])
        if with_names:
            indices = range(process_index, len(source), process_count)[start : start + real]
            names = [example_name(e, i) for e, i in zip(examples[:real], indices, strict=True)]
            batch["gt_name"] = np.array(names + [""] * (batch_size - real))
        batch = to_model_batch(batch, cfg.ignore_label)
        if targets:
            batch["gt_valid"] = batch["valid"] > 0
        yield batch


def example_name(example: dict, index: int) -> str:
    """What per-image results call an example: its stored file name (decoded sources carry one for
    folder and NIfTI data), else its index in the split."""
    return str(example.get("name", index))


def eval_order(num_examples: int, host_batch_size: int, process_count: int = 1) -> list[int | None]:
    """The split index of each row of the evaluation outputs gathered from every host (each global
    batch holds the hosts' `eval_batches` batches in process order); None for the padding copies."""
    per_host = -(-num_examples // process_count)
    order: list[int | None] = []
    for start in range(0, per_host, host_batch_size):
        for p in range(process_count):
            rows = list(range(p, num_examples, process_count)[start : start + host_batch_size])
            order += rows + [None] * (host_batch_size - len(rows))
    return order


def one_ahead(batches: Iterable, dispatch: Callable) -> Iterator:
    """`dispatch(batch)` for each batch, each result yielded only after the next batch has been
    dispatched. JAX runs dispatched work asynchronously, so a consumer that reads a result back
    and works on it on the host (scores, masks written to disk) overlaps the device's work on the
    next batch; one batch is in flight at a time."""
    pending = []
    for batch in batches:
        pending.append(dispatch(batch))
        if len(pending) == 2:
            yield pending.pop(0)
    yield from pending
