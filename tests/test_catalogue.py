"""configs/pets.py (a TFDS catalogue dataset) offline, through `tfds.testing.mock_data`.

The mock stands in for the prepared oxford_iiit_pet files: records carry JPEG image bytes and PNG
trimap bytes, as the real array_record files do, so decoding, the trimap -> class mapping,
resizing and a short training run all go through segjax's real code.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from segjax import train
from segjax.data import sources
from segjax.errors import DataError
from tests.conftest import load_config


def fake_pet_records(count: int, seed: int, bad_value: int | None = None) -> list[dict]:
    rng = np.random.default_rng(seed)
    records = []
    for i in range(count):
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        trimap = np.full((h, w), 2, np.uint8)  # 2 = background
        trimap[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 3  # 3 = border band
        trimap[h // 4 + 3 : 3 * h // 4 - 3, w // 4 + 3 : 3 * w // 4 - 3] = 1  # 1 = pet
        if bad_value is not None:
            trimap[0, 0] = bad_value
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        jpeg, png = io.BytesIO(), io.BytesIO()
        Image.fromarray(image).save(jpeg, format="JPEG")
        Image.fromarray(trimap).save(png, format="PNG")
        records.append({"image": jpeg.getvalue(), "segmentation_mask": png.getvalue(), "file_name": f"pet{i}"})
    return records


def mocked_pets(bad_value=None):
    def as_data_source(self, split, decoders=None, **kwargs):
        del self, decoders, kwargs
        if split not in ("train", "test"):
            raise ValueError(f"Unknown split {split!r}")
        return fake_pet_records(6 if split == "train" else 3, seed=len(split), bad_value=bad_value)

    return tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_CODE, as_data_source_fn=as_data_source)


def pets_config(tmp_path, resize=32):
    config = load_config("pets")
    config.data.tfds_dir = str(tmp_path / "tfds")
    config.data.resize = resize
    config.data.cache = True
    return config


def test_pets_trimaps_map_to_documented_classes(tmp_path):
    config = pets_config(tmp_path)
    with mocked_pets():
        splits = sources.open_splits(config.data)
    assert len(splits["train"]) == 6 and len(splits["validation"]) == 3
    ex = splits["validation"][0]
    assert ex["image"].shape == (32, 32, 3) and ex["label"].shape == (32, 32)
    trimap = np.asarray(Image.open(io.BytesIO(fake_pet_records(3, seed=4)[0]["segmentation_mask"])))
    expected = np.asarray(Image.fromarray(trimap).resize((32, 32), Image.NEAREST))
    mapping = {1: 1, 2: 0, 3: 2}  # pet -> 1, background -> 0, border -> 2 (configs/pets.py)
    np.testing.assert_array_equal(ex["label"], np.vectorize(mapping.get)(expected))
    assert set(np.unique(ex["label"])) == {0, 1, 2}


def test_pets_trains_offline_on_mocked_catalogue_data(tmp_path):
    config = pets_config(tmp_path)
    config.model.depth, config.model.base_features = 2, 4
    config.train.steps, config.train.batch_size, config.eval.batch_size = 2, 2, 2
    config.train.log_every = config.train.checkpoint_every = config.eval.every = 2
    with mocked_pets():
        final = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert final["step"] == 2 and final["val/images"] == 3 and final["val/pixels"] == 3 * 32 * 32
    assert {"val/iou/pet", "val/iou/border", "val/iou/background"} <= set(final)


def test_trimap_value_outside_the_label_map_is_an_error(tmp_path):
    with (
        mocked_pets(bad_value=7),
        pytest.raises(DataError, match=r"stored label value 7 has no entry in data.label_map"),
    ):
        sources.open_splits(pets_config(tmp_path).data)


def test_missing_split_is_an_error(tmp_path):
    config = pets_config(tmp_path)
    config.data.tfds.val_split = "validation"
    with mocked_pets(), pytest.raises(DataError, match=r"no validation split 'validation' \(Unknown split"):
        sources.open_splits(config.data)


def test_a_catalogue_test_split_is_opened_only_when_named(tmp_path):
    config = pets_config(tmp_path)
    with (
        mocked_pets(),
        pytest.raises(DataError, match=r"no test split ''.*a test split comes from data.tfds.test_split"),
    ):
        sources.open_splits(config.data, splits=("test",))
    config.data.tfds.test_split = "test"
    with mocked_pets():
        test = sources.open_splits(config.data, splits=("test",))["test"]
    trimap = np.asarray(Image.open(io.BytesIO(fake_pet_records(3, seed=4)[2]["segmentation_mask"])))
    expected = np.vectorize({1: 1, 2: 0, 3: 2}.get)(np.asarray(Image.fromarray(trimap).resize((32, 32), Image.NEAREST)))
    assert len(test) == 3
    np.testing.assert_array_equal(test[2]["label"], expected)
