"""Three methods on the DSB 2018 nuclei subset (configs/nuclei.py), compared on each imaging
modality's images alone: the U-Net, the plain encoder-decoder (a bottleneck, no skips) and Otsu's
threshold with the polarity chosen per image (a classic baseline, scored in seconds, not trained).

The subset's index.csv names each image's `stratum` (fluorescence, H&E, brightfield), so the
comparison says where the skips matter and where a threshold is enough, not only whether.

COMMAND (two trainings of configs/nuclei.py, ~3 min each on 2 CPU cores, and the threshold):
  python -m segjax.study --study=configs/studies/nuclei_methods.py --workdir=runs/nuclei_methods --seeds=1 \
      --summary_keys=val/dice/nucleus --compare_to=unet \
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
    # objects are the minority side of Otsu's threshold, image by image (bright and dark nuclei)
    "otsu": {"baseline.enabled": True, "baseline.method": "otsu", "baseline.auto_polarity": True},
}


def get_config(arg=None):
    default.no_argument(arg, __file__)
    return nuclei.get_config()


def get_variants(arg=None):
    default.no_argument(arg, __file__)
    return dict(VARIANTS)
