"""Synthetic scenes, the TFDS builder, decoding/validation, augmentation and batching."""

from __future__ import annotations

import os

import numpy as np
import pytest
from scipy import ndimage

from segjax.data import augment, pipeline, png, sources, synthetic
from segjax.errors import ConfigError, DataError

PARAMS = synthetic.SceneParams(image_size=48)


def test_scenes_are_deterministic_per_seed_split_index():
    a = synthetic.render_scene(3, "train", 5, PARAMS)
    b = synthetic.render_scene(3, "train", 5, PARAMS)
    for key in a:
        assert a[key].tobytes() == b[key].tobytes()
    assert synthetic.render_scene(4, "train", 5, PARAMS)["image"].tobytes() != a["image"].tobytes()
    assert synthetic.render_scene(3, "validation", 5, PARAMS)["image"].tobytes() != a["image"].tobytes()


def test_scene_labels_instances_and_presence_are_consistent():
    n = len(synthetic.CLASS_NAMES)
    for index in range(20):
        ex = synthetic.render_scene(0, "train", index, PARAMS)
        label, inst = ex["label"], ex["instances"]
        assert ex["image"].shape == (48, 48, 3) and ex["image"].dtype == np.uint8
        assert label.min() >= 0 and label.max() < n
        assert inst.dtype == np.uint16
        ids = np.unique(inst[inst > 0])
        np.testing.assert_array_equal(ids, np.arange(1, len(ids) + 1))  # consecutive, all visible
        assert np.array_equal(inst > 0, label > 0)  # every object pixel belongs to one instance
        for i in ids:  # one class per instance
            assert len(np.unique(label[inst == i])) == 1
        np.testing.assert_array_equal(ex["present"], np.bincount(label.ravel(), minlength=n) > 0)


def test_tool_parts_cannot_be_grouped_by_one_threshold():
    """Handle (dark) and blade (bright) of a tool differ strongly in brightness."""
    gaps = []
    for index in range(40):
        ex = synthetic.render_scene(0, "train", index, synthetic.SceneParams(image_size=64, noise=0.0))
        for i in np.unique(ex["instances"][ex["label"] == 1]):
            brightness = ex["image"][ex["instances"] == i].mean(-1)
            if brightness.size > 30:
                gaps.append(np.percentile(brightness, 90) - np.percentile(brightness, 10))
    assert gaps and np.median(gaps) > 100


def test_noise_and_contrast_knobs():
    quiet = synthetic.render_scene(0, "train", 1, synthetic.SceneParams(image_size=32, noise=0.0))
    noisy = synthetic.render_scene(0, "train", 1, synthetic.SceneParams(image_size=32, noise=0.2))
    assert np.abs(quiet["image"].astype(int) - noisy["image"]).mean() > 10
    flat = synthetic.render_scene(0, "train", 1, synthetic.SceneParams(image_size=32, noise=0.0, contrast=0.0))
    np.testing.assert_array_equal(flat["label"], quiet["label"])
    obj = flat["label"] > 0
    # with contrast 0 objects take the mean background colour
    assert np.abs(flat["image"][obj].astype(float).mean(0) - flat["image"][~obj].mean(0)).max() < 25


def test_builder_round_trip(tiny_config):
    splits = sources.open_splits(tiny_config.data)
    syn = tiny_config.data.synthetic
    assert len(splits["train"]) == syn.num_train and len(splits["validation"]) == syn.num_val
    params = synthetic.SceneParams(syn.image_size, syn.noise, syn.contrast, syn.min_objects, syn.max_objects)
    ref = synthetic.render_scene(syn.seed, "validation", 3, params)
    ex = splits["validation"][3]
    np.testing.assert_array_equal(ex["image"], ref["image"])
    np.testing.assert_array_equal(ex["label"], ref["label"])


