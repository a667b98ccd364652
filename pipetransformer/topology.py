"""One object owns the device layout: W processes = K pipeline stages x D replicas.

Rank r sits in replica r // K at stage r % K, so each pipeline is a run of consecutive
ranks (on one machine when K divides the GPUs per node). The process groups of every
layout the run can reach are created once, in the same order on every rank: there are only
as many layouts as divisors of W, and creating groups per transition leaks descriptors.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

__all__ = ["Layout", "Topology", "divisors"]


def divisors(n: int) -> list[int]:
    return [d for d in range(n, 0, -1) if n % d == 0]


@dataclass(frozen=True)
class Layout:
    world: int
    stages: int

    def __post_init__(self):
        if self.stages < 1 or self.world % self.stages:
            raise ValueError(f"--stages={self.stages} must divide the number of processes "
                             f"({self.world}); valid: {divisors(self.world)}")

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


class Topology:
    """Process groups for all layouts of `world` processes; this rank's view of each."""

    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank
        self._pipeline: dict[int, object] = {}  # stages -> this rank's pipeline group
        self._replicas: dict[int, object] = {}  # stages -> this rank's data-parallel group
        for k in divisors(world):
            layout = Layout(world, k)
            for p in range(layout.replicas):
                g = self._group(layout.pipeline_ranks(p))
                if layout.replica_of(rank) == p:
                    self._pipeline[k] = g
            for s in range(k):
                g = self._group(layout.stage_ranks(s))
                if layout.stage_of(rank) == s:
                    self._replicas[k] = g

    def _group(self, ranks: list[int]):
        if len(ranks) == self.world:
            return dist.group.WORLD
        return dist.new_group(ranks)  # every rank calls this for every group, in one order

    def pipeline_group(self, layout: Layout):
        return self._pipeline[layout.stages]

    def replica_group(self, layout: Layout):
        return self._replicas[layout.stages]

    def destroy(self) -> None:
        for g in {id(g): g for g in [*self._pipeline.values(), *self._replicas.values()]}.values():
            if g is not dist.group.WORLD and g is not None:
                dist.destroy_process_group(g)
        self._pipeline.clear()
        self._replicas.clear()
