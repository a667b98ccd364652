"""Process-group start-up: under torchrun, or a one-process group for a plain call."""
from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

__all__ = ["init", "shutdown", "device_for", "local_rank_world", "sum_over_world", "min_over_world"]


def device_for(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def local_rank_world() -> tuple[int, int]:
    """(this process's rank on its machine, processes on its machine), as torchrun sets them."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def init(timeout_seconds: float = 300.0) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Works with torchrun's variables or none at all. A peer
    that stops answering ends every collective with an error after `timeout_seconds`."""
    device = device_for(local_rank_world()[0])
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), device
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_seconds)
    device_id = device if device.type == "cuda" else None
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=_attempt_store(rank, world, timeout), rank=rank,
                                world_size=world, timeout=timeout, device_id=device_id)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout,
                                device_id=device_id)
    return dist.get_rank(), dist.get_world_size(), device


def _attempt_store(rank: int, world: int, timeout: datetime.timedelta) -> dist.Store:
    """torchrun's store, with keys private to this attempt: after a restart (--max-restarts)
    the agent may keep its store, and the failed attempt's addresses would still be there."""
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == str(True)
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                          is_master=rank == 0 and not agent_hosts, timeout=timeout)
    return dist.PrefixStore(f"attempt-{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def sum_over_world(t: torch.Tensor, comm_device: torch.device) -> torch.Tensor:
    """All-reduce (sum) a small host tensor over every process; NCCL needs it on the GPU."""
    x = t.to(comm_device)
    dist.all_reduce(x)
    return x.cpu()


def min_over_world(values: list[int], comm_device: torch.device) -> list[int]:
    """Element-wise minimum of a few integers over every process."""
    x = torch.tensor(values, dtype=torch.int64, device=comm_device)
    dist.all_reduce(x, op=dist.ReduceOp.MIN)
    return x.cpu().tolist()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
