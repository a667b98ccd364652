"""What one process runs under one transition plan: its stage's units, the frozen prefix
(first stages only), the optimizer over its active parameters and the pipeline schedule.

Built by `build_runtime(plan, env, opt_state)`; rebuilt only by a transition (engine._transition).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .autodp import Layout
from .autodp.groups import Topology
from .autopipe import UnitCost
from .freeze_stats import meter_shard
from .models.base import StagedModel, Unit
from .timing import best_seconds

if TYPE_CHECKING:  # types only: pipelining loads slowly
    from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

    from .layouts import TransitionPlan

__all__ = ["LocalStep", "Runtime", "RuntimeEnv", "UnitSequence", "build_runtime", "clip_grad_norm",
           "profile_units", "span_loss", "unit_costs"]


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


@dataclass
class RuntimeEnv:
    """What every runtime of this process shares, whatever the plan."""
    model: StagedModel
    topo: Topology
    device: torch.device
    comm_device: torch.device  # where collectives run: the GPU under NCCL, else the CPU
    lr: float
    weight_decay: float
    schedule: str              # "gpipe" or "1f1b"
    dropout: bool
    compile: bool = False      # torch.compile the stage's module and the frozen prefix


@dataclass
class Runtime:
    """What one process runs under one plan."""
    plan: TransitionPlan
    stage: int
    replica: int
    units: list[Unit]                     # this stage's active units
    prefix: nn.Module | None              # frozen units (compiled or not), first stages only
    module: UnitSequence
    optimizer: torch.optim.Optimizer | None
    schedule: ScheduleGPipe | Schedule1F1B | LocalStep
    replica_group: dist.ProcessGroup | None
    pipeline_group: dist.ProcessGroup | None
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)  # active, this stage
    meter_params: dict[int, list] = field(default_factory=dict)  # by block, this replica's share (AutoFreeze)

    @property
    def frozen(self) -> int:
        return self.plan.frozen

    @property
    def layout(self) -> Layout:
        return self.plan.layout

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.layout.stages - 1


def unit_costs(model: StagedModel, seconds: dict[str, tuple[float, float]] | None = None) -> tuple[UnitCost, ...]:
    """The planner's view of `model`: each unit's place, size and (if profiled) times."""
    return tuple(UnitCost(u.name, u.freeze_index, u.cost(), seconds[u.name] if seconds else None,
                          sum(p.numel() * p.element_size() for p in u.module.parameters())) for u in model.units)


def _loss(logits, target):
    return F.cross_entropy(logits, target)


def span_loss(logits, target):
    """Question answering: logits (B, T, 2) and target (B, 2) start/end tokens; the mean of the
    start and end cross-entropies over the tokens, as Hugging Face's QA models compute it."""
    return (F.cross_entropy(logits[..., 0], target[:, 0]) + F.cross_entropy(logits[..., 1], target[:, 1])) / 2


