"""Which split a result scores, and how its keys and files are named: training and `--eval_only`
score the validation split (`val/...` keys, metrics.json, eval_best.json); the held-out test split
is scored only when asked (`--eval_split=test`: `test/...` keys, eval_best_test.json; a classic
baseline's metrics_test.json; a study's summary_test.md). No JAX here: study tables import it.
"""

from __future__ import annotations

from segjax.errors import ConfigError

# a scored split -> (its keys' prefix, its result files' suffix)
SPLIT_NAMING = {"validation": ("val", ""), "test": ("test", "_test")}


def split_naming(split: str) -> tuple[str, str]:
    """(key prefix, file suffix) of `split` (`SPLIT_NAMING`); another split is a ConfigError."""
    if split not in SPLIT_NAMING:
        raise ConfigError(f"split {split!r}: choose one of {list(SPLIT_NAMING)}")
    return SPLIT_NAMING[split]


def split_keys(results: dict, prefix: str) -> dict:
    """`results` with its `val/...` keys named `<prefix>/...` (evaluation names every split's
    scores `val/`); `val` leaves them as they are."""
    if prefix == "val":
        return dict(results)
    return {(f"{prefix}/{k[4:]}" if k.startswith("val/") else k): v for k, v in results.items()}