@pytest.mark.parametrize("dims", [2, 3])
def test_a_copy_prepared_by_an_older_generator_is_refused(tiny_config, tmp_path, monkeypatch, dims):
    """The prepared name hashes the knobs, not the generator's code: after a change to the
    generator (VERSION not bumped) the earlier copy would be read silently; it is an error."""
    from segjax.data import synthetic3d

    cfg = tiny_config.data
    cfg.tfds_dir = str(tmp_path)
    module, render = synthetic, "render_scene"
    if dims == 3:
        cfg.name, cfg.num_classes, cfg.channels, cfg.class_names = "synthetic_volumes", 3, 1, synthetic3d.CLASS_NAMES
        cfg.synthetic3d.size, cfg.synthetic3d.num_train, cfg.synthetic3d.num_val = 16, 2, 1
        module, render = synthetic3d, "render_volume"
    sources.prepare(cfg)  # prepared and checked
    sources.prepare(cfg)  # read again by the same generator: fine
    original = getattr(module, render)

    def changed(seed, split, index, params):  # a generator whose scenes differ in one pixel
        ex = original(seed, split, index, params)
        ex["label"] = ex["label"].copy()
        ex["label"].flat[0] = (ex["label"].flat[0] + 1) % 2
        return ex

    monkeypatch.setattr(module, render, changed)
    name = "SyntheticShapes" if dims == 2 else "SyntheticVolumes"
    with pytest.raises(DataError, match=rf"renders now \(train example 0, 'label'\): .*bump {name}.VERSION"):
        sources.prepare(cfg)


def test_a_cache_larger_than_memory_is_refused_before_decoding(tiny_config, monkeypatch):
    """data.cache=True on a folder too large for memory decoded for minutes and was then killed by
    the OOM killer without a word; the splits' decoded size is now estimated from a few examples
    and refused up front when it exceeds data.cache_memory_fraction of the available memory."""
    tiny_config.data.cache = False
    splits = sources.open_splits(tiny_config.data)
    exact = sum(np.asarray(v).nbytes for s in splits.values() for i in range(len(s)) for v in s[i].values())
    assert sources.check_cache_fits(splits, 1.0)[0] == exact  # one image size: the estimate is exact
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < sources.available_memory() <= total
    read, decode = [], sources.DecodedSource.__getitem__

    def counted(self, index):
        read.append(index)
        return decode(self, index)

    monkeypatch.setattr(sources.DecodedSource, "__getitem__", counted)
    monkeypatch.setattr(sources, "available_memory", lambda: exact)  # a host with just that much free
    tiny_config.data.cache = True
    with pytest.raises(ConfigError, match=r"would hold about 0\.0 GiB .* more than data.cache_memory_fraction=0.5"):
        sources.open_splits(tiny_config.data)
    sampled = sum(min(len(s), sources.CACHE_SAMPLE) for s in splits.values())
    assert len(read) == sampled < sum(map(len, splits.values()))  # refused after a sample, not after all
    tiny_config.data.cache_memory_fraction = 1.0  # just fits
    read.clear()
    cached = sources.open_splits(tiny_config.data)
    assert sorted(read) == sorted(i for s in splits.values() for i in range(len(s)))  # each decoded once
    for split, source in splits.items():
        np.testing.assert_array_equal(cached[split][len(source) - 1]["label"], source[len(source) - 1]["label"])


def test_uncached_source_decodes_the_same(tiny_config):
    cached = sources.open_splits(tiny_config.data)["train"]
    tiny_config.data.cache = False
    raw = sources.open_splits(tiny_config.data)["train"]
    np.testing.assert_array_equal(cached[2]["label"], raw[2]["label"])


def test_unknown_dataset_name(tiny_config):
    tiny_config.data.name = "imagenet_seg"
    with pytest.raises(ConfigError, match="valid datasets"):
        sources.open_splits(tiny_config.data)


@pytest.mark.parametrize(
    ("image", "label", "pattern"),
    [
        (np.zeros((4, 4, 3), np.uint8), np.array([[0, 255]] * 8).reshape(4, 4), "0/255 mask"),
        (np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.int32), "1 channels but data.channels=3"),
        (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 4), np.int32), "differs from label size"),
    ],
)
def test_check_example_errors(tiny_config, image, label, pattern):
    with pytest.raises(DataError, match=pattern) as err:
        sources.check_example(image, label, tiny_config.data, "masks/007.png")
    assert "masks/007.png" in str(err.value)


def test_ignore_label_is_allowed(tiny_config):
    tiny_config.data.ignore_label = 255
    sources.check_example(np.zeros((2, 2, 3), np.uint8), np.array([[0, 255], [1, 3]]), tiny_config.data, "x")


def test_ignore_label_inside_the_class_range_is_refused_before_data(tiny_config, tmp_path):
    """ignore_label=0 with 4 classes: class 0 would be an output and in mIoU, never trained."""
    from segjax import baselines, preflight

    for ignore in (-1, 4, 255):
        tiny_config.data.ignore_label = ignore
        preflight.check(tiny_config)
    for ignore in (0, 3):
        tiny_config.data.ignore_label = ignore
        with pytest.raises(ConfigError, match=rf"data.ignore_label={ignore} is one of the classes 0..3"):
            preflight.check(tiny_config)
        with pytest.raises(ConfigError, match="is one of the classes"):
            baselines.run(tiny_config, str(tmp_path / "baseline"))
    assert not os.path.exists(tmp_path / "baseline")


