"""Process-group start-up: under torchrun, or a one-process group for a plain call."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["init", "shutdown", "device_for", "local_rank_world", "sum_over_world", "raise_on_sigterm",
           "TIMEOUT"]

TIMEOUT = datetime.timedelta(minutes=10)  # a dead peer ends in an error, never a hang


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_rank_world() -> tuple[int, int]:
    """(this process's rank on its machine, processes on its machine), as torchrun sets them."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def init() -> tuple[int, int, torch.device]:
    """(rank, world size, device). Works with torchrun's variables or none at all."""
    device = device_for(local_rank_world()[0])
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
    return dist.get_rank(), dist.get_world_size(), device


def sum_over_world(t: torch.Tensor, comm_device: torch.device) -> torch.Tensor:
    """All-reduce (sum) a small host tensor over every process; NCCL needs it on the GPU."""
    x = t.to(comm_device)
    dist.all_reduce(x)
    return x.cpu()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def raise_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so `finally` blocks (shared-memory cleanup) run."""
    import signal

    def handler(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)
