"""The store: the frozen prefix's output for each training sample, keyed by sample index.

One *level* holds the outputs of the first k frozen blocks for every training row: a slab
of shape (rows, *row_shape) split by row range over tiers, each within a byte budget:

  device  this process's GPU memory; only for a single-process run (not shared)
  host    a file in /dev/shm, mapped by every process of the machine, so replicas that
          AutoDP adds read entries the others wrote
  disk    a memory-mapped file in the run folder, for what the host budget cannot hold

A byte per row says whether the entry is filled. Entries are filled while training runs
(the first epoch at a level computes the prefix and stores it); a later read of a missing
row computes it then. When more blocks freeze (k -> k'), each filled entry goes once through
blocks k..k'-1 and is written back over itself (`advance`): the blocks keep the shape, so
the level moves to k' in place, with no second copy alive and the same budgets. The next
batch's entries are read ahead on a background thread while the current step computes.

Files are removed by `close()`, at exit, and on SIGTERM (see stopping.stop_on_signals).
Their names carry the machine (host name and node rank: two "machines" of one run may share
a host) and a process id on that machine, so each machine's `remove_orphans` can tell the
files of a run that died there from live ones.
"""
from __future__ import annotations

import atexit
import os
import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from ..timing import best_seconds
from .policy import CacheDoesNotFit, tier_name, tier_rows

__all__ = ["ActivationCache", "available_host_bytes", "free_bytes", "remove_orphans", "SHM_DIR"]

SHM_DIR = Path("/dev/shm")