class LocalStep:
    """A one-stage layout's step: what ScheduleGPipe computes for a single stage (forward,
    loss and backward per micro-batch, in order; gradients summed, then divided by the
    micro-batch count), without its machinery: no chunk specs, no per-chunk stage buffers,
    no send/receive bookkeeping. Same interface as the schedules (`step`, `eval`)."""

    def __init__(self, module: nn.Module, micro_batches: int, loss_fn):
        self.module, self.micro_batches, self.loss_fn = module, micro_batches, loss_fn

    def _chunks(self, args: tuple, target) -> list[tuple[tuple, torch.Tensor | None]]:
        m = self.micro_batches
        if m == 1:
            return [(args, target)]
        parts = [a.tensor_split(m) for a in args]  # as the pipeline's TensorChunkSpec(0) splits
        targets = target.tensor_split(m) if target is not None else [None] * m
        return [(tuple(p[i] for p in parts), targets[i]) for i in range(m)]

    def step(self, *args, target=None, losses: list | None = None):
        for x, y in self._chunks(args, target):
            loss = self.loss_fn(self.module(*x), y)
            loss.backward()
            if losses is not None:
                losses.append(loss.detach())
        if self.micro_batches > 1:
            grads = [p.grad for p in self.module.parameters() if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, self.micro_batches)

    def eval(self, *args, target=None, losses: list | None = None):
        outs = []
        for x, y in self._chunks(args, target):
            out = self.module(*x)
            if losses is not None and y is not None:
                losses.append(self.loss_fn(out, y))
            outs.append(out)
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def build_runtime(plan: TransitionPlan, env: RuntimeEnv, opt_state: dict[str, dict]) -> Runtime:
    model, layout, frozen = env.model, plan.layout, plan.frozen
    rank = env.topo.rank
    stage, replica = layout.stage_of(rank), layout.replica_of(rank)
    frozen_units = [u for u in model.units if u.freeze_index < frozen]
    active = [u for u in model.units if u.freeze_index >= frozen]
    mine = active[plan.bounds[stage]:plan.bounds[stage + 1]]
    on_device = set(map(id, mine)) | (set(map(id, frozen_units)) if stage == 0 else set())
    for u in model.units:  # only what this process runs stays on its device
        u.module.to(env.device if id(u) in on_device else "cpu")
        for p in u.module.parameters():
            p.requires_grad_(u.freeze_index >= frozen)
            p.grad = None
    prefix = UnitSequence(frozen_units, env.device).eval() if stage == 0 and frozen_units else None
    module = UnitSequence(mine, env.device).train(env.dropout)
    run_module: nn.Module = module
    if env.compile:  # compiled lazily on first use; the Trainer warms it up inside the transition
        # the last runtime's graphs are dead: drop them, or every rebuild adds entries for the
        # same forward code until dynamo's per-code limit silently falls back to eager
        torch._dynamo.reset()
        run_module = torch.compile(module)  # type: ignore[assignment]
        prefix = torch.compile(prefix) if prefix is not None else None  # type: ignore[assignment]
    params = [np for u in mine for np in model.named_parameters(u)]
    block_params: dict[int, list] = {}
    for u in mine:
        if u.name.startswith("block."):
            block_params.setdefault(u.freeze_index, []).extend(model.named_parameters(u))
    optimizer = _optimizer(params, env, opt_state) if params else None
    group = env.topo.pipeline_group(layout)
    sched: ScheduleGPipe | Schedule1F1B | LocalStep
    loss = span_loss if model.task == "qa" else _loss
    if layout.stages == 1:
        sched = LocalStep(run_module, plan.micro_batches, loss)
    else:
        # imported here: it pulls in DTensor and dynamo (3-4 s), which a one-stage run never needs
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
        pipe_stage = PipelineStage(run_module, stage, layout.stages, env.device, group=group)
        kind = ScheduleGPipe if env.schedule == "gpipe" else Schedule1F1B
        sched = kind(pipe_stage, n_microbatches=plan.micro_batches, loss_fn=loss)
    return Runtime(plan, stage, replica, mine, prefix, module, optimizer, sched,
                   env.topo.replica_group(layout), group, params,
                   meter_shard(block_params, replica, layout.replicas))


def _optimizer(params, env: RuntimeEnv, opt_state: dict[str, dict]) -> torch.optim.Optimizer:
    # No decay for biases and norms, as in BERT's recipe. Frozen parameters are not here at
    # all: they get no update, no decay and no optimizer state.
    decay = [p for n, p in params if p.ndim >= 2]
    no_decay = [p for n, p in params if p.ndim < 2]
    # fused: one kernel for all parameters (5x faster than the per-tensor loop on CPU; on a
    # GPU the per-step launch count is what a fast card waits on). It keeps `step` on the
    # parameter's device too.
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": env.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=env.lr, fused=True)
    for name, p in params:
        if name in opt_state:
            opt.state[p] = {k: v.to(p.device, torch.float32) if torch.is_tensor(v) else v
                            for k, v in opt_state[name].items()}
    return opt


def clip_grad_norm(rt: Runtime, max_norm: float, comm_device: torch.device) -> None:
    """Clip by the global norm over every stage's active gradients. Computed on the device,
    so no host sync: the pipeline group's all-reduce is the only sync point."""
    if max_norm <= 0:
        return
    grads = [p.grad for _, p in rt.params if p.grad is not None]
    sq = torch.zeros(1, dtype=torch.float64, device=comm_device)
    if grads:  # per-tensor norms in one multi-tensor kernel, summed in float64
        sq += torch.stack(torch._foreach_norm(grads)).double().pow(2).sum().to(comm_device)
    if rt.layout.stages > 1:
        dist.all_reduce(sq, group=rt.pipeline_group)
    if grads:
        coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        torch._foreach_mul_(grads, coef.to(grads[0].device, grads[0].dtype).squeeze())


def profile_units(model: StagedModel, inputs: tuple, device, names: set[str] | None = None
                  ) -> dict[str, tuple[float, float]]:
    """Per unit (of `names`, default all; the others only pass their output on), the
    best-of-3 seconds of (forward + backward, forward alone) on `inputs`, unit after unit on
    `device`, as training runs them (bf16 autocast on CUDA). The RNG state is restored and
    gradients cleared, so profiling changes no result."""
    device = torch.device(device)
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x, *extras = [t.to(device) for t in inputs]
        for unit in model.units:
            unit.module.to(device)
            seq = UnitSequence([unit], device)
            inp = x.detach().requires_grad_(x.is_floating_point())

            def run(backward: bool, seq=seq, inp=inp):
                y = seq(inp, *extras)
                y = y if torch.is_tensor(y) else y[0]
                if backward:
                    y.float().sum().backward()
                return y
            if names is None or unit.name in names:
                out[unit.name] = (best_seconds(lambda: run(True), device, grad=True),
                                  best_seconds(lambda: run(False), device))
            for p in unit.module.parameters():
                p.grad = None
            with torch.no_grad():
                x = run(False)
    return out
