"""U-Net on any image/mask folder, in one flag.

COMMAND:
  python -m segjax.main --config=configs/folder.py --workdir=runs/mydata \
      --config.data.dir=/path/to/folder --config.data.num_classes=2 \
      --config.data.class_names="('background','object')" [--config.data.channels=1] \
      [--config.data.ignore_label=255] [--config.data.resize=256]

The folder holds images/ and masks/ (class ids 0..C-1; optional instances/), with optional
train/ val/ test/ subfolders of the same layout; see segjax/data/folder.py for the split rules.
A labelled test/ is held out: score the trained run on it once, at the end, with
  python -m segjax.main --config=configs/folder.py --workdir=runs/mydata --config.data.dir=... \
      --eval_only=best --eval_split=test        (writes runs/mydata/eval_best_test.json)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default


def get_config(arg: str | None = None):
    default.no_argument(arg, __file__)
    c = default.get_config()
    c.data.name = "folder"
    c.data.dir = os.environ.get("SEGJAX_DATA_DIR", "")
    c.data.num_classes = 2
    c.data.class_names = ("background", "foreground")
    c.data.augment.crop = 256
    c.model.depth = 4
    c.train.batch_size = 4
    c.eval.batch_size = 2
    return c
