"""Command-line entry: `python -m segjax.main --config=configs/default.py --workdir=runs/x`.

Any config field can be overridden: `--config.model.depth=4`. Rerunning on the same workdir
resumes from its latest checkpoint; `--eval_only=best|latest` scores a saved checkpoint with the
config's eval settings (sliding windows, TTA) without training, on the validation split or, with
`--eval_split=test`, on the dataset's held-out test split. Bad input (config, data,
checkpoint, workdir) ends with a one-line `error: ...` and exit status 2, not a traceback.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

from segjax import configuration
from segjax.errors import ConfigError, exit_on_user_error

_DEFAULT_CONFIG = "configs/default.py"
_CONFIG = config_flags.DEFINE_config_file("config", _DEFAULT_CONFIG, "Config file (Python, trusted code).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, logs, metrics.json.", required=True)
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Move an existing run with a different config aside and start anew.")
_ALLOW_CHANGES = flags.DEFINE_bool(
    "allow_config_changes", False, "Resume a run even though the config differs from the stored one."
)
_EVAL_ONLY = flags.DEFINE_enum(
    "eval_only",
    None,
    ["best", "latest"],
    "Do not train: score this checkpoint of --workdir with the config's eval settings (writes eval_<which>.json).",
)
_EVAL_SPLIT = flags.DEFINE_enum(
    "eval_split",
    "validation",
    ["validation", "test"],
    "With --eval_only: the split scored; test (held out, never evaluated in training) writes eval_<which>_test.json.",
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with cluster auto-detection (SLURM, TPU pods, ...)."
)
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (explicit multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")


def init_distributed() -> None:
    """Join a multi-process job before JAX touches any device; a no-op for one process."""
    import jax

    explicit = _COORDINATOR.value is not None
    auto = _DISTRIBUTED.value or int(os.environ.get("SLURM_NTASKS", "1")) > 1
    if not (explicit or auto):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk over TCP
    if explicit:
        jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d devices in all", jax.process_index(), jax.process_count(), jax.device_count())
    cache_dir = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
    if cache_dir and jax.process_count() > 1 and jax.default_backend() == "cpu":
        # jaxlib 0.12.1: a program with cross-process (gloo) collectives that process 0 loads from the
        # persistent compilation cache waits forever in its first all-reduce (0.10/0.11 do not);
        # CPU multi-process runs are small, so they compile instead of risking the hang.
        jax.config.update("jax_enable_compilation_cache", False)
        logging.warning("multi-process CPU run: JAX's persistent compilation cache (%s) is off here", cache_dir)


def shutdown_distributed() -> None:
    """Leave a multi-process job together (a barrier inside), so no process is aborted by the
    coordination service because another one exited first."""
    import jax

    if jax.process_count() > 1:
        jax.distributed.shutdown()


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    init_distributed()
    from segjax import rescore, train  # after flag parsing: keeps --help fast

    with exit_on_user_error():
        if _EVAL_ONLY.value:
            rescore.evaluate_checkpoint(_CONFIG.value, _WORKDIR.value, _EVAL_ONLY.value, _EVAL_SPLIT.value)
        elif _EVAL_SPLIT.value != "validation":
            raise ConfigError(
                f"--eval_split={_EVAL_SPLIT.value} scores a saved checkpoint: add --eval_only=best|latest "
                "(training evaluates the validation split only)"
            )
        else:
            train.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _OVERWRITE.value, _ALLOW_CHANGES.value)
        shutdown_distributed()


def run():
    configuration.run_program(main, _DEFAULT_CONFIG)


if __name__ == "__main__":
    run()