def available_host_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def free_bytes(folder: Path) -> int:
    """Bytes an unprivileged writer may still put on the file system of `folder` (or of the
    nearest folder above it that exists)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        st = os.statvfs(folder)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def _same_everywhere(values: list[int]) -> list[int]:
    """The one-process `agree`: nothing to agree with."""
    return list(values)


@dataclass
class _Part:
    """Rows [start, stop) of a level, in one tier."""
    tier: str
    start: int
    stop: int
    data: torch.Tensor
    path: Path | None


class _Level:
    def __init__(self, k: int, parts: list[_Part], valid: torch.Tensor):
        self.k, self.parts, self.valid = k, parts, valid

    @property
    def nbytes(self) -> int:
        return sum(p.data.numel() * p.data.element_size() for p in self.parts)

    @property
    def tier(self) -> str:
        return tier_name([(p.tier, p.start, p.stop) for p in self.parts])


class ActivationCache:
    """A node-shared, tiered store of frozen-prefix outputs. Every process of the run makes
    one; `local_rank` 0 of each machine creates and removes files.

    Every process of a machine must cut a level's rows into tiers at the same boundaries
    (they map the same files and share one "filled" flag per row), so budgets that each
    process measured on its own (free memory moves between two reads) are agreed on first:
    `agree(values)` returns the element-wise minimum over every process of the run
    (collective), and the boundaries are checked equal after it."""

    def __init__(self, num_rows: int, row_shape: tuple[int, ...], dtype: torch.dtype, run_id: str,
                 disk_dir: Path, host_budget: int, device: torch.device, device_budget: int,
                 local_rank: int, barrier: Callable[[], None],
                 agree: Callable[[list[int]], list[int]] = _same_everywhere):
        self.num_rows, self.row_shape, self.dtype = num_rows, tuple(row_shape), dtype
        self.row_bytes = int(torch.Size(row_shape).numel()) * torch.empty((), dtype=dtype).element_size()
        self.run_id, self.node, self.nodes = run_id, *_machine()
        self.prefix = self._prefix(os.getpid())
        self.disk_dir, self.host_budget = Path(disk_dir), host_budget
        self.device, self.device_budget = device, device_budget
        self.local_rank, self._barrier, self._agree = local_rank, barrier, agree
        self.level: _Level | None = None
        self.hits = self.misses = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-prefetch")
        # reads started ahead, oldest first: the engine asks for step s+1 before it fetches s
        self._ahead: list[tuple[torch.Tensor, Future]] = []
        self.ahead_hits = 0  # fetches served by a read started ahead
        self._paths: set[Path] = set()
        atexit.register(self.close)

    # --- levels ------------------------------------------------------------------------
    def open_level(self, k: int) -> None:
        """Allocate the level for k frozen blocks (collective over the run's processes).
        Raises CacheDoesNotFit, on every process, when the rows fit neither the host budget
        (capped by /dev/shm's free space) nor the run folder's free disk space."""
        assert self.level is None, "one level at a time: advance() moves it to a new k"
        # the owner: the lowest process id of this machine's processes (each machine its own files)
        self.prefix = self._prefix(self._agree([os.getpid() if n == self.node else 2**62
                                                for n in range(self.nodes)])[self.node])
        device_budget = self.device_budget if self.device.type == "cuda" else 0
        host = min(self.host_budget, free_bytes(SHM_DIR) - self.num_rows)  # the "filled" bytes live there too
        device_budget, host, disk = self._agree([device_budget, max(0, host), free_bytes(self.disk_dir)])
        tiers = tier_rows(self.num_rows, self.row_bytes, device_budget, host, disk)
        ends = [stop for _, _, stop in tiers]
        low = self._agree(ends + [-e for e in ends])
        assert low[:len(ends)] == [-e for e in low[len(ends):]], f"tier bounds differ between processes: {tiers}"
        parts = []
        for tier, start, stop in tiers:
            if tier == "device":
                data, path = torch.empty((stop - start, *self.row_shape), dtype=self.dtype,
                                         device=self.device), None
            else:
                folder = SHM_DIR if tier == "host" else self.disk_dir
                path = folder / f"{self.prefix}-{tier}.bin"
                data = self._map(path, (stop - start, *self.row_shape), self.dtype)
            parts.append(_Part(tier, start, stop, data, path))
        valid = self._map(SHM_DIR / f"{self.prefix}-valid.bin", (self.num_rows,), torch.uint8)
        self.level = _Level(k, parts, valid)

    def _prefix(self, owner_pid: int) -> str:
        """pipetransformer-<pid on this machine>-<run id>-<host>-node<R>: what remove_orphans reads."""
        return f"pipetransformer-{owner_pid}-{self.run_id}-{socket.gethostname()}-node{self.node}"

    def _map(self, path: Path, shape, dtype) -> torch.Tensor:
        """A new zero-filled file mapped by every local process (collective). Its bytes are
        reserved when it is made (posix_fallocate), so a full tmpfs or disk is an error here
        and never a SIGBUS mid-epoch. Other processes may write to it as soon as they return,
        so nothing may inspect it after the agreement."""
        numel = int(torch.Size(shape).numel())
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        self._paths.add(path)
        failure = ""
        if self.local_rank == 0:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # "wb" empties an existing file, then truncate() extends it with zeros
                with open(path, "wb") as f:
                    f.truncate(nbytes)
                    if nbytes:
                        os.posix_fallocate(f.fileno(), 0, nbytes)
            except OSError as e:
                failure = f"{path} ({nbytes / 2**20:.1f} MiB) cannot be made: {e.strerror or e}"
        if self._agree([0 if failure else 1])[0] == 0:
            self.close()
            raise CacheDoesNotFit(failure or f"another process could not make {path.name}")
        self._barrier()
        return torch.from_file(str(path), shared=True, size=numel, dtype=dtype).view(shape)

    @property
    def _open(self) -> _Level:
        assert self.level is not None, "no level is open"
        return self.level

    # --- rows ----------------------------------------------------------------------------
    # Positions are computed on the CPU and moved as index tensors: a boolean mask on the
    # device would make every read wait for the GPU.
    def _read(self, rows: torch.Tensor) -> torch.Tensor:
        """Entries of `rows` on this process's device. Host and disk rows are gathered on the
        CPU (into pinned memory for a GPU), then copied over without blocking."""
        out = torch.empty((len(rows), *self.row_shape), dtype=self.dtype, device=self.device)
        for p in self._open.parts:
            pos = ((rows >= p.start) & (rows < p.stop)).nonzero().flatten()
            if len(pos):
                values = p.data[(rows[pos] - p.start).to(p.data.device, non_blocking=True)]
                if values.device != self.device and self.device.type == "cuda":
                    values = values.pin_memory()
                out.index_copy_(0, pos.to(self.device, non_blocking=True),
                                values.to(self.device, non_blocking=True))
        return out

    def _write(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        values = values.detach().to(self.dtype)
        for p in self._open.parts:
            pos = ((rows >= p.start) & (rows < p.stop)).nonzero().flatten()
            if len(pos):
                chunk = values.index_select(0, pos.to(values.device, non_blocking=True))
                p.data[(rows[pos] - p.start).to(p.data.device, non_blocking=True)] = chunk.to(p.data.device)
        self._open.valid[rows] = 1  # after the data: a reader never sees a half-written row

    def _lookup(self, rows: torch.Tensor):
        hit = self._open.valid[rows].bool()
        return hit, self._read(rows[hit])

    def prefetch(self, rows: torch.Tensor) -> None:
        """Start reading `rows`' entries in the background; `fetch(rows)` picks them up."""
        if self.level is not None:
            self._ahead = self._ahead[-1:] + [(rows, self._pool.submit(self._lookup, rows))]

    def _drain(self) -> None:
        """Wait for reads started ahead and drop them (before entries change under them)."""
        for _, future in self._ahead:
            future.result()
        self._ahead = []

    def fetch(self, rows: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor],
              out_dtype: torch.dtype) -> torch.Tensor:
        """Entries for `rows` on this process's device; missing ones are computed by
        `compute(positions in rows)` and stored."""
        match = next((i for i, (ahead, _) in enumerate(self._ahead) if torch.equal(ahead, rows)), None)
        if match is None:
            hit, cached = self._lookup(rows)
        else:
            hit, cached = self._ahead[match][1].result()
            self._ahead = self._ahead[match + 1:]
            self.ahead_hits += 1
        out = torch.empty((len(rows), *self.row_shape), dtype=out_dtype, device=self.device)
        hit_pos, miss_pos = hit.nonzero().flatten(), (~hit).nonzero().flatten()
        if len(hit_pos):
            out.index_copy_(0, hit_pos.to(self.device, non_blocking=True), cached.to(out_dtype))
        if len(miss_pos):
            values = compute(miss_pos).to(self.dtype)  # as a later read will give it back
            out.index_copy_(0, miss_pos.to(self.device, non_blocking=True), values.to(out_dtype))
            self._write(rows[miss_pos], values)
        self.hits += len(hit_pos)
        self.misses += len(miss_pos)
        return out

    def advance(self, k: int, run_blocks: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                my_rows: torch.Tensor, chunk: int) -> int:
        """Move the level to k: each filled row of `my_rows` goes through `run_blocks(hidden,
        rows)` and is written back in place. Collective. Returns rows converted here."""
        self._drain()
        done = 0
        for start in range(0, len(my_rows), chunk):
            rows = my_rows[start:start + chunk]
            rows = rows[self._open.valid[rows].bool()]
            if len(rows):
                self._write(rows, run_blocks(self._read(rows), rows))
                done += len(rows)
        self._barrier()  # every process's rows are at k before anyone reads them
        self._open.k = k
        return done

    def stats(self) -> dict:
        lvl = self.level
        return {"cache_hits": self.hits, "cache_bytes": lvl.nbytes if lvl else 0,
                "cache_tier": lvl.tier if lvl else "off"}

    def reset_counters(self) -> None:
        self.hits = self.misses = self.ahead_hits = 0

    def read_seconds(self, rows: torch.Tensor) -> float:
        """Measured time to read `rows`' entries (for the on/off policy)."""
        return best_seconds(lambda: self._read(rows), self.device)

    def close(self) -> None:
        """Remove every file this cache made (idempotent)."""
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._ahead = []
        if self.local_rank == 0:
            for path in list(self._paths):
                path.unlink(missing_ok=True)
        self._paths.clear()
        self.level = None
        try:
            os.rmdir(self.disk_dir)
        except OSError:
            pass


def _machine() -> tuple[int, int]:
    """(this machine's rank, machines in the run), as torchrun tells its workers."""
    return int(os.environ.get("GROUP_RANK", 0)), int(os.environ.get("GROUP_WORLD_SIZE", 1))


def remove_orphans(run_dir: Path) -> list[Path]:
    """Remove cache files of this machine whose owning process is gone (a run killed with -9
    cannot clean up): in /dev/shm, and the disk tier in `run_dir` (which other machines may
    share: their files carry their host name, and their process ids mean nothing here).
    Each machine's local rank 0 calls it. Returns what went."""
    host, gone = socket.gethostname(), []
    for folder in (SHM_DIR, run_dir / "cache"):
        for path in folder.glob("pipetransformer-*.bin") if folder.is_dir() else []:
            pid = path.name.split("-")[1]
            if f"-{host}-" in path.name and pid.isdigit() and not Path(f"/proc/{pid}").exists():
                path.unlink(missing_ok=True)
                gone.append(path)
    return gone
