"""`AutoCache`: AutoCache wired to a run (see the package's docstring)."""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import CacheConfig
from ..distributed import local_rank_world, min_over_world
from ..errors import ConfigError
from ..runtime import UnitSequence
from ..timing import best_seconds
from .policy import CacheDoesNotFit, cache_wanted, cache_warning, host_budget, should_cache, storage_dtype
from .store import SHM_DIR, ActivationCache, available_host_bytes

__all__ = ["AutoCache"]


class AutoCache:
    """One per process; every method that says "collective" runs on every rank."""

    def __init__(self, cfg: CacheConfig, augment: str, model, train_data, device: torch.device,
                 run_dir: Path, global_batch: int, log):
        self.cfg, self.augment, self.model, self.data = cfg, augment, model, train_data
        self.device, self.run_dir, self.global_batch, self.log = device, run_dir, global_batch, log
        self.store: ActivationCache | None = None
        self.comm_device = device if device.type == "cuda" else torch.device("cpu")  # NCCL reduces on GPUs
        self.out_dtype = torch.float32  # the prefix's output dtype (bf16 under autocast)

    @property
    def wanted(self) -> bool:
        return cache_wanted(self.cfg.cache, self.augment)

    def warning(self) -> str | None:
        return cache_warning(self.cfg.cache, self.augment)

    def active(self, rt) -> bool:
        """Whether the first stage reads its inputs from the cache under runtime `rt`."""
        return (self.store is not None and self.store.level is not None
                and self.store.level.k == rt.frozen and rt.prefix is not None)

    def on_freeze(self, old_frozen: int, frozen: int, rt) -> None:
        """Bring the cache to `frozen` blocks after a rebuild. Collective."""
        if frozen <= old_frozen or not self.wanted:
            return
        if self.store is None:
            self._start(frozen, rt)
        else:
            self._advance(old_frozen, frozen)

    def _advance(self, old_frozen: int, frozen: int) -> None:
        """Incremental: entries at old_frozen go once through the newly frozen blocks."""
        assert self.store is not None
        units = [u for u in self.model.units if old_frozen <= u.freeze_index < frozen]
        placed = [next(u.module.parameters()).device for u in units]
        for u in units:  # every local rank converts rows; only first stages hold frozen units
            u.module.to(self.device)
        newly = UnitSequence(units, self.device).eval()

        @torch.no_grad()
        def run_blocks(hidden, rows):
            extras = [x.to(self.device) for x in self.model.inputs(self.data.batch(rows, self.device))[1:]]
            return newly(hidden.to(self.device, self.out_dtype), *extras)[0]
        local_rank, local_world = local_rank_world()
        mine = torch.arange(len(self.data))[local_rank::local_world]
        self.store.advance(frozen, run_blocks, mine, self.global_batch)
        for u, where in zip(units, placed):
            u.module.to(where)

    def _start(self, frozen: int, rt) -> None:
        """Create the cache at the first frozen prefix; in auto mode keep it only if reading a
        batch's entries measures faster than recomputing them (probed on rank 0)."""
        cc, rank = self.cfg, dist.get_rank()
        rows = torch.arange(min(len(self.data), self.global_batch))
        probe: list = [None]
        if rank == 0:  # rank 0 is the first stage of replica 0: it holds the prefix
            inputs = [x.to(self.device) for x in self.model.inputs(self.data.batch(rows, self.device))]
            with torch.no_grad():
                out = rt.prefix(*inputs)[0]
                seconds = best_seconds(lambda: rt.prefix(*inputs), self.device)
            probe = [(tuple(out.shape[1:]), out.dtype, seconds)]
        dist.broadcast_object_list(probe, src=0)
        row_shape, self.out_dtype, prefix_seconds = probe[0]
        dtype = getattr(torch, storage_dtype(cc.cache_dtype, str(self.out_dtype).removeprefix("torch.")))
        host = host_budget(cc.cache_host_bytes, cc.cache_host_fraction, available_host_bytes())
        device_budget = 0
        if self.device.type == "cuda" and dist.get_world_size() == 1:
            device_budget = int(cc.cache_device_fraction * torch.cuda.mem_get_info(self.device)[0])
        run_id = [f"{os.getpid()}-{time.time_ns()}"]
        dist.broadcast_object_list(run_id, src=0)
        self.store = ActivationCache(len(self.data), row_shape, dtype, run_id[0], self.run_dir / "cache",
                                     host, self.device, device_budget, local_rank_world()[0], dist.barrier,
                                     lambda values: min_over_world(values, self.comm_device))
        try:
            self.store.open_level(frozen)
        except CacheDoesNotFit as e:
            self.close()
            if cc.cache == "on":
                raise ConfigError(f"--cache=on is invalid here: the frozen prefix's outputs do not fit ({e}); "
                                  f"free space in {SHM_DIR} or {self.run_dir}, lower --train-samples, or use "
                                  f"--cache auto or off") from None
            self.log(f"cache off: it does not fit ({e})")
            return
        note = "on"
        if cc.cache == "auto":
            verdict: list = [None]
            if rank == 0:
                self.inputs(self.data.batch(rows, self.device), rt)  # fill the probe rows
                read = self.store.read_seconds(rows)
                verdict = [(should_cache(prefix_seconds, read), read)]
            dist.broadcast_object_list(verdict, src=0)
            keep, read = verdict[0]
            note = (f"{'on' if keep else 'off'}: prefix {1e3 * prefix_seconds:.1f} ms vs read "
                    f"{1e3 * read:.1f} ms per batch")
            self.store.reset_counters()
            if not keep:
                self.log(f"cache {note}")
                self.close()
                return
        stats = self.store.stats()
        machines = self.store.nodes  # each fills its own copy with the rows its processes read
        where = f" on each of {machines} machines, each filled by its own processes" if machines > 1 else ""
        self.log(f"cache {note}; tier {stats['cache_tier']}, {stats['cache_bytes'] / 2**20:.0f} MiB{where}")

    def inputs(self, batch: dict, rt) -> tuple:
        """The first stage's inputs for `batch`: cached prefix outputs (computed and stored
        where missing) and the extras (attention mask)."""
        assert self.store is not None
        inputs = tuple(x.to(self.device) for x in self.model.inputs(batch))

        def compute(pos):
            with torch.no_grad():
                return rt.prefix(*(x[pos.to(x.device)] for x in inputs))[0]
        hidden = self.store.fetch(batch["index"], compute, self.out_dtype)
        return (hidden, *inputs[1:])

    def prefetch(self, rows: torch.Tensor) -> None:
        if self.store is not None:
            self.store.prefetch(rows)

    def reset_counters(self) -> None:
        if self.store is not None:
            self.store.reset_counters()

    def stats(self) -> dict:
        if self.store is None:
            return {"cache_hits": 0, "cache_bytes": 0, "cache_tier": "off"}
        return self.store.stats()

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None
