"""SHA-256 digests of a dataset's files, cached by each file's stat as git's index does.

A folder dataset is named by its files' contents, not their times: a copy, a re-sync or a
re-extracted archive keeps the name (and a run resumes on it), an edit changes it. Hashing every
file on every start would take minutes on a large dataset, so each file's digest is kept with
its size, modification time, change time and inode (what git's index records), and read again
only when one of them differs. The change time moves on every write and cannot be set back, so
an edit that restores the modification time is still seen. The cache is a cache: a missing,
unreadable or read-only one costs a rehash, never a wrong name.
"""

from __future__ import annotations

import hashlib
import json
import os

from absl import logging

from segjax import writers

CHUNK = 1 << 20  # bytes read at a time


def sha256(path: str) -> str:
    """The hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


def cache_path(cache_dir: str, root: str) -> str:
    """The cache file of the files under `root` (one per folder, named by its absolute path)."""
    key = hashlib.sha1(os.path.abspath(root).encode()).hexdigest()[:16]
    return os.path.join(cache_dir, "segjax_file_digests", f"{key}.json")


def _stat_key(path: str) -> list[int]:
    info = os.stat(path)
    return [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]


def _read(cache_file: str) -> dict:
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
        return cache if isinstance(cache, dict) else {}
    except (OSError, ValueError):
        return {}


def digests(root: str, paths: list[str], cache_file: str) -> dict[str, str]:
    """{path relative to `root`: SHA-256} of `paths`, hashing only files whose stat differs from
    the one `cache_file` recorded with its digest; the cache is rewritten (whole) when it changed."""
    cache = _read(cache_file)
    entries = {}
    for path in paths:
        rel = os.path.relpath(path, root)
        key = _stat_key(path)
        hit = cache.get(rel)
        known = isinstance(hit, list) and len(hit) == 2 and hit[0] == key
        entries[rel] = [key, hit[1] if known else sha256(path)]
    if entries != cache:
        try:
            os.makedirs(os.path.dirname(cache_file), exist_ok=True)
            with writers.replaced(cache_file) as f:
                json.dump(entries, f)
        except OSError as err:  # a read-only data dir: the next start hashes again
            logging.warning("could not write the file digest cache %s (%s)", cache_file, err)
    return {rel: sha for rel, (_, sha) in entries.items()}
