"""U-Net on the ISBI 2012 EM membrane images (512^2 grayscale, binary), trained on CPU.

Protocol: images 000-024 train, 025-029 validate (fold 5 of 6, at full 512^2 resolution);
`--config.data.folder.fold=K` gives the other folds of the 6-fold split.

Image shift instead of giving up flips: the membrane labels sit 0.60 px above and 0.17-0.20 px
left of the dark membranes in the images (`python -m segjax.data.alignment --config=configs/isbi.py`
measures it on the training images). Without a correction a network may not flip vertically
(it learns the offset; with vflip/rot90 Dice fell to 0.806). `data.image_shift` moves the images
onto the labels (labels untouched), so all flips, 90-degree rotations and D4 test-time
augmentation are consistent again. Measured (2 CPU cores, nothing else running): 2000 steps in
26.2 min, membrane Dice 0.823, pixel accuracy 0.929 (README); 1400 steps: 19.1 min, 0.820 / 0.928.
Cubic-spline warps (`data.augment.image_order=3`, the recipe since session 20): 0.8249 / 0.9290
in 29.2 min before; with session 20's faster CPU step 16.2 min, 0.8243 / 0.9288 (linear
warps, `--config.data.augment.image_order=1`: 15.4 min, 0.8224 / 0.9288). Session 38 on a slower
VM of the same kind (1.5-1.7 steps/s, the dataset prepared by the run): 21.1 min, 0.8244 / 0.9288;
session 39 on a faster one (3.0-3.2 steps/s): 12.0 min, the same scores.

COMMAND:
  python -m segjax.main --config=configs/isbi.py --workdir=runs/isbi
  (data from ../shared/data/isbi2012_membrane, or --config.data.dir=PATH / $SEGJAX_SHARED_DATA)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default

_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARED = os.environ.get("SEGJAX_SHARED_DATA", os.path.join(os.path.dirname(_HERE), "shared", "data"))


def get_config(arg: str | None = None):
    default.no_argument(arg, __file__)
    c = default.get_config()
    c.data.name = "folder"
    c.data.dir = os.path.join(_SHARED, "isbi2012_membrane")
    c.data.num_classes = 2
    c.data.class_names = ("cell", "membrane")
    c.data.channels = 1
    c.data.folder.num_folds = 6
    c.data.folder.fold = 5
    c.data.augment.crop = 256
    c.data.augment.rotate = 15.0
    c.data.augment.scale_min = 0.85
    c.data.augment.scale_max = 1.2
    c.data.augment.elastic_alpha = 6.0
    c.data.augment.elastic_sigma = 8.0
    c.data.augment.brightness = 0.1
    c.data.augment.contrast = 0.2
    c.data.augment.gamma = 0.2
    # the warps interpolate training images by cubic splines, which keep fine membranes sharp
    # (linear interpolation blurs them; the evaluated images are not resampled): +0.002 Dice
    c.data.augment.image_order = 3
    # moves the images onto the labels; measured on images 0-24 by one parabola fit when the README
    # numbers were run; `python -m segjax.data.alignment --config=configs/isbi.py` (iterated fit)
    # now says (-0.60, -0.17): equal within the 0.03 px the test allows
    c.data.image_shift = (-0.61, -0.20)
    c.data.spacing = (0.004, 0.004)  # 4 x 4 nm pixels (the challenge's description): surface metrics in um
    c.data.spacing_unit = "um"  # with --config.eval.surface_units=physical (and nsd_tolerance in um: 0.004 = 1 px)
    c.loss.dice_background = False  # the Dice term scores the membranes only
    c.model.depth = 4
    c.model.base_features = 16
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 50
    c.train.steps = 2000
    c.train.batch_size = 4
    c.train.log_every = 25
    c.train.checkpoint_every = 500
    c.train.best_metric = "val/dice/membrane"  # best/ by the score this task is judged by
    c.eval.every = 500
    c.eval.tta = "d4"
    c.eval.batch_size = 5
    c.eval.boundary_dilation = 2
    return c
