"""3D U-Net (the U-Net module with spatial_dims=3) on seeded synthetic 3D volumes.

COMMAND:
  python -m segjax.main --config=configs/unet3d.py --workdir=runs/unet3d
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default
import vnet3d


def get_config(arg: str | None = None):
    default.no_argument(arg, __file__)
    c = vnet3d.get_config()
    c.model.arch = "unet"
    c.model.kernel_size = 3
    c.model.base_features = 8
    return c
