"""Panoptic segmentation of the synthetic scenes: every tool, berry and leaf as its own instance.

The U-Net predicts the 4 classes plus an `instance_boundary` class on the pixels where two
instances touch; post-processing turns that into instances and the run reports panoptic quality
(`val/pq`, `val/sq`, `val/rq`, `val/pq/<class>`) next to the usual semantic scores
(segjax/instances.py). The instance maps come with the synthetic dataset.

COMMAND:
  python -m segjax.main --config=configs/panoptic.py --workdir=runs/panoptic
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default


def get_config(arg: str | None = None):
    default.no_argument(arg, __file__)
    c = default.get_config()
    c.instances.enabled = True
    return c
