"""AutoCache: the store's tiers and budgets, incremental levels, clean-up; the pure policy."""
from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from pipetransformer.autocache.policy import (
    CacheDoesNotFit,
    cache_wanted,
    cache_warning,
    host_budget,
    should_cache,
    storage_dtype,
    tier_rows,
)
from pipetransformer.autocache.store import SHM_DIR, ActivationCache


def _cache(tmp_path, rows=10, host_budget=10**9, dtype=torch.float32):
    return ActivationCache(rows, (3, 4), dtype, f"test-{os.getpid()}-{time.time_ns()}", tmp_path / "cache",
                           host_budget, torch.device("cpu"), 0, 0, lambda: None)


def _as_two_processes(work) -> None:
    """Run work(0) and work(1) at once; threads stand in for two processes of one machine."""
    threads = [threading.Thread(target=work, args=(rank,)) for rank in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _shm_files(cache):
    return sorted(SHM_DIR.glob(cache.prefix + "*"))


@pytest.mark.parametrize("host_rows", [10, 4, 0])
def test_rows_round_trip_through_every_tier(tmp_path, host_rows):
    cache = _cache(tmp_path, host_budget=host_rows * 3 * 4 * 4)
    try:
        cache.open_level(2)
        tiers = {p.tier: p.stop - p.start for p in cache.level.parts}
        assert tiers.get("host", 0) == host_rows and tiers.get("disk", 0) == 10 - host_rows
        assert sum(p.data.numel() * 4 for p in cache.level.parts if p.tier == "host") <= host_rows * 48
        values = torch.randn(10, 3, 4)
        computed = []

        def compute(pos):
            computed.append(pos.clone())
            return values[rows[pos]]
        rows = torch.tensor([7, 1, 9, 4])
        assert torch.equal(cache.fetch(rows, compute, torch.float32), values[rows])
        rows = torch.tensor([4, 0, 7, 3])  # 4 and 7 hit, 0 and 3 are computed
        cache.prefetch(rows)
        assert torch.equal(cache.fetch(rows, compute, torch.float32), values[rows])
        assert computed[-1].tolist() == [1, 3] and (cache.hits, cache.misses) == (2, 6)
    finally:
        cache.close()
    assert not _shm_files(cache) and not (tmp_path / "cache").exists()


def test_reads_started_a_step_ahead_serve_the_fetches(tmp_path):
    """The engine's order: at step s it starts reading step s+1, then fetches step s."""
    cache = _cache(tmp_path, rows=12)
    try:
        cache.open_level(1)
        values = torch.randn(12, 3, 4)
        steps = torch.randperm(12).view(4, 3)
        for _epoch in range(2):  # the first fills, the second reads
            cache.reset_counters()
            for s, rows in enumerate(steps):
                if s + 1 < len(steps):
                    cache.prefetch(steps[s + 1])
                got = cache.fetch(rows, lambda pos, rows=rows: values[rows[pos]], torch.float32)
                assert torch.equal(got, values[rows])
        assert cache.ahead_hits == 3 and cache.hits == 12 and not cache._ahead
    finally:
        cache.close()


def test_advance_moves_filled_rows_through_new_blocks_in_place_within_the_budget(tmp_path):
    cache = _cache(tmp_path, host_budget=6 * 48)  # 6 of 10 rows on the host, 4 on disk
    try:
        cache.open_level(1)
        values = torch.randn(10, 3, 4)
        filled = torch.tensor([0, 2, 5, 8])  # on both tiers
        cache.fetch(filled, lambda pos: values[filled[pos]], torch.float32)
        files = _shm_files(cache) + sorted((tmp_path / "cache").iterdir())
        tiers = {p.tier: p.stop - p.start for p in cache.level.parts}
        converted = cache.advance(3, lambda h, rows: 2 * h + rows.view(-1, 1, 1), torch.arange(10), chunk=3)
        assert converted == 4 and cache.level.k == 3
        # no second copy: the same files, the same split, so the budget held throughout
        assert _shm_files(cache) + sorted((tmp_path / "cache").iterdir()) == files
        assert {p.tier: p.stop - p.start for p in cache.level.parts} == tiers == {"host": 6, "disk": 4}
        got = cache.fetch(filled, lambda pos: pytest.fail("should hit"), torch.float32)
        assert torch.allclose(got, 2 * values[filled] + filled.view(-1, 1, 1))
        assert cache.level.valid.sum() == 4  # unfilled rows stay unfilled
        cache.advance(4, lambda h, rows: h - 1, filled[:2], chunk=8)  # rows another process owns: untouched
        got = cache.fetch(filled, lambda pos: pytest.fail("should hit"), torch.float32)
        assert torch.allclose(got[:2], 2 * values[filled[:2]] + filled[:2].view(-1, 1, 1) - 1)
        assert torch.allclose(got[2:], 2 * values[filled[2:]] + filled[2:].view(-1, 1, 1))
    finally:
        cache.close()
    assert not _shm_files(cache)


def test_two_local_processes_share_a_level_while_one_lags(tmp_path):
    """Local rank 1 writes as soon as the level is open while rank 0 is still returning from
    the barrier (CI once caught rank 0 inspecting the new file then). Threads stand in for the
    processes: each cache maps the files on its own, as a process would."""
    run_id, sync = f"test-{os.getpid()}-{time.time_ns()}", threading.Barrier(2, timeout=30)

    def barrier_for(rank):
        def barrier():
            sync.wait()
            if rank == 0:
                time.sleep(0.3)
        return barrier
    caches = [ActivationCache(10, (3, 4), torch.float32, run_id, tmp_path / "cache", 10**9,
                              torch.device("cpu"), 0, rank, barrier_for(rank)) for rank in (0, 1)]
    values, seen, errors = torch.randn(10, 3, 4), {}, []

    def work(rank):
        try:
            cache = caches[rank]
            cache.open_level(1)
            if rank == 1:
                cache.fetch(torch.tensor([3]), lambda pos: values[[3]], torch.float32)
            cache._barrier()
            seen[rank] = cache.fetch(torch.tensor([3]), lambda pos: pytest.fail("should hit"), torch.float32)
            cache._barrier()
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(e)
            sync.abort()
    try:
        _as_two_processes(work)
        assert not errors, errors
        assert torch.equal(seen[0], values[[3]]) and torch.equal(seen[1], values[[3]])
    finally:
        for cache in (caches[1], caches[0]):
            cache.close()
    assert not _shm_files(caches[0])


def test_policy_caches_when_reading_beats_recomputing():
    assert should_cache(prefix_seconds=0.02, read_seconds=0.001)
    assert not should_cache(prefix_seconds=0.001, read_seconds=0.002)


def test_policy_keeps_auto_off_under_augmentation_and_warns_once_opted_in():
    assert cache_wanted("auto", "off") and cache_wanted("on", "crop-flip")
    assert not cache_wanted("auto", "crop-flip") and not cache_wanted("off", "off")
    assert cache_warning("auto", "off") is None and cache_warning("off", "crop-flip") is None
    assert "cache off because --augment=crop-flip" in cache_warning("auto", "crop-flip")
    assert "--cache on with --augment=crop-flip" in cache_warning("on", "crop-flip")


def test_policy_storage_dtype_and_host_budget():
    # auto stores what the prefix computed (float32 LayerNorm output under bf16 autocast)
    assert storage_dtype("auto", "float32") == "float32" and storage_dtype("auto", "bfloat16") == "bfloat16"
    assert storage_dtype("bfloat16", "float32") == "bfloat16"
    assert host_budget(1000, 0.5, 10**9) == 1000  # an explicit byte count wins
    assert host_budget(0, 0.25, 4000) == 1000


def test_free_space_caps_the_host_tier_and_a_full_disk_is_refused():
    assert host_budget(0, 0.25, 4 * 2**30, shm_free=64 * 2**20) == 64 * 2**20  # a container's /dev/shm
    assert host_budget(10**9, 0.25, 0, shm_free=-5) == 0
    assert tier_rows(10, 100, 0, 600, disk_budget=400) == [("host", 0, 6), ("disk", 6, 10)]
    with pytest.raises(CacheDoesNotFit, match="10 rows of 100 bytes"):
        tier_rows(10, 100, 0, 600, disk_budget=399)
    assert tier_rows(10, 100, 0, 10**6, disk_budget=0) == [("host", 0, 10)]


def test_processes_whose_budgets_differ_share_one_layout(tmp_path):
    """Each process measures its own free memory; two moments differ. Rows one process
    fills must read back, in the other, as the same rows (before the fix the second
    process cut its tiers 2 rows later and read zeros and other rows' values as hits)."""
    run_id, sync = f"test-{os.getpid()}-{time.time_ns()}", threading.Barrier(2, timeout=30)
    shared: dict[int, list[int]] = {}

    def agree_for(rank):
        def agree(values):
            shared[rank] = values
            sync.wait()
            out = [min(a, b) for a, b in zip(shared[0], shared[1])]
            sync.wait()
            return out
        return agree
    row_bytes = 3 * 4 * 4
    caches = [ActivationCache(10, (3, 4), torch.float32, run_id, tmp_path / "cache", rows * row_bytes,
                              torch.device("cpu"), 0, rank, sync.wait, agree_for(rank))
              for rank, rows in ((0, 6), (1, 4))]
    values, seen, errors = torch.randn(10, 3, 4), {}, []

    def work(rank):
        try:
            cache = caches[rank]
            cache.open_level(1)
            mine = torch.arange(10)[rank::2]
            cache.fetch(mine, lambda pos: values[mine[pos]], torch.float32)
            sync.wait()
            seen[rank] = cache.fetch(torch.arange(10), lambda pos: pytest.fail("should hit"), torch.float32)
            seen[f"tiers{rank}"] = [(p.tier, p.start, p.stop) for p in cache.level.parts]
            sync.wait()
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test thread
            errors.append(e)
            sync.abort()
    try:
        _as_two_processes(work)
        assert not errors, errors
        assert seen["tiers0"] == seen["tiers1"] == [("host", 0, 4), ("disk", 4, 10)]
        assert torch.equal(seen[0], values) and torch.equal(seen[1], values)
    finally:
        for cache in (caches[1], caches[0]):
            cache.close()
    assert not _shm_files(caches[0])


def test_a_level_that_fits_nowhere_is_refused_and_leaves_no_file(tmp_path, monkeypatch):
    import pipetransformer.autocache.store as store
    real = store.free_bytes
    monkeypatch.setattr(store, "free_bytes", lambda folder: 100 if folder == tmp_path / "cache" else real(folder))
    cache = _cache(tmp_path, host_budget=0)
    try:
        with pytest.raises(CacheDoesNotFit, match="disk has 0.0 MiB free"):
            cache.open_level(1)
    finally:
        cache.close()
    assert not _shm_files(cache) and not (tmp_path / "cache").exists()


def test_bfloat16_rows(tmp_path):
    cache = _cache(tmp_path, dtype=torch.bfloat16)
    try:
        cache.open_level(1)
        x = torch.randn(2, 3, 4)
        rows = torch.tensor([3, 6])
        cache.fetch(rows, lambda pos: x[pos], torch.float32)
        got = cache.fetch(rows, lambda pos: pytest.fail("should hit"), torch.float32)
        assert torch.allclose(got, x.to(torch.bfloat16).float()) and cache.stats()["cache_bytes"] == 10 * 12 * 2
    finally:
        cache.close()
