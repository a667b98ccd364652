"""The ONE place that applies a freeze decision or a layout change.

`build_runtime` turns (frozen count k, layout) into this process's working objects: its
stage's units, the frozen prefix (first stages only), the optimizer over its active
parameters and the pipeline schedule. `migrate` brings every process's copy of the model
and the optimizer state up to date before a rebuild: each unit that was trainable is
broadcast from the process that trained it, so whoever owns it next starts from the
current weights and Adam moments. Frozen units never change after the broadcast that
froze them, and every process already holds them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from .cache import best_seconds
from .models import StagedModel, Unit
from .partition import DEFAULT_FROZEN_FACTOR, Plan, balance, choose_microbatches
from .topology import Layout, Topology

__all__ = ["Runtime", "UnitSequence", "build_runtime", "migrate", "plan_layout", "profile_units",
           "split_units", "memory_costs"]


class UnitSequence(nn.Module):
    """Units run in order; passes the extras (attention mask) along except after the head."""

    def __init__(self, units: list[Unit], device):
        super().__init__()
        self.units = nn.ModuleList(u.module for u in units)
        self.ends_with_head = bool(units) and units[-1].name == "head"
        self.bf16 = torch.device(device).type == "cuda"  # bf16 autocast on CUDA, fp32 on CPU

    def forward(self, x, *extras):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.bf16):
            for unit in self.units:
                x = unit(x, *extras)
        return x if self.ends_with_head else (x, *extras)


def split_units(model: StagedModel, frozen: int) -> tuple[list[Unit], list[Unit]]:
    """(frozen units, active units) with k = `frozen` blocks frozen."""
    return ([u for u in model.units if u.freeze_index < frozen],
            [u for u in model.units if u.freeze_index >= frozen])


def memory_costs(frozen_units: list[Unit], active: list[Unit]) -> tuple[list[float], float]:
    """(active units' costs, the frozen prefix's cost) by parameter size; a frozen unit holds
    no gradients and no Adam state, so it weighs the partitioner's frozen factor (1/6)."""
    return [u.cost() for u in active], DEFAULT_FROZEN_FACTOR * sum(u.cost() for u in frozen_units)


def plan_layout(model: StagedModel, frozen: int, stages: int,
                by_memory: bool = False) -> tuple[list[Unit], list[Unit], Plan]:
    """(frozen units, active units, partition of the active units over `stages`).

    Balanced by measured time when the model carries a profile (frozen units then cost their
    forward pass on stage 0), else, or with `by_memory`, by parameter size (`memory_costs`)."""
    frozen_units, active = split_units(model, frozen)
    seconds = None if by_memory else model.unit_seconds
    if seconds:
        costs = [seconds[u.name][0] for u in active]
        frozen_cost = sum(seconds[u.name][1] for u in frozen_units)
    else:
        costs, frozen_cost = memory_costs(frozen_units, active)
    return frozen_units, active, balance(costs, stages, frozen_cost=frozen_cost)


def profile_units(model: StagedModel, inputs: tuple, device) -> dict[str, tuple[float, float]]:
    """Per unit, the best-of-3 seconds of (forward + backward, forward alone) on `inputs`,
    unit after unit on `device`, as training runs them (bf16 autocast on CUDA). The RNG
    state is restored and gradients cleared, so profiling changes no result."""
    device = torch.device(device)
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x, *extras = [t.to(device) for t in inputs]
        for unit in model.units:
            unit.module.to(device)
            seq = UnitSequence([unit], device)
            inp = x.detach().requires_grad_(x.is_floating_point())

            def run(backward: bool):
                y = seq(inp, *extras)
                y = y if torch.is_tensor(y) else y[0]
                if backward:
                    y.float().sum().backward()
                return y
            out[unit.name] = (best_seconds(lambda: run(True), device, grad=True),
                              best_seconds(lambda: run(False), device))
            for p in unit.module.parameters():
                p.grad = None
            with torch.no_grad():
                x = run(False)
    return out


@dataclass
class Runtime:
    """What one process runs under one (k, layout)."""
    frozen: int
    layout: Layout
    stage: int
    replica: int
    micro_batches: int
    units: list[Unit]                     # this stage's active units
    prefix: UnitSequence | None           # frozen units, run on first stages only
    module: UnitSequence
    optimizer: torch.optim.Optimizer | None
    schedule: object
    replica_group: object
    pipeline_group: object
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)  # active, this stage
    block_params: dict[int, list] = field(default_factory=dict)  # the same, by block (AutoFreeze)
    plan: Plan | None = None              # the split of the active units over the stages

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.layout.stages - 1


def _loss(logits, target):
    return F.cross_entropy(logits, target)


