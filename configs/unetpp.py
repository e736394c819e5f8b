"""U-Net++ with deep supervision on the default synthetic scenes.

COMMAND:
  python -m segjax.main --config=configs/unetpp.py --workdir=runs/unetpp
  Without deep supervision:   --config.model.deep_supervision=False
  Pruned inference (head j):  --config.model.inference_head=2
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default


def get_config(arg: str | None = None):
    default.no_argument(arg, __file__)
    c = default.get_config()
    c.model.arch = "unetpp"
    c.model.deep_supervision = True
    c.model.base_features = 12
    return c
