"""When to cache and how: pure decisions, tested alone."""
from __future__ import annotations

__all__ = ["should_cache", "cache_wanted", "cache_warning", "storage_dtype", "host_budget", "tier_rows",
           "tier_name", "CacheDoesNotFit"]


class CacheDoesNotFit(ValueError):
    """A level's rows need more room than the host and disk budgets allow."""


def should_cache(prefix_seconds: float, read_seconds: float) -> bool:
    """A cache pays when reading a batch's entries beats recomputing them."""
    return prefix_seconds > read_seconds


def cache_wanted(mode: str, augment: str) -> bool:
    """Random augmentation gives the frozen blocks a new input each epoch, so a cached output
    would replay the epoch that filled it: auto leaves the cache off then; on opts in."""
    return mode == "on" or (mode == "auto" and augment == "off")


def cache_warning(mode: str, augment: str) -> str | None:
    """The line a run prints when augmentation and caching meet, or None."""
    if augment == "off" or mode == "off":
        return None
    if mode == "auto":
        return (f"warning: cache off because --augment={augment} draws new inputs each epoch; "
                f"--cache on would reuse each image's first augmentation instead")
    return (f"warning: --cache on with --augment={augment}: once its entry is cached, an image "
            f"keeps the augmentation of the epoch that filled it")


def storage_dtype(choice: str, output_dtype: str) -> str:
    """auto: the frozen prefix's own output dtype, so a cached read gives back exactly what
    the prefix computed (under bf16 autocast a LayerNorm output is float32: storing it as
    bfloat16 would round every read and every advance); bfloat16 halves the bytes on request."""
    return output_dtype if choice == "auto" else choice


def host_budget(host_bytes: int, host_fraction: float, available_bytes: int, shm_free: int | None = None) -> int:
    """Bytes of host memory the cache may use: an explicit count, else a share of what is
    free; never more than the shared-memory folder can hold (`shm_free`: a container's
    /dev/shm is often 64 MiB, and writing past a tmpfs's end is a SIGBUS, not an error)."""
    budget = host_bytes or int(host_fraction * available_bytes)
    return budget if shm_free is None else max(0, min(budget, shm_free))


def tier_rows(num_rows: int, row_bytes: int, device_budget: int, host_budget: int,
              disk_budget: int | None = None) -> list[tuple[str, int, int]]:
    """(tier, first row, end row) of a level: rows fill the device budget, then the host
    budget, and the rest goes to disk (within `disk_budget` bytes, if given: else
    CacheDoesNotFit); empty tiers are left out."""
    on_device = min(num_rows, device_budget // row_bytes)
    on_host = min(num_rows - on_device, host_budget // row_bytes)
    on_disk = num_rows - on_device - on_host
    if disk_budget is not None and on_disk * row_bytes > disk_budget:
        raise CacheDoesNotFit(f"{num_rows} rows of {row_bytes} bytes need {_mib(num_rows * row_bytes)}; "
                              f"the host budget holds {_mib(on_host * row_bytes)} and the disk has "
                              f"{_mib(disk_budget)} free for the other {_mib(on_disk * row_bytes)}")
    bounds = [("device", 0, on_device), ("host", on_device, on_device + on_host),
              ("disk", on_device + on_host, num_rows)]
    return [(tier, start, stop) for tier, start, stop in bounds if stop > start]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def tier_name(tiers: list[tuple[str, int, int]]) -> str:
    """What metrics.jsonl calls a level's placement: "host", "device+host", "host+disk"."""
    return "+".join(tier for tier, _, _ in tiers)
