"""What one process runs under one transition plan: its stage's units, the frozen prefix
(first stages only), the optimizer over its active parameters and the pipeline schedule.

Built by `build_runtime(plan, env, opt_state)`; rebuilt only by transition.apply.
"""
from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from .autodp import Layout, Topology
from .autopipe import UnitCost
from .models.base import StagedModel, Unit
from .timing import best_seconds

if TYPE_CHECKING:  # transition.apply builds runtimes: the import runs the other way
    from .costs import Profile
    from .transition import TransitionPlan

__all__ = ["Runtime", "RuntimeEnv", "UnitSequence", "build_runtime", "clip_grad_norm", "profile_units",
           "unit_costs", "UnitTiming", "time_units", "measure_profile", "synthetic_inputs"]


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


@dataclass
class Runtime:
    """What one process runs under one plan."""
    plan: TransitionPlan
    stage: int
    replica: int
    units: list[Unit]                     # this stage's active units
    prefix: UnitSequence | None           # frozen units, run on first stages only
    module: UnitSequence
    optimizer: torch.optim.Optimizer | None
    schedule: ScheduleGPipe | Schedule1F1B
    replica_group: dist.ProcessGroup | None
    pipeline_group: dist.ProcessGroup | None
    params: list[tuple[str, nn.Parameter]] = field(default_factory=list)  # active, this stage
    block_params: dict[int, list] = field(default_factory=dict)  # the same, by block (AutoFreeze)

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
    return tuple(UnitCost(u.name, u.freeze_index, u.cost(), seconds[u.name] if seconds else None)
                 for u in model.units)


def _loss(logits, target):
    return F.cross_entropy(logits, target)


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
    params = [np for u in mine for np in model.named_parameters(u)]
    block_params: dict[int, list] = {}
    for u in mine:
        if u.name.startswith("block."):
            block_params.setdefault(u.freeze_index, []).extend(model.named_parameters(u))
    optimizer = _optimizer(params, env, opt_state) if params else None
    group = env.topo.pipeline_group(layout)
    pipe_stage = PipelineStage(module, stage, layout.stages, env.device, group=group)
    kind = ScheduleGPipe if env.schedule == "gpipe" else Schedule1F1B
    sched = kind(pipe_stage, n_microbatches=plan.micro_batches, loss_fn=_loss)
    return Runtime(plan, stage, replica, mine, prefix, module, optimizer, sched,
                   env.topo.replica_group(layout), group, params, block_params)


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


@dataclass(frozen=True)
class UnitTiming:
    train_seconds: float    # forward + backward
    forward_seconds: float  # forward without gradients
    output_bytes: int       # the unit's output for the whole batch
    saved_bytes: int        # tensors autograd keeps for the backward pass, whole batch


def time_units(model: StagedModel, inputs: tuple, device, repeat: int = 3) -> dict[str, UnitTiming]:
    """Per unit, best-of-`repeat` seconds of forward + backward and of forward alone on `inputs`,
    unit after unit on `device`, as training runs them (bf16 autocast on CUDA), and the bytes
    of its output and of what it saves for backward. The RNG state is restored and gradients
    cleared, so profiling changes no result."""
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
            train = forward = float("inf")
            for _ in range(repeat):  # interleaved, so both see the same spells of a busy machine
                train = min(train, best_seconds(lambda: run(True), device, 1, grad=True))
                forward = min(forward, best_seconds(lambda: run(False), device, 1))
            saved = _saved_bytes(lambda: run(False), {p.untyped_storage().data_ptr()
                                                      for p in unit.module.parameters()})
            for p in unit.module.parameters():
                p.grad = None
            with torch.no_grad():
                x = run(False)
            out[unit.name] = UnitTiming(train, forward, x.numel() * x.element_size(), saved)
    return out


def _saved_bytes(fn: Callable[[], object], weights: set[int]) -> int:
    """Bytes autograd keeps for the backward pass of fn(): activations only (tensors on the
    weights' storage left out), each stored tensor counted once."""
    saved: dict[tuple, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage().data_ptr()
        if storage not in weights:
            saved[(storage, t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        fn()
    return sum(saved.values())


def profile_units(model: StagedModel, inputs: tuple, device) -> dict[str, tuple[float, float]]:
    """Per unit, (forward + backward, forward alone) seconds on `inputs` (see time_units)."""
    return {name: (t.train_seconds, t.forward_seconds) for name, t in time_units(model, inputs, device).items()}


def measure_profile(model: StagedModel, name: str, batch_sizes: Sequence[int], seq_len: int, device) -> Profile:
    """The planner's profile of `model` on `device`: every unit timed at each batch size on
    synthetic rows of `seq_len` tokens (or pixels a side), with dropout on as in training,
    its sizes, and its parameters' optimizer step. Changes no weight and no RNG state."""
    from .costs import Profile, UnitProfile
    device = torch.device(device)
    mode = model.hf_model.training
    model.hf_model.train()
    try:
        timings = [time_units(model, synthetic_inputs(model, n, seq_len), device, repeat=5) for n in batch_sizes]
    finally:
        model.hf_model.train(mode)
    rows = batch_sizes[-1]
    units = tuple(UnitProfile(
        u.name, u.freeze_index, u.cost(), sum(p.numel() * p.element_size() for p in u.module.parameters()),
        timings[-1][u.name].output_bytes / rows, timings[-1][u.name].saved_bytes / rows,
        tuple(t[u.name].forward_seconds for t in timings),
        tuple(max(0.0, t[u.name].train_seconds - t[u.name].forward_seconds) for t in timings),
        _update_seconds(u, device)) for u in model.units)
    cuda = device.type == "cuda"
    if cuda:
        props = torch.cuda.get_device_properties(device)
        device_name, memory = props.name, props.total_memory
    else:
        device_name, memory = f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)", 0
    return Profile(name, model.modality, units, tuple(batch_sizes), seq_len, device.type, device_name,
                   torch.get_num_threads(), "bfloat16" if cuda else "float32", time.strftime("%Y-%m-%d"),
                   memory / 1e9, torch.__version__)


def synthetic_inputs(model: StagedModel, rows: int, seq_len: int) -> tuple:
    """Model inputs of the right kind and shape: random tokens, every position attended (text
    is padded to the full length in training), or random pixels."""
    g = torch.Generator().manual_seed(0)
    if model.modality == "text":
        vocab = model.hf_model.config.vocab_size
        return model.inputs({"input_ids": torch.randint(5, vocab, (rows, seq_len), generator=g),
                             "attention_mask": torch.ones(rows, seq_len, dtype=torch.long)})
    return model.inputs({"pixel_values": torch.randn(rows, 3, seq_len, seq_len, generator=g)})


def _update_seconds(unit: Unit, device: torch.device) -> float:
    """Seconds of one step's per-parameter work on a copy of the unit's parameters: fused AdamW,
    the clipping norm and the AutoFreeze gradient sum."""
    params = [nn.Parameter(p.detach().to(device).clone()) for p in unit.module.parameters()]
    if not params:
        return 0.0
    grads = [torch.full_like(p, 1e-3) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    sums = [torch.zeros_like(p) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        torch._foreach_norm(grads)
        torch._foreach_add_(sums, grads)
        opt.step()
    return best_seconds(step, device)
