"""What the planner prices with: a model's units as measured on one device (`Profile`, the
file `pipetransformer profile` writes) and the devices a run would use (`Hardware`). Plain
data and file I/O, no torch, so the command line reads its flags from here before importing
torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .autopipe import UnitCost
from .errors import ConfigError

__all__ = ["PROFILE_FORMAT", "GB", "UnitProfile", "Profile", "Hardware", "read_profile", "write_profile",
           "format_profile", "local_hardware", "threads_per_process", "core_sharing"]

PROFILE_FORMAT = "pipetransformer-profile/1"
GB = 1e9


@dataclass(frozen=True)
class UnitProfile:
    """One unit as measured: sizes, and seconds at each of the profile's batch sizes."""
    name: str
    freeze_index: int
    matrix_params: int                    # the size AutoPipe balances (models.base.Unit.cost)
    param_bytes: int
    output_bytes: float                   # per row: what crosses a stage boundary, what the cache holds
    saved_bytes: float                    # per row: activations kept for the backward pass
    forward_seconds: tuple[float, ...]    # without gradients (how frozen units and evaluation run)
    backward_seconds: tuple[float, ...]   # a training step's forward and backward, minus forward
    update_seconds: float                 # AdamW and gradient bookkeeping of its parameters, per step


@dataclass(frozen=True)
class Profile:
    """A model's units as measured on one device (`pipetransformer profile`)."""
    model: str
    modality: str
    units: tuple[UnitProfile, ...]
    batch_sizes: tuple[int, ...]
    seq_len: int          # tokens per row (text), or the image side in pixels
    device: str           # "cpu" or "cuda"
    device_name: str
    threads: int
    dtype: str            # of the activations as profiled: float32 on CPU, bfloat16 under CUDA autocast
    date: str = ""
    memory_gb: float = 0.0  # the profiled GPU's memory (0 on CPU)
    torch: str = ""
    load_average: float = 0.0  # the machine's, before profiling: other programs slow the times down
    processes: int = 1    # processes training at once while it was measured (profile --processes)
    cores: int = 0        # the machine's CPU cores (0: not recorded)

    @property
    def sharing(self) -> float:
        """How much the co-running processes slowed these times: above 1 when the CPU
        processes profiled together wanted more cores than the machine had."""
        return core_sharing(self.processes, self.threads, self.cores) if self.device == "cpu" else 1.0

    @property
    def num_blocks(self) -> int:
        return max(u.freeze_index for u in self.units if u.name != "head") + 1

    def to_dict(self) -> dict:
        return {"format": PROFILE_FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, raw: dict) -> Profile:
        fields = {f.name for f in dataclasses.fields(cls)}
        units = tuple(UnitProfile(**{**u, "forward_seconds": tuple(u["forward_seconds"]),
                                     "backward_seconds": tuple(u["backward_seconds"])}) for u in raw["units"])
        values = {k: v for k, v in raw.items() if k in fields and k != "units"}
        return cls(**{**values, "units": units, "batch_sizes": tuple(raw["batch_sizes"])})

    def unit_costs(self, by_time: bool) -> tuple[UnitCost, ...]:
        """The trainer's view (runtime.unit_costs): sizes, and with --balance time the seconds
        (forward+backward, forward) at the largest profiled batch."""
        def seconds(u: UnitProfile) -> tuple[float, float] | None:
            return (u.forward_seconds[-1] + u.backward_seconds[-1], u.forward_seconds[-1]) if by_time else None
        return tuple(UnitCost(u.name, u.freeze_index, u.matrix_params, seconds(u), u.param_bytes)
                     for u in self.units)


def read_profile(path: str | Path) -> Profile:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
        if raw.get("format") != PROFILE_FORMAT:
            raise ValueError(f"format {raw.get('format')!r}")
        return Profile.from_dict(raw)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"--profile={str(path)!r} is not a profile file ({e}); write one with "
                          f"`pipetransformer profile --out {path}`") from None


