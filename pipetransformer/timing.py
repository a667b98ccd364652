"""Timing that waits for the device: the measurements behind the cache and balance choices."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch

__all__ = ["best_seconds"]


def best_seconds(fn: Callable[[], object], device: torch.device, repeat: int = 3,
                 grad: bool = False) -> float:
    """Fastest of `repeat` timed calls of `fn` (no grad unless asked), waiting for the GPU."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        with torch.set_grad_enabled(grad):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best
