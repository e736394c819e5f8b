"""Cross-validation on ISBI 2012: configs/isbi.py on each of its 6 folds (images 5K..5K+4 held out).

One variant per held-out fold; fold5 (images 025-029) is the issue's protocol. `--pooled` adds a
row over all folds (the cross-validated mean +- std over folds) and one of the folds' pixel counts
summed (all 30 images scored once).

COMMAND (the README's proxy: 1000 steps on one core per process; two processes share the study,
~75 min on a 2-core machine; ../shared/data or $SEGJAX_SHARED_DATA):
  for c in 0 1; do taskset -c $c python -m segjax.study --study=configs/studies/isbi_folds.py:proxy \\
      --workdir=runs/isbi_folds --seeds=1 --summary_keys=val/dice/membrane --pooled & done; wait
Full recipe (2000 steps, both cores, ~23 min per fold): --study=configs/studies/isbi_folds.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import isbi

from segjax.errors import ConfigError


def get_config(arg=None):
    c = isbi.get_config()
    if arg == "proxy":  # the short run the README's fold table used: 1000 steps, one input thread
        c.train.steps = 1000
        c.data.num_threads = 1
        c.data.augment.image_order = 1  # the README's proxy tables were run with linear warps
    elif arg:
        raise ConfigError(f"isbi_folds.py: unknown argument {arg!r}; use ':proxy' or nothing")
    return c


def get_variants(arg=None):
    return {f"fold{k}": {"data.folder.fold": k} for k in range(get_config(arg).data.folder.num_folds)}
