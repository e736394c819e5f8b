"""U-Net on Oxford-IIIT Pet from the TFDS catalogue: pet / background / border trimaps.

Trimap -> class mapping (`data.label_map`, indexed by the stored value):
    stored 1 (pet)                 -> class 1 "pet"
    stored 2 (background)          -> class 0 "background"
    stored 3 (border, unclassified)-> class 2 "border"
    stored 0 (never used)          -> 255 (an error if it ever appears)
To score pet vs background only and ignore the border band:
    --config.data.label_map="(255, 1, 0, 255)" --config.data.ignore_label=255
    --config.data.num_classes=2 --config.data.class_names="('background', 'pet')"
Images (mixed sizes) are resized to 128^2 on load, masks with nearest neighbour. Validation is
the catalogue's `test` split (3,669 images).

Preparing the dataset (once, needs internet and TensorFlow: TFDS's pet builder decodes the JPEGs
with tf.image) writes array_record files that segjax then reads without TensorFlow:
  pip install -r requirements-tf.txt
  python -c "import tensorflow_datasets as tfds; \
    tfds.builder('oxford_iiit_pet:4.*.*', file_format='array_record').download_and_prepare()"

COMMAND:
  python -m segjax.main --config=configs/pets.py --workdir=runs/pets
  (reads $TFDS_DATA_DIR or ~/tensorflow_datasets; or --config.data.tfds_dir=PATH)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default


def get_config(arg: str | None = None):
    default.no_argument(arg, __file__)
    c = default.get_config()
    c.data.name = "tfds"
    c.data.tfds.name = "oxford_iiit_pet:4.*.*"
    c.data.tfds.image_key = "image"
    c.data.tfds.label_key = "segmentation_mask"
    c.data.tfds.train_split = "train"
    c.data.tfds.val_split = "test"
    c.data.label_map = (255, 1, 0, 2)
    c.data.num_classes = 3
    c.data.class_names = ("background", "pet", "border")
    c.data.channels = 3
    c.data.resize = 128
    c.data.cache = False  # 3,680 + 3,669 images: decoded on the fly by the grain workers
    c.data.augment.scale_min = 0.8
    c.data.augment.scale_max = 1.25
    c.data.augment.rot90 = False  # pets are upright
    c.data.augment.brightness = 0.1
    c.data.augment.contrast = 0.2
    c.model.depth = 4
    c.model.base_features = 32
    c.train.steps = 5000
    c.train.batch_size = 16
    c.train.checkpoint_every = 1000
    c.eval.every = 1000
    c.eval.batch_size = 32
    return c
