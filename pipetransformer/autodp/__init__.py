"""AutoDP: the device layout, its process groups, and what data parallelism changes.

W processes = K pipeline stages x D replicas. Rank r sits in replica r // K at stage r % K,
so each pipeline is a run of consecutive ranks (on one machine when K divides the GPUs per
node). The process groups of every layout the run can reach are created once, in the same
order on every rank: there are only as many layouts as divisors of W, and creating groups
per transition leaks descriptors.

When freed devices become replicas, the global batch is sliced over them (`replica_rows`),
their active gradients are averaged (`average_gradients`), and the batch policy says what
each replica's batch and the learning rate become (`replica_batch`, `lr_scale`). The
process groups and the gradient average, which need torch, are in `autodp.groups`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the layout and batch rules are pure: the planner and launcher load no torch
    import torch

__all__ = ["Layout", "replica_batch", "lr_scale", "ramped", "replica_rows", "dropout_seed"]


@dataclass(frozen=True)
class Layout:
    world: int
    stages: int

    def __post_init__(self):
        assert self.stages >= 1 and self.world % self.stages == 0, (self.world, self.stages)

    @property
    def replicas(self) -> int:
        return self.world // self.stages

    def stage_of(self, rank: int) -> int:
        return rank % self.stages

    def replica_of(self, rank: int) -> int:
        return rank // self.stages

    def rank(self, replica: int, stage: int) -> int:
        return replica * self.stages + stage

    def pipeline_ranks(self, replica: int) -> list[int]:
        return [self.rank(replica, s) for s in range(self.stages)]

    def stage_ranks(self, stage: int) -> list[int]:
        return [self.rank(p, stage) for p in range(self.replicas)]

    def __str__(self) -> str:
        return f"{self.stages} stage{'s' * (self.stages > 1)} x {self.replicas} replica{'s' * (self.replicas > 1)}"


def replica_batch(global_batch: int, layout: Layout, policy: str, start: Layout) -> int:
    """Rows per replica and step. constant: the global batch is split over the replicas (the
    math of one process); per-replica: each replica keeps the starting share."""
    if policy == "per-replica":
        return global_batch // start.replicas
    return global_batch // layout.replicas


def lr_scale(layout: Layout, policy: str, start: Layout, scaling: str = "sqrt") -> float:
    """The LR's factor for the batch policy. per-replica grows the global batch r-fold
    (r = replicas now / at the start); the LR follows by `scaling`: "sqrt" multiplies it by
    sqrt(r) (the square-root rule for adaptive optimizers such as AdamW: Malladi et al., "On
    the SDEs and Scaling Rules for Adaptive Gradient Algorithms", NeurIPS 2022), "linear" by r
    (Goyal et al., "Accurate, Large Minibatch SGD", 2017, for SGD). constant: 1."""
    if policy != "per-replica":
        return 1.0
    growth = layout.replicas / start.replicas
    return growth if scaling == "linear" else growth ** 0.5


def ramped(old: float, new: float, steps_done: int, ramp_steps: int) -> float:
    """A factor moving from `old` to `new` linearly over `ramp_steps` optimizer steps after a
    change (Goyal et al.'s gradual warm-up, so the LR never jumps at a transition); `new`
    from step `ramp_steps` on, and at once with ramp_steps 0."""
    if ramp_steps <= 0 or steps_done >= ramp_steps:
        return new
    return old + (new - old) * max(0, steps_done) / ramp_steps


def replica_rows(order: torch.Tensor, step: int, global_batch: int, replica: int,
                 replicas: int) -> torch.Tensor:
    """Replica r of D takes rows [r*b, (r+1)*b) of each global batch (b = B / D), so the D
    replicas together see exactly the batch one process would."""
    assert global_batch % replicas == 0
    b = global_batch // replicas
    start = step * global_batch + replica * b
    return order[start:start + b]


def dropout_seed(seed: int, samples_seen: int, rank: int) -> int:
    """The seed of process `rank`'s random draws (dropout) for the step that starts after
    `samples_seen` samples: each process, so each replica, has its own stream (identical
    streams would give every replica the same masks), and a resumed run replays the same
    draws from the position alone, on CPU and GPU alike. splitmix64 of the three."""
    x = (seed * 0x9E3779B97F4A7C15 + samples_seen * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % 2**64
    for shift, mult in ((30, 0xBF58476D1CE4E5B9), (27, 0x94D049BB133111EB)):
        x = ((x ^ (x >> shift)) * mult) % 2**64
    return (x ^ (x >> 31)) % 2**63
