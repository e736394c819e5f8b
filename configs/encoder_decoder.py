"""The plain encoder-decoder (no skip connections; the bottleneck is the only path) on the default data.

COMMAND:
  python -m segjax.main --config=configs/encoder_decoder.py --workdir=runs/encoder_decoder
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default


def get_config(arg: str | None = None):
    default.no_argument(arg, __file__)
    c = default.get_config()
    c.model.arch = "encoder_decoder"
    return c
