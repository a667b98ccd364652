"""When to cache and how: pure decisions, tested alone."""
from __future__ import annotations

__all__ = ["should_cache", "cache_wanted", "cache_warning", "storage_dtype", "host_budget", "tier_rows",
           "tier_name"]


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


def storage_dtype(choice: str, device_type: str) -> str:
    """auto: bfloat16 on CUDA (half the bytes, the compute dtype there), float32 on CPU."""
    if choice != "auto":
        return choice
    return "bfloat16" if device_type == "cuda" else "float32"


def host_budget(host_bytes: int, host_fraction: float, available_bytes: int) -> int:
    """Bytes of host memory the cache may use: an explicit count, else a share of what is free."""
    return host_bytes or int(host_fraction * available_bytes)


def tier_rows(num_rows: int, row_bytes: int, device_budget: int, host_budget: int) -> list[tuple[str, int, int]]:
    """(tier, first row, end row) of a level: rows fill the device budget, then the host
    budget, and the rest goes to disk; empty tiers are left out."""
    on_device = min(num_rows, device_budget // row_bytes)
    on_host = min(num_rows - on_device, host_budget // row_bytes)
    bounds = [("device", 0, on_device), ("host", on_device, on_device + on_host),
              ("disk", on_device + on_host, num_rows)]
    return [(tier, start, stop) for tier, start, stop in bounds if stop > start]


def tier_name(tiers: list[tuple[str, int, int]]) -> str:
    """What metrics.jsonl calls a level's placement: "host", "device+host", "host+disk"."""
    return "+".join(tier for tier, _, _ in tiers)