def write_profile(profile: Profile, path: str | Path) -> None:
    from .recorder import write_atomically  # a stop midway leaves no half a profile
    write_atomically(Path(path), json.dumps(profile.to_dict(), indent=1) + "\n")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity (a container or `taskset` may
    allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def threads_per_process(cores: int, processes: int) -> int:
    """The threads `train --nproc N` gives each CPU process: the cores shared out."""
    return max(1, cores // processes)


def core_sharing(processes: float, threads: int, cores: float) -> float:
    """How much slower each of `processes` CPU processes of `threads` threads computes than
    alone on `cores` cores (1 when they fit, or when the cores are unknown: 0)."""
    return max(1.0, processes * threads / cores) if cores else 1.0


def _h(default, help: str):
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Hardware:
    """The devices a run would use, relative to the profiled one. Each field is a flag of
    `pipetransformer plan`. The defaults describe CPU processes on one machine talking over
    gloo (measured on this project's 2-core machine: an all-reduce of 90 MB over 2 processes
in 0.13 s, 0.7 GB/s by the ring formula; 0.2 ms a small message)."""
    devices: int = _h(2, "number of devices (processes) the run uses")
    per_node: int = _h(0, "devices per machine; a pipeline is a run of consecutive ranks (0: one machine)")
    speed: float = _h(1.0, "compute speed of one device relative to the profiled one")
    memory_gb: float = _h(0.0, "memory per device in GB, checked against each epoch's peak (0: not checked)")
    intra_gb_s: float = _h(0.7, "bandwidth between devices of one machine, GB/s")
    inter_gb_s: float = _h(0.7, "bandwidth between machines, GB/s")
    latency_us: float = _h(200.0, "latency of one message, microseconds")
    host_memory_gb: float = _h(16.0, "available host memory per machine in GB (the cache's host tier)")
    host_gb_s: float = _h(5.0, "host memory bandwidth of one process (cached rows, gradient copies), GB/s")
    disk_gb_s: float = _h(0.5, "reading cached rows spilled to disk, GB/s")
    call_overhead_us: float = _h(0.0, "host time per unit call, forward or backward, that no speed-up "
                                 "shortens (kernel launches on a GPU); a CPU profile already holds its own")
    gpu: bool = _h(False, "the devices are GPUs: bf16 activations and cache, a cache tier in GPU memory")
    cores: float = _h(0.0, "CPU processes only: cores the devices of one machine share, each device using "
                      "--threads of them; the profile is taken as measured with all of them busy "
                      "(0: every device computes alone, as GPUs do)")
    threads: int = _h(1, "with --cores: threads (cores) each device uses")
    rebuild_seconds: float = _h(0.05, "seconds a transition spends rebuilding stages and schedules")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            positive = f.name in ("devices", "threads") or f.name.endswith(("speed", "_gb_s"))
            if not isinstance(value, bool) and (value < 0 or (positive and not value > 0)):
                raise ConfigError(f"--{f.name.replace('_', '-')}={value!r} is invalid: use a "
                                  f"{'positive' if positive else 'non-negative'} number")
        if self.per_node and self.devices % self.per_node and self.devices > self.per_node:
            raise ConfigError(f"--per-node={self.per_node} is invalid: it must divide --devices={self.devices}")

    @property
    def node_size(self) -> int:
        return min(self.per_node or self.devices, self.devices)

    @property
    def oversubscription(self) -> float:
        """How much slower a device computes while every device of its machine is busy than
        alone: above 1 when CPU processes want more cores than the machine has."""
        return self.slowdown(self.node_size)

    def slowdown(self, busy: int) -> float:
        """How much slower each of `busy` processes of one machine computes than alone."""
        return 1.0 if self.gpu else core_sharing(busy, self.threads, self.cores)

    def node(self, rank: int) -> int:
        return rank // self.node_size

    def message(self, nbytes: float, across: bool) -> float:
        """Seconds to send nbytes point to point."""
        return self.latency_us * 1e-6 + nbytes / ((self.inter_gb_s if across else self.intra_gb_s) * GB)

    def all_reduce(self, nbytes: float, members: int, across: bool) -> float:
        """Averaging nbytes of gradients over `members` devices as autodp does: one flat copy,
        a ring all-reduce, one division (the two passes at host memory speed on CPU)."""
        if members < 2 or nbytes <= 0:
            return 0.0
        bw = (self.inter_gb_s if across else self.intra_gb_s) * GB
        passes = 0.0 if self.gpu else 4 * nbytes / (self.host_gb_s * GB)  # read and write, twice
        return passes + 2 * (members - 1) * (self.latency_us * 1e-6 + nbytes / members / bw)


def local_hardware(profile: Profile, processes: int) -> Hardware:
    """The machine a profile was measured on, running `processes` processes: GPUs one each;
    CPU processes at the profile's own speed, which `profile --processes N` measures with N
    copies running at once (so sharing the cores is already in it), on the cores it recorded."""
    if profile.device == "cuda":
        return Hardware(processes, memory_gb=profile.memory_gb, intra_gb_s=20.0, latency_us=20.0, gpu=True)
    return Hardware(processes, cores=profile.cores, threads=threads_per_process(profile.cores, processes))


def format_profile(profile: Profile) -> str:
    """The table `pipetransformer profile` prints: each unit at the largest batch."""
    rows = profile.batch_sizes[-1]
    lines = [f"{profile.model} on {profile.device_name} ({profile.device}, {profile.threads} thread(s), "
             f"{profile.dtype}), {profile.seq_len} {'tokens' if profile.modality == 'text' else 'pixels a side'}, "
             f"batches {', '.join(map(str, profile.batch_sizes))}, load average {profile.load_average:.1f} "
             f"before; milliseconds at batch {rows}:",
             f"{'unit':<14} {'forward':>8} {'backward':>9} {'update':>7} {'params MB':>10} {'out KB/row':>11} "
             f"{'saved KB/row':>13}"]
    for u in profile.units:
        lines.append(f"{u.name:<14} {1e3 * u.forward_seconds[-1]:>8.1f} {1e3 * u.backward_seconds[-1]:>9.1f} "
                     f"{1e3 * u.update_seconds:>7.1f} {u.param_bytes / 1e6:>10.2f} {u.output_bytes / 1e3:>11.1f} "
                     f"{u.saved_bytes / 1e3:>13.1f}")
    return "\n".join(lines)
