"""Seconds on CPU: a 2-level U-Net on 32x32 synthetic scenes, for tests and smoke runs.

COMMAND:
  python -m segjax.main --config=configs/tiny.py --workdir=/tmp/segjax-tiny
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import default


def get_config(arg: str | None = None):
    default.no_argument(arg, __file__)
    c = default.get_config()
    c.data.synthetic.image_size = 32
    c.data.synthetic.num_train = 32
    c.data.synthetic.num_val = 12
    c.model.depth = 2
    c.model.base_features = 4
    c.train.steps = 6
    c.train.batch_size = 4
    c.train.log_every = 2
    c.train.checkpoint_every = 3
    c.eval.every = 3
    c.eval.batch_size = 8
    c.eval.interval_resamples = 0  # the test suite's many tiny runs skip the bootstrap (tests that need it set it)
    c.optim.warmup_steps = 2
    return c
