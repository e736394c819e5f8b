"""Property-based tests (hypothesis): metric invariants and loader behaviour on random input."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from segjax import metrics
from segjax.data import png, sources
from segjax.errors import DataError
from tests.conftest import load_config

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def label_maps(draw):
    num_classes = draw(st.integers(2, 6))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7))
    elems = st.integers(0, num_classes - 1)
    truth = draw(hnp.arrays(np.int32, shape, elements=elems))
    pred = draw(hnp.arrays(np.int32, shape, elements=elems))
    valid = draw(hnp.arrays(bool, shape))
    return num_classes, truth, pred, valid


@SETTINGS
@given(label_maps(), st.sampled_from(["nan", "one", "zero"]))
def test_metric_bounds_and_dice_iou_identity(case, empty):
    num_classes, truth, pred, valid = case
    out = metrics.summarize(metrics.confusion_matrix(truth, pred, num_classes, valid), empty=empty)
    iou, dice = np.asarray(out["iou"]), np.asarray(out["dice"])
    defined = ~np.isnan(iou)
    assert np.all((iou[defined] >= 0) & (iou[defined] <= dice[defined] + 1e-7) & (dice[defined] <= 1 + 1e-7))
    np.testing.assert_allclose(dice[defined], (2 * iou / (1 + iou))[defined], rtol=1e-5, atol=1e-7)
    for key in ("precision", "recall", "specificity"):
        v = np.asarray(out[key])
        assert np.all((v[~np.isnan(v)] >= 0) & (v[~np.isnan(v)] <= 1))


@SETTINGS
@given(label_maps(), st.integers(1, 5))
def test_padding_with_invalid_pixels_changes_nothing(case, pad):
    num_classes, truth, pred, valid = case
    cm = metrics.confusion_matrix(truth, pred, num_classes, valid)
    widths = [(0, pad)] + [(0, 0)] * (truth.ndim - 1)
    padded = metrics.confusion_matrix(
        np.pad(truth, widths),
        np.pad(pred, widths, constant_values=num_classes - 1),
        num_classes,
        np.pad(valid, widths, constant_values=False),
    )
    np.testing.assert_array_equal(np.asarray(cm), np.asarray(padded))
    per_image = metrics.per_image_confusion(truth[None], pred[None], num_classes, valid[None])
    np.testing.assert_array_equal(np.asarray(per_image[0]), np.asarray(cm))


@SETTINGS
@given(label_maps())
def test_dice_equals_two_iou_over_one_plus_iou_per_image(case):
    num_classes, truth, pred, valid = case
    if truth.ndim < 2:
        return
    out = metrics.summarize(metrics.per_image_confusion(truth, pred, num_classes, valid), "per_image")
    cms = np.asarray(metrics.per_image_confusion(truth, pred, num_classes, valid))
    for cm in cms:
        s = metrics.summarize(cm)
        iou, dice = np.asarray(s["iou"]), np.asarray(s["dice"])
        ok = ~np.isnan(iou)
        np.testing.assert_allclose(dice[ok], 2 * iou[ok] / (1 + iou[ok]), rtol=1e-5, atol=1e-7)
    assert np.isnan(out["miou"]) or 0 <= float(out["miou"]) <= 1


@SETTINGS
@given(
    st.integers(1, 9),
    st.integers(1, 9),
    st.sampled_from([1, 3]),
    st.integers(0, 300),
    st.booleans(),
    st.binary(max_size=64),
)
def test_loader_accepts_valid_files_and_rejects_invalid_ones_with_data_error(h, w, channels, max_label, corrupt, junk):
    cfg = load_config("default").data
    rng = np.random.default_rng(h * 100 + w)
    image = rng.integers(0, 256, (h, w, channels) if channels == 3 else (h, w), dtype=np.uint8)
    label = rng.integers(0, max_label + 1, (h, w)).astype(np.uint8 if max_label < 256 else np.uint16)
    image_bytes, label_bytes = png.encode(image), png.encode(label)
    if corrupt:
        image_bytes = image_bytes[: len(image_bytes) // 2] + junk
    try:
        decoded_image = png.decode(image_bytes, "images/x.png")
        decoded_label = png.decode(label_bytes, "masks/x.png").astype(np.int32)
        sources.check_example(decoded_image, decoded_label, cfg, "x.png")
    except DataError as err:
        assert "x.png" in str(err)
        expected_bad = corrupt or channels != cfg.channels or label.max() >= cfg.num_classes
        assert expected_bad, str(err)
    else:
        assert not corrupt, "a truncated PNG must not load"
        assert channels == cfg.channels and label.max() < cfg.num_classes
        np.testing.assert_array_equal(decoded_label, label)