def build_runtime(model: StagedModel, frozen: int, layout: Layout, topo: Topology, device,
                  micro_batches: int, replica_batch: int, schedule: str, optim: dict,
                  opt_state: dict[str, dict], dropout: bool) -> Runtime:
    rank = topo.rank
    stage, replica = layout.stage_of(rank), layout.replica_of(rank)
    frozen_units, active, plan = plan_layout(model, frozen, layout.stages)
    mine = active[plan.bounds[stage]:plan.bounds[stage + 1]]
    on_device = set(map(id, mine)) | (set(map(id, frozen_units)) if stage == 0 else set())
    for u in model.units:  # only what this process runs stays on its device
        u.module.to(device if id(u) in on_device else "cpu")
        for p in u.module.parameters():
            p.requires_grad_(u.freeze_index >= frozen)
            p.grad = None
    prefix = UnitSequence(frozen_units, device).eval() if stage == 0 and frozen_units else None
    module = UnitSequence(mine, device).train(dropout)
    params = [np for u in mine for np in model.named_parameters(u)]
    block_params: dict[int, list] = {}
    for u in mine:
        if u.name.startswith("block."):
            block_params.setdefault(u.freeze_index, []).extend(model.named_parameters(u))
    optimizer = _optimizer(params, optim, opt_state) if params else None
    m = micro_batches or choose_microbatches(layout.stages, replica_batch)
    if replica_batch % m:
        raise ValueError(f"--micro-batches={m} must divide the per-replica batch ({replica_batch}); "
                         f"pick a divisor of it or 0 for automatic")
    group = topo.pipeline_group(layout)
    pipe_stage = PipelineStage(module, stage, layout.stages, device, group=group)
    kind = ScheduleGPipe if schedule == "gpipe" else Schedule1F1B
    sched = kind(pipe_stage, n_microbatches=m, loss_fn=_loss)
    return Runtime(frozen, layout, stage, replica, m, mine, prefix, module, optimizer, sched,
                   topo.replica_group(layout), group, params, block_params, plan)


def _optimizer(params, optim: dict, opt_state: dict[str, dict]) -> torch.optim.Optimizer:
    # No decay for biases and norms, as in BERT's recipe. Frozen parameters are not here at
    # all: they get no update, no decay and no optimizer state.
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    # fused: one kernel for all parameters (5x faster than the per-tensor loop on CPU; on a
    # GPU the per-step launch count is what a fast card waits on). It keeps `step` on the
    # parameter's device too.
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": optim["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=optim["lr"], fused=True)
    for name, p in params:
        if name in opt_state:
            opt.state[p] = {k: v.to(p.device, torch.float32) if torch.is_tensor(v) else v
                            for k, v in opt_state[name].items()}
    return opt


def owners(model: StagedModel, runtime: Runtime) -> dict[str, int]:
    """Unit name -> the rank holding its authoritative copy (replica 0) under `runtime`."""
    frozen_units, active = split_units(model, runtime.frozen)
    layout, bounds = runtime.layout, runtime.plan.bounds
    out = {u.name: layout.rank(0, 0) for u in frozen_units}
    for s in range(layout.stages):
        for u in active[bounds[s]:bounds[s + 1]]:
            out[u.name] = layout.rank(0, s)
    return out


def migrate(model: StagedModel, runtime: Runtime, new_frozen: int, has_state: bool,
            comm_device) -> dict[str, dict]:
    """Broadcast every trained unit from its owner; return the optimizer state (by parameter
    name) of the units that stay active."""
    own = owners(model, runtime)
    rank = dist.get_rank()
    local_state = {}
    if runtime.optimizer is not None:
        names = {id(p): n for n, p in runtime.params}
        local_state = {names[id(p)]: s for p, s in runtime.optimizer.state.items()}
    keep_state: dict[str, dict] = {}
    for unit in model.units:
        if unit.freeze_index < runtime.frozen:
            continue  # frozen before: identical everywhere already
        params = model.named_parameters(unit)
        with_state = has_state and unit.freeze_index >= new_frozen  # same on every rank
        tensors = [p.data for _, p in params]
        if with_state:
            tensors += _state_tensors(params, local_state, rank == own[unit.name])
        flat = _broadcast_flat(tensors, own[unit.name], comm_device)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        if with_state:
            n = len(params)
            for i, (name, p) in enumerate(params):
                keep_state[name] = {"step": tensors[n + 3 * i + 2].detach().cpu().view(()).clone(),
                                    "exp_avg": tensors[n + 3 * i], "exp_avg_sq": tensors[n + 3 * i + 1]}
    return keep_state


def _state_tensors(params, local_state, is_owner):
    out = []
    for name, p in params:
        if is_owner and name in local_state:
            s = local_state[name]
            out += [s["exp_avg"].detach().clone(), s["exp_avg_sq"].detach().clone(),
                    torch.as_tensor(s["step"], dtype=p.dtype, device=p.device).detach().clone().view(1)]
        else:
            out += [torch.zeros_like(p.data), torch.zeros_like(p.data),
                    torch.zeros(1, dtype=p.dtype, device=p.device)]
    return out


def _broadcast_flat(tensors, src: int, comm_device) -> torch.Tensor:
    flat = torch.cat([t.detach().reshape(-1).to(comm_device, torch.float32) for t in tensors])
    dist.broadcast(flat, src=src)
    return flat