def test_repeated_class_names_are_refused_before_data(tiny_config, tmp_path):
    """Two classes named 'thing' wrote one val/iou/thing key for both: one class's scores lost."""
    tiny_config.data.class_names = ("background", "thing", "thing", "leaf")
    tiny_config.data.tfds_dir = str(tmp_path / "tfds")
    with pytest.raises(ConfigError, match=r"data.class_names repeats \['thing'\]"):
        sources.open_splits(tiny_config.data)
    assert not os.path.exists(tmp_path / "tfds")


def test_png_round_trip_and_corrupt_bytes():
    inst = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    np.testing.assert_array_equal(png.decode(png.encode(inst), "x"), inst)
    rgb = np.random.default_rng(0).integers(0, 255, (5, 6, 3), dtype=np.uint8)
    data = png.encode(rgb)
    np.testing.assert_array_equal(png.decode(data, "x"), rgb)
    with pytest.raises(DataError, match=r"images/003\.png: corrupt or truncated"):
        png.decode(data[: len(data) // 2], "images/003.png")


def test_augment_is_deterministic_and_keeps_alignment(tiny_config):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    label = (image[..., 0] > 128).astype(np.int32)  # a label drawn from the image
    ex = {"image": image, "label": label}
    seen = set()
    for seed in range(16):
        a = augment.augment(ex, np.random.default_rng(seed), tiny_config.data.augment)
        b = augment.augment(ex, np.random.default_rng(seed), tiny_config.data.augment)
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], (np.round(a["image"][..., 0] * 255) > 128).astype(np.int32))
        seen.add(a["image"].tobytes())
    assert len(seen) > 4  # flips x rot90 give up to 8 distinct results


