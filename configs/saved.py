"""A run's saved config (its `config.json`) as a config file: the run's exact settings again.

COMMAND:
  python -m segjax.main --config=runs/isbi/config.json --workdir=runs/isbi_seed1 --config.train.seed=1
  (`--config=RUN/config.json` stands for `--config=configs/saved.py:RUN/config.json`; the same for
  segjax.predict and segjax.baselines.) Keys the file lacks (saved before the field existed) keep
  their configs/default.py values; keys this version does not have are an error.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from segjax import configuration


def get_config(arg: str | None = None):
    if not arg:
        raise ValueError("configs/saved.py needs the path of a run's config.json: --config=configs/saved.py:PATH")
    return configuration.from_json(arg)
