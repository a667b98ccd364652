"""Arrays built once and memory-mapped: tokenised text and QA features live on disk, so a
process's memory does not grow with the data set.

`cached_arrays(folder, key, build)` returns {name: read-only np.memmap}. The first process of
the machine to take the key's lock builds the arrays (from the chunks `build` yields, one
chunk in memory at a time) into a temporary folder renamed into place; every other process
waits on the lock and maps the finished files. A later run with the same key (a resume, or
the same data and tokenizer) maps them without building.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

__all__ = ["cached_arrays", "cache_key", "file_stamp"]

Chunk = dict[str, np.ndarray]


def cache_key(**parts) -> str:
    """A short stable name for what the arrays depend on (paths, sizes, mtimes, settings)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def file_stamp(path: Path) -> dict:
    """What changes when a file (or a folder's files) changes, for `cache_key`: sizes, inodes,
    modification and change times (a copy that keeps the modification time, `cp -p`, still
    differs)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    stats = [(p.name, p.stat()) for p in files]
    return {"files": [(name, s.st_size, s.st_ino, s.st_mtime_ns, s.st_ctime_ns) for name, s in stats]}


def cached_arrays(folder: Path, key: str, build: Callable[[], Iterable[Chunk]]) -> dict[str, np.ndarray]:
    """{name: read-only memmap}: the chunks of `build()` concatenated along axis 0, built once
    per `key` under `folder` (see the module docstring)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done = folder / key
    with open(folder / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder per machine; the others wait here
        try:
            if not (done / "names.json").is_file():
                _build(folder, done, build)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    names = json.loads((done / "names.json").read_text())
    return {n: np.load(done / f"{n}.npy", mmap_mode="r") for n in names}


def _build(folder: Path, done: Path, build: Callable[[], Iterable[Chunk]]) -> None:
    tmp = folder / f".{done.name}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        parts: dict[str, list[Path]] = {}
        for i, chunk in enumerate(build()):  # each chunk goes to disk before the next is made
            for name, arr in chunk.items():
                path = tmp / f"{name}.part{i}.npy"
                np.save(path, np.ascontiguousarray(arr))
                parts.setdefault(name, []).append(path)
        for name, paths in parts.items():
            heads = [np.load(p, mmap_mode="r") for p in paths]
            rows = sum(len(h) for h in heads)
            out = np.lib.format.open_memmap(tmp / f"{name}.npy", mode="w+", dtype=heads[0].dtype,
                                            shape=(rows, *heads[0].shape[1:]))
            at = 0
            for h, p in zip(heads, paths):
                out[at:at + len(h)] = h
                at += len(h)
                p.unlink()
            out.flush()
            del out
        (tmp / "names.json").write_text(json.dumps(sorted(parts)))
        shutil.rmtree(done, ignore_errors=True)
        tmp.rename(done)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
