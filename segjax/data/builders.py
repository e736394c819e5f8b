"""TFDS dataset builders (array_record files, PNG-encoded images; no TensorFlow needed)."""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from segjax.data import png, synthetic, synthetic3d
from segjax.errors import DataError


@dataclasses.dataclass
class SyntheticShapesConfig(tfds.core.BuilderConfig):
    """The generator's knobs; `name` is derived from them so each variant is prepared once."""

    seed: int = 0
    image_size: int = 64
    num_train: int = 2000
    num_val: int = 200
    num_test: int = 0
    noise: float = 0.05
    contrast: float = 1.0
    min_objects: int = 2
    max_objects: int = 5

    @classmethod
    def from_knobs(cls, **knobs) -> SyntheticShapesConfig:
        k = dict(knobs)
        name = (
            f"s{k['image_size']}_tr{k['num_train']}_va{k['num_val']}{_test_part(k)}_noise{k['noise']:g}"
            f"_con{k['contrast']:g}_obj{k['min_objects']}to{k['max_objects']}_seed{k['seed']}"
        ).replace(".", "p")
        return cls(name=name, **k)


def _test_part(knobs: dict) -> str:
    """`_te<n>` in a synthetic dataset's name when it has a test split; without one the name is
    the one prepared before test splits existed."""
    return f"_te{knobs['num_test']}" if knobs.get("num_test") else ""


class _SyntheticBuilder(tfds.core.GeneratorBasedBuilder):
    """Generated datasets: `num_train` / `num_val` (/ `num_test`) examples from
    `_generate_examples(split, count)`.
    The prepared name hashes the knobs, not the generator's code: `check_generator` notices a
    copy prepared by a generator that has changed since (VERSION not bumped)."""

    def _render(self, split: str, index: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def check_generator(self) -> None:
        """Example 0 of each split, as prepared, must be what the generator renders now; else a
        DataError (training would read scenes the code no longer makes). Bump VERSION when the
        generator's output changes: a new copy is prepared, the old one stays."""
        keys = ("image", "label", "instances")
        features = self.info.features
        skip = {k: tfds.decode.SkipDecoding() for k in keys if isinstance(features[k], tfds.features.Image)}
        for split in ("train", "validation"):
            stored = self.as_data_source(split=split, decoders=skip)[0]
            fresh, where = self._render(split, 0), f"{self.name}/{split}[0]"
            for key in keys:
                stored_array = png.as_array(stored[key], where, ids=key != "image")
                if not np.array_equal(stored_array.ravel(), np.asarray(fresh[key]).ravel()):
                    raise DataError(
                        f"the prepared {self.name}/{self.builder_config.name}/{self.version} in {self.data_dir} "
                        f"differs from what the generator ({type(self).__name__}) renders now ({split} example 0, "
                        f"{key!r}): it changed since; bump {type(self).__name__}.VERSION in {__name__}"
                    )

    def _split_generators(self, dl_manager):
        del dl_manager
        cfg = self.builder_config
        counts = {"train": cfg.num_train, "validation": cfg.num_val, "test": cfg.num_test}
        return {split: self._generate_examples(split, n) for split, n in counts.items() if n or split != "test"}


class SyntheticShapes(_SyntheticBuilder):
    """Seeded synthetic scenes (tools, berries, leaves); see segjax/data/synthetic.py."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = (SyntheticShapesConfig(name="default"),)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=synthetic.__doc__,
            disable_shuffling=True,  # example i of a split is scene i; training shuffles with grain
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.Image(shape=(None, None, 1)),
                    "instances": tfds.features.Image(shape=(None, None, 1), dtype=np.uint16),
                    "present": tfds.features.Tensor(shape=(len(synthetic.CLASS_NAMES),), dtype=np.int32),
                }
            ),
        )

    def _render(self, split: str, index: int) -> dict[str, np.ndarray]:
        cfg = self.builder_config
        params = synthetic.SceneParams(
            image_size=cfg.image_size,
            noise=cfg.noise,
            contrast=cfg.contrast,
            min_objects=cfg.min_objects,
            max_objects=cfg.max_objects,
        )
        return synthetic.render_scene(cfg.seed, split, index, params)

    def _generate_examples(self, split: str, count: int):
        for index in range(count):
            ex = self._render(split, index)
            yield (
                index,
                {
                    "image": png.encode(ex["image"]),
                    "label": png.encode(ex["label"]),
                    "instances": png.encode(ex["instances"]),
                    "present": ex["present"],
                },
            )


@dataclasses.dataclass
class SyntheticVolumesConfig(tfds.core.BuilderConfig):
    """Knobs of the 3D generator; `name` is derived from them."""

    seed: int = 0
    size: int = 32
    num_train: int = 200
    num_val: int = 40
    num_test: int = 0
    noise: float = 0.08
    min_objects: int = 2
    max_objects: int = 5

    @classmethod
    def from_knobs(cls, **k) -> SyntheticVolumesConfig:
        name = (
            f"s{k['size']}_tr{k['num_train']}_va{k['num_val']}{_test_part(k)}_noise{k['noise']:g}"
            f"_obj{k['min_objects']}to{k['max_objects']}_seed{k['seed']}"
        ).replace(".", "p")
        return cls(name=name, **k)


class SyntheticVolumes(_SyntheticBuilder):
    """Seeded synthetic 3D volumes (blobs, tubes); see segjax/data/synthetic3d.py."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = (SyntheticVolumesConfig(name="default"),)

    def _info(self) -> tfds.core.DatasetInfo:
        shape = (self.builder_config.size,) * 3
        return tfds.core.DatasetInfo(
            builder=self,
            description=synthetic3d.__doc__,
            disable_shuffling=True,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(*shape, 1), dtype=np.uint8),
                    "label": tfds.features.Tensor(shape=shape, dtype=np.uint8),
                    "instances": tfds.features.Tensor(shape=shape, dtype=np.uint16),
                    "present": tfds.features.Tensor(shape=(len(synthetic3d.CLASS_NAMES),), dtype=np.int32),
                }
            ),
        )

    def _render(self, split: str, index: int) -> dict[str, np.ndarray]:
        cfg = self.builder_config
        params = synthetic3d.VolumeParams(cfg.size, cfg.noise, cfg.min_objects, cfg.max_objects)
        return synthetic3d.render_volume(cfg.seed, split, index, params)

    def _generate_examples(self, split: str, count: int):
        for index in range(count):
            yield index, self._render(split, index)
