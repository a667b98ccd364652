"""AutoDP's torch side: the process groups of every layout (`Topology`) and the replicas'
gradient average (`average_gradients`)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..autopipe import divisors
from . import Layout

__all__ = ["Topology", "average_gradients"]


class Topology:
    """Process groups for all layouts of `world` processes; this rank's view of each."""

    def __init__(self, world: int, rank: int):
        self.world, self.rank = world, rank
        self._pipeline: dict[int, dist.ProcessGroup | None] = {}  # stages -> this rank's pipeline group
        self._replicas: dict[int, dist.ProcessGroup | None] = {}  # stages -> its data-parallel group
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

    def _group(self, ranks: list[int]) -> dist.ProcessGroup | None:
        if len(ranks) == self.world:
            return dist.group.WORLD
        return dist.new_group(ranks)  # every rank calls this for every group, in one order

    def pipeline_group(self, layout: Layout) -> dist.ProcessGroup | None:
        return self._pipeline[layout.stages]

    def replica_group(self, layout: Layout) -> dist.ProcessGroup | None:
        return self._replicas[layout.stages]

    def destroy(self) -> None:
        for g in {id(g): g for g in [*self._pipeline.values(), *self._replicas.values()]}.values():
            if g is not dist.group.WORLD and g is not None:
                dist.destroy_process_group(g)
        self._pipeline.clear()
        self._replicas.clear()


def average_gradients(params: list[torch.nn.Parameter], layout: Layout, group) -> None:
    """Average the active gradients over the stage's replicas, in one flat all-reduce (a
    missing gradient counts as zero). Sync point."""
    if not params or layout.replicas == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= layout.replicas
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)