def test_cubic_warp_keeps_fine_detail_that_linear_blurs(tiny_config):
    """A band-limited pattern (period 4 px) warped by rotation + scale: cubic-spline interpolation
    keeps its contrast, linear interpolation at sub-pixel positions averages neighbours and loses
    a good part of it; the label (nearest neighbour) is the same either way."""
    yy, xx = np.mgrid[0:96, 0:96]
    image = (0.5 + 0.4 * np.sin(2 * np.pi * (yy + xx) / 8) * np.sin(2 * np.pi * (yy - xx) / 8))[..., None]
    ex = {"image": image.astype(np.float32), "label": (yy // 8 % 2).astype(np.int32)}
    cfg = tiny_config.data.augment
    cfg.crop, cfg.rotate, cfg.scale_min, cfg.scale_max = 48, 20.0, 0.95, 1.05
    cfg.flip, cfg.rot90 = False, False
    contrast = {}
    for order in (1, 3):
        cfg.image_order = order
        outs = [augment.augment(ex, np.random.default_rng(s), cfg) for s in range(8)]
        contrast[order] = np.mean([o["image"].std() for o in outs]) / image.std()
        labels = [o["label"] for o in outs]
        if order == 1:
            linear_labels = labels
    for a, b in zip(linear_labels, labels, strict=True):
        np.testing.assert_array_equal(a, b)
    assert contrast[3] > 0.97, contrast
    assert contrast[1] < 0.9, contrast
    cfg.image_order = 2
    with pytest.raises(ConfigError, match=r"data\.augment\.image_order=2"):
        augment.check(cfg)


@pytest.mark.parametrize("spatial", [2, 3])
def test_blur_is_a_gaussian_of_the_image_alone_with_its_probability(tiny_config, spatial):
    """With blur_prob=1 and a fixed sigma the image is scipy's Gaussian of the unblurred result
    (same seed: the blur draws after every geometric op), over the spatial axes only (channels are
    not mixed); the label is untouched. A probability p blurs about p of the examples; p=0 and
    bad settings as documented."""
    rng = np.random.default_rng(0)
    shape = (12, 10, 2) if spatial == 2 else (6, 8, 8, 2)
    image = rng.integers(0, 255, shape, dtype=np.uint8)
    ex = {"image": image, "label": (image[..., 0] > 128).astype(np.int32)}
    cfg = tiny_config.data.augment
    cfg.blur_prob, cfg.blur_sigma = 1.0, (0.8, 0.8)
    for seed in range(4):
        blurred = augment.augment(ex, np.random.default_rng(seed), cfg)
        cfg.blur_prob = 0.0
        plain = augment.augment(ex, np.random.default_rng(seed), cfg)
        cfg.blur_prob = 1.0
        np.testing.assert_array_equal(blurred["label"], plain["label"])
        for k in range(2):  # each channel on its own: a 1-channel Gaussian of that channel
            np.testing.assert_allclose(
                blurred["image"][..., k], ndimage.gaussian_filter(plain["image"][..., k], 0.8), atol=1e-6
            )
        assert blurred["image"].std() < 0.8 * plain["image"].std()  # noise-like content loses contrast
    cfg.blur_prob, cfg.blur_sigma = 0.3, (0.5, 1.0)
    cfg.flip, cfg.rot90 = False, False  # only the blur changes the image
    changed = [
        not np.array_equal(augment.augment(ex, np.random.default_rng(s), cfg)["image"], image / np.float32(255))
        for s in range(400)
    ]
    assert 0.22 < np.mean(changed) < 0.38  # binomial(400, 0.3): std 0.023
    for key, value, message in (
        ("blur_sigma", (1.0, 0.5), r"blur_sigma=\(1\.0, 0\.5\); give \(min, max\)"),
        ("blur_sigma", (1.0,), r"blur_sigma=\(1\.0,\); give two numbers"),
        ("blur_prob", 1.5, r"blur_prob=1\.5; a probability"),
    ):
        bad = tiny_config.data.augment.copy_and_resolve_references()
        bad[key] = value
        with pytest.raises(ConfigError, match=message):
            augment.check(bad)


def test_left_right_flips_only_when_vflip_is_off(tiny_config):
    """vflip=False, rot90=False: every result is the image or its left-right mirror (upright
    content stays upright); with vflip on, up-down mirrors appear as well."""
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    ex = {"image": image, "label": image[..., 0].astype(np.int32)}
    cfg = tiny_config.data.augment
    cfg.rot90, cfg.vflip = False, False
    allowed = {image.tobytes(), image[:, ::-1].tobytes()}
    seen = {
        np.round(augment.augment(ex, np.random.default_rng(s), cfg)["image"] * 255).astype(np.uint8).tobytes()
        for s in range(32)
    }
    assert seen == allowed
    cfg.vflip = True
    seen = {
        np.round(augment.augment(ex, np.random.default_rng(s), cfg)["image"] * 255).astype(np.uint8).tobytes()
        for s in range(32)
    }
    assert image[::-1].tobytes() in seen and len(seen) == 4


def test_eval_batches_cover_every_example_once(tiny_config):
    source = [{"image": np.full((2, 2, 3), i, np.uint8), "label": np.full((2, 2), i % 4, np.int32)} for i in range(7)]
    batches = list(pipeline.eval_batches(source, tiny_config.data, batch_size=3))
    assert len(batches) == 3
    valid = np.concatenate([b["valid"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    assert valid.shape == (9, 2, 2)
    assert valid[:7].min() == 1 and valid[7:].max() == 0  # padding excluded
    np.testing.assert_allclose(images[:7, 0, 0, 0] * 255, np.arange(7))


def test_train_stream_is_a_pure_function_of_seed_and_step(tiny_config):
    source = sources.open_splits(tiny_config.data)["train"]
    a = pipeline.train_dataset(source, tiny_config.data, 4, seed=0)
    b = pipeline.train_dataset(source, tiny_config.data, 4, seed=0)
    c = pipeline.train_dataset(source, tiny_config.data, 4, seed=1)
    np.testing.assert_array_equal(a[5]["image"], b[5]["image"])
    assert not np.array_equal(a[5]["image"], c[5]["image"])
    assert a[0]["image"].shape == (4, 32, 32, 3) and a[0]["image"].dtype == np.float32
    # an iterator restored from a saved state continues with the same batches
    it = pipeline.train_iterator(a, tiny_config.data)
    for _ in range(3):
        next(it)
    saved = it.get_state()
    expected = next(it)
    it2 = pipeline.train_iterator(b, tiny_config.data)
    it2.set_state(saved)
    np.testing.assert_array_equal(next(it2)["label"], expected["label"])


def test_synthetic_volumes_round_trip_and_3d_augmentation(tiny_config):
    from segjax.data import synthetic3d

    cfg = tiny_config.data
    cfg.name = "synthetic_volumes"
    cfg.num_classes, cfg.channels = 3, 1
    cfg.class_names = synthetic3d.CLASS_NAMES
    cfg.synthetic3d.size, cfg.synthetic3d.num_train, cfg.synthetic3d.num_val = 16, 4, 2
    splits = sources.open_splits(cfg)
    ex = splits["train"][1]
    ref = synthetic3d.render_volume(0, "train", 1, synthetic3d.VolumeParams(16, cfg.synthetic3d.noise, 2, 5))
    assert ex["image"].shape == (16, 16, 16, 1) and ex["label"].shape == (16, 16, 16)
    np.testing.assert_array_equal(ex["image"], ref["image"])
    np.testing.assert_array_equal(ex["label"], ref["label"])
    assert set(np.unique(ex["label"])) <= {0, 1, 2}
    batch = pipeline.train_dataset(splits["train"], cfg, 2, seed=0)[0]
    assert batch["image"].shape == (2, 16, 16, 16, 1) and batch["label"].shape == (2, 16, 16, 16)
    # alignment in 3D: a label drawn from the volume still matches after augmentation
    vol = np.random.default_rng(0).integers(0, 255, (6, 6, 6, 1), dtype=np.uint8)
    for seed in range(8):
        out = augment.augment(
            {"image": vol, "label": (vol[..., 0] > 128).astype(np.int32)}, np.random.default_rng(seed), cfg.augment
        )
        np.testing.assert_array_equal(out["label"], (np.round(out["image"][..., 0] * 255) > 128).astype(np.int32))


def test_cubic_sampling_on_a_window_equals_the_whole_image():
    """The windowed spline prefilter gives scipy's whole-image cubic interpolation, also where the
    window reaches past the image border (mirrored) and for a one-pixel-wide image."""
    rng = np.random.default_rng(0)
    for shape in [(40, 50, 2), (40, 1, 1)]:
        image = rng.random(shape).astype(np.float32)
        for lo, hi in [((10.3, 12.7), (20.1, 30.9)), ((-7.5, -3.2), (9.9, 60.4)), ((30.2, 41.7), (52.6, 55.0))]:
            yy, xx = np.meshgrid(np.linspace(lo[0], hi[0], 13), np.linspace(lo[1], hi[1], 11), indexing="ij")
            coords = np.stack([yy, xx]).astype(np.float32)
            got = augment._cubic_sample(image, coords)
            for k in range(shape[-1]):
                want = ndimage.map_coordinates(image[..., k], coords, order=3, mode="mirror")
                np.testing.assert_allclose(got[..., k], want, atol=1e-5)


def test_class_histogram_counts_every_cached_image_and_samples_large_uncached_splits():
    """Pixels per class (ignored/out-of-range ids not counted) as numpy counts them: all images of
    a cached split however many, evenly spaced ones (first and last included) of a large one."""
    rng = np.random.default_rng(0)
    labels = [rng.integers(0, 3, (4, 5)) for _ in range(10)]
    labels[3][0, 0] = 255  # an ignore label
    source = [{"label": lab} for lab in labels]

    def by_numpy(chosen):
        flat = np.concatenate([lab.ravel() for lab in chosen])
        return np.bincount(flat[flat < 3], minlength=3)

    hist, counted = sources.class_histogram(source, 3, max_images=3)
    assert counted == 3
    np.testing.assert_array_equal(hist, by_numpy([labels[0], labels[4], labels[9]]))  # linspace(0, 9, 3) rounded
    hist, counted = sources.class_histogram(source, 3)
    assert counted == 10 and hist.sum() == 10 * 20 - 1
    np.testing.assert_array_equal(hist, by_numpy(labels))
    cached = sources.InMemorySource(source)
    hist, counted = sources.class_histogram(cached, 3, max_images=3)
    assert counted == 10
    np.testing.assert_array_equal(hist, by_numpy(labels))


@pytest.mark.parametrize("count", [0, 1, 2, 5])
def test_one_ahead_dispatches_the_next_batch_before_yielding_each_result(count):
    """Each result is handed over only once the following batch is dispatched (the last one when
    the batches run out); every batch once, in order."""
    events = []

    def dispatch(batch):
        events.append(("dispatch", batch))
        return batch * 10

    for result in pipeline.one_ahead(iter(range(count)), dispatch):
        events.append(("consume", result))
    want = [("dispatch", 0)] if count else []
    for k in range(count):
        want += ([("dispatch", k + 1)] if k + 1 < count else []) + [("consume", 10 * k)]
    assert events == want
