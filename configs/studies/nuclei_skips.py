"""Skip connections on the DSB 2018 nuclei subset (configs/nuclei.py): the U-Net next to the plain
encoder-decoder (a bottleneck, no skips), compared on each imaging modality's images alone.

The subset's index.csv names each image's `stratum` (fluorescence, H&E, brightfield), so the
comparison says where the skips matter, not only whether they do over the whole split.

COMMAND (two runs of configs/nuclei.py, ~3-4 min each on 2 CPU cores):
  python -m segjax.study --study=configs/studies/nuclei_skips.py --workdir=runs/nuclei_skips --seeds=1 \\
      --summary_keys=val/dice/nucleus --compare_to=unet \\
      --groups=../shared/data/dsb2018_nuclei_subset/index.csv --group_by=stratum
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import default
import nuclei

VARIANTS = {
    "unet": {},
    "no_skips": {"model.skips": "none"},  # the plain encoder-decoder: the bottleneck only
}


def get_config(arg=None):
    default.no_argument(arg, __file__)
    return nuclei.get_config()


def get_variants(arg=None):
    default.no_argument(arg, __file__)
    return dict(VARIANTS)
