"""What ran a result: each start of a run (training, a resume, a rescoring, a baseline) appends
one JSON line to `<workdir>/environment.jsonl`: the time, the command line, the host, the
segjax checkout's git commit (and whether it had uncommitted changes), Python and the versions of
the packages that decide the numbers, the devices and processes, and the environment variables
that change XLA's code. A number in a table can then be traced to the code and machine that made
it, also across resumes on other machines; earlier lines are never rewritten.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
import sys

import jax
from absl import logging

from segjax import writers

FILE = "environment.jsonl"
# distributions whose versions decide the numbers (absent ones are left out)
PACKAGES = (
    "jax",
    "jaxlib",
    "jax-cuda12-plugin",
    "jax-cuda13-plugin",
    "libtpu",
    "flax",
    "optax",
    "orbax-checkpoint",
    "tensorflow-datasets",
    "grain",
    "array-record",
    "numpy",
    "scipy",
    "scikit-image",
    "ml-collections",
)
ENV_VARS = ("XLA_FLAGS", "JAX_PLATFORMS", "CUDA_VISIBLE_DEVICES", "JAX_ENABLE_X64", "SEGJAX_KERNEL_DIR")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout segjax runs from
GIT_TIMEOUT_S = 10


def git_state(repo: str = "") -> dict | None:
    """{'commit': HEAD, 'dirty': tracked files changed} of the checkout at `repo` (default: segjax's
    own); None when it is no git checkout (an installed package) or git is missing."""
    repo = repo or REPO

    def git(*args) -> str:
        done = subprocess.run(
            ["git", "-C", repo, *args], capture_output=True, text=True, timeout=GIT_TIMEOUT_S, check=True
        )
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": dirty}


def describe(what: str, **extra) -> dict:
    """The record of one start: `what` started (e.g. 'train', 'eval_only=best') and `extra` (e.g.
    the step it starts from)."""
    packages = {}
    for name in PACKAGES:
        try:
            packages[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    devices = jax.devices()
    return {
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "what": what,
        **extra,
        "command": list(sys.argv),
        "host": platform.node(),
        "git": git_state(),
        "python": platform.python_version(),
        "packages": packages,
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "processes": jax.process_count(),
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def code_summary(git: dict | None) -> str:
    """A record's `git` in words: 'commit 1a2b3c4d5e6f', '... with uncommitted changes', 'no git checkout'."""
    if not git:
        return "no git checkout"
    return f"commit {str(git.get('commit'))[:12]}" + (" with uncommitted changes" if git.get("dirty") else "")


def changes(before: dict, now: dict) -> list[str]:
    """What differs between two starts' records in what decides the numbers: the code's commit (or
    its uncommitted changes), package versions, backend and device kind, e.g. 'jax 0.10.2 -> 0.11.2'."""
    out = []
    if before.get("git") != now.get("git"):
        out.append(f"{code_summary(before.get('git'))} -> {code_summary(now.get('git'))}")
    old_packages, new_packages = before.get("packages", {}), now.get("packages", {})
    for name in sorted(set(old_packages) | set(new_packages)):
        if old_packages.get(name) != new_packages.get(name):
            out.append(f"{name} {old_packages.get(name, 'absent')} -> {new_packages.get(name, 'absent')}")
    for key in ("backend", "device_kind"):
        if before.get(key) != now.get(key):
            out.append(f"{key} {before.get(key)} -> {now.get(key)}")
    return out


def record(workdir: str, what: str, **extra) -> dict | None:
    """Append this start's `describe` line to `<workdir>/environment.jsonl` (process 0; the others
    return None) and log its gist; a warning names what changed since the previous start (a
    resume with another JAX or commit: its numbers are not one code's any more)."""
    if jax.process_index() != 0:
        return None
    entry = describe(what, **extra)
    path = os.path.join(workdir, FILE)
    previous = (starts(workdir) or [None])[-1]
    differences = changes(previous, entry) if previous else []
    if differences:
        logging.warning(
            "%s: %s was started before with other code or software (%s): %s",
            what,
            workdir,
            previous.get("time"),
            "; ".join(differences),
        )
    writers.append_jsonl(path, entry)
    logging.info(
        "%s: %s, jax %s, %d %s device(s) x %d process(es) (%s)",
        what,
        code_summary(entry["git"]),
        entry["packages"].get("jax", "?"),
        entry["devices"],
        entry["device_kind"],
        entry["processes"],
        FILE,
    )
    return entry


def starts(workdir: str) -> list[dict]:
    """Every whole record of `<workdir>/environment.jsonl`, oldest first (none: no file)."""
    path = os.path.join(workdir, FILE)
    if not os.path.exists(path):
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:  # a line cut off by a crash mid-write
                continue
            if isinstance(entry, dict):
                out.append(entry)
    return out


def mixed_code(run_dirs: list[str]) -> str:
    """'' when every run in `run_dirs` was made (every start) by one commit and JAX version;
    otherwise a line that counts the runs per code, for a results table whose rows would
    otherwise compare code versions as if they were variants. A run resumed under other code
    counts once under each; runs without a record (from before records) count as 'no record'."""
    counts: dict[str, int] = {}
    for run in run_dirs:
        made = {f"{code_summary(s.get('git'))}, jax {s.get('packages', {}).get('jax', '?')}" for s in starts(run)}
        for code in made or {"no record"}:
            counts[code] = counts.get(code, 0) + 1
    if len(counts) < 2:
        return ""
    listed = "; ".join(f"{code}: {n} run{'s' * (n != 1)}" for code, n in sorted(counts.items()))
    return f"The runs were made by different code or software ({listed})."
