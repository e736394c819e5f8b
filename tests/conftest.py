"""Shared fixtures: a per-session TFDS folder and the tiny config pointed at it."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# JAX's persistent compilation cache, shared by both xdist workers and every CLI subprocess a
# test starts (they inherit the environment): most of this suite's time is XLA compiling the same
# small programs again (each `jax.random` kernel alone takes ~0.2 s on 2 CPU cores). Entries are
# keyed by the program, the flags and the jaxlib version, so results are unchanged; set
# JAX_COMPILATION_CACHE_DIR yourself to move it (the folder is git-ignored).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(ROOT, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The rest of the compile time is LLVM optimising the generated CPU code, which the tests' tiny
# programs never pay back: LLVM's opt level 0 makes the cold suite 9:08 -> 7:31 on 2 cores with
# the same warm-cache time (4:14 both; session 28). XLA's HLO passes (fusion, simplification) run
# as before, so the programs compute the same things, rounded as unoptimised code rounds them.
# Tests that set XLA_FLAGS for a subprocess add TEST_XLA_FLAGS; a level in XLA_FLAGS wins.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
SHARED_DATA = os.environ.get("SEGJAX_SHARED_DATA", os.path.join(os.path.dirname(ROOT), "shared", "data"))


def tiny_cli(workdir, tfds_dir, *extra) -> list[str]:
    """The command line of a `configs/tiny.py` run (segjax.main) in `workdir`."""
    return [
        sys.executable,
        "-m",
        "segjax.main",
        "--config=configs/tiny.py",
        f"--workdir={workdir}",
        f"--config.data.tfds_dir={tfds_dir}",
        *extra,
    ]


def load_config(name: str, arg: str | None = None):
    """get_config(arg) of configs/<name>.py."""
    from segjax import configuration

    return configuration.from_file(os.path.join(ROOT, "configs", f"{name}.py"), arg)


def assert_trees_equal(a, b, **tol):
    """Leaf by leaf `np.testing.assert_allclose` (pass rtol=0, atol=0 for exact equality), each
    failure naming the leaf's path; the trees must have as many leaves."""
    import jax  # not at the top: JAX reads the cache settings above when it is first imported
    import numpy as np

    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path), **tol)


@pytest.fixture(scope="session", autouse=True)
def _library_temporary_files(tmp_path_factory):
    """Libraries' own temporary files go under pytest's folder (which pytest prunes), not /tmp:
    TFDS leaves an empty `tmp*tfds` folder behind whenever it opens a dataset not yet prepared. TMPDIR carries
    it to the CLI subprocesses the tests start."""
    path = str(tmp_path_factory.mktemp("tempfile"))
    saved = tempfile.tempdir, os.environ.get("TMPDIR")
    tempfile.tempdir, os.environ["TMPDIR"] = path, path
    yield
    tempfile.tempdir = saved[0]
    if saved[1] is None:
        os.environ.pop("TMPDIR")
    else:
        os.environ["TMPDIR"] = saved[1]


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture
def tiny_config(tfds_dir):
    config = load_config("tiny")
    config.data.tfds_dir = tfds_dir
    return config


def checkpoint_step_id(folder) -> str:
    """A saved step's name recomputed from its files: SHA-256 of {path: [size, sha256]} of every
    file but the digest file (`checkpointing.DIGEST_FILE`), keys sorted, first 16 hex digits."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            if name != "segjax_digest.json":
                with open(path, "rb") as f:
                    data = f.read()
                files[os.path.relpath(path, folder)] = [len(data), hashlib.sha256(data).hexdigest()]
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]
