"""The pure half of a transition: from the run's fixed facts (`PlanInputs`), a frozen count
and a stage count, `plan(...)` returns a `TransitionPlan` (layout, stage bounds, owners,
micro-batches); `next_plan` adds AutoPipe's rule for the stage count after a freeze. Unit
tests and the planner call these without devices; the Trainer (engine._transition) carries a plan out.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

from .autodp import Layout, replica_batch
from .autopipe import UnitCost, balance, balance_costs, choose_microbatches, layout_memory, next_stage_count

__all__ = ["PlanInputs", "TransitionPlan", "plan", "next_plan"]


@dataclass(frozen=True)
class PlanInputs:
    """The run's fixed facts that every plan depends on."""
    units: tuple[UnitCost, ...]
    world: int
    start_stages: int
    elastic: bool = True
    global_batch: int = 32
    batch_policy: str = "constant"
    micro_batches: int = 0  # 0: automatic, by `choose_micro_batches` if given, else autopipe.choose_microbatches
    # --micro-batches auto in training: the planner's choice for a plan (planner.micro_batch_rule)
    choose_micro_batches: Callable[[TransitionPlan], int] | None = field(default=None, compare=False, repr=False)

    @property
    def start(self) -> Layout:
        return Layout(self.world, self.start_stages)

    @cached_property
    def budget(self) -> float:
        """The compression budget: the fullest stage's memory in the starting layout."""
        return layout_memory(self.units, 0, self.start_stages)


@dataclass(frozen=True)
class TransitionPlan:
    frozen: int                      # blocks 0..frozen-1 frozen
    layout: Layout
    bounds: tuple[int, ...]          # stage s runs active units bounds[s]..bounds[s+1]-1
    stage_costs: tuple[float, ...]
    owners: dict[str, int]           # unit name -> rank holding its authoritative copy
    micro_batches: int
    replica_batch: int

    def units_per_stage(self) -> str:
        return "+".join(str(b - a) for a, b in zip(self.bounds, self.bounds[1:]))


def plan(inputs: PlanInputs, frozen: int, stages: int) -> TransitionPlan:
    """`frozen` blocks frozen, the active units balanced over `stages` stages."""
    layout = Layout(inputs.world, stages)
    active, frozen_cost = balance_costs(inputs.units, frozen)
    split = balance(active, stages, frozen_cost=frozen_cost)
    active_names = [u.name for u in inputs.units if u.freeze_index >= frozen]
    owners = {u.name: layout.rank(0, 0) for u in inputs.units if u.freeze_index < frozen}
    for s in range(stages):
        for name in active_names[split.bounds[s]:split.bounds[s + 1]]:
            owners[name] = layout.rank(0, s)
    batch = replica_batch(inputs.global_batch, layout, inputs.batch_policy, inputs.start)
    m = inputs.micro_batches or choose_microbatches(stages, batch)
    tp = TransitionPlan(frozen, layout, split.bounds, split.stage_costs, owners, m, batch)
    if not inputs.micro_batches and inputs.choose_micro_batches is not None:
        tp = replace(tp, micro_batches=inputs.choose_micro_batches(tp))
    return tp


def next_plan(inputs: PlanInputs, current: TransitionPlan, frozen: int) -> TransitionPlan:
    """The plan after freezing to `frozen`: AutoPipe's stage count, then a fresh balance."""
    stages = next_stage_count(inputs.units, frozen, current.layout.stages, inputs.world,
                              inputs.budget, inputs.elastic)
    return plan(inputs, frozen, stages)
