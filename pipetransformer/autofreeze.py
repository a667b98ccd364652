"""AutoFreeze: how many bottom blocks are frozen after each decision point.

The paper's rule, with L blocks, freeze ratio alpha and g_T^l the gradient of block l
accumulated over interval T:

    k_T = min( k_{T-1} + alpha * (L - k_{T-1}),  argmin_{l in [k_{T-1}, L)} ||g_T^l|| (+ 1) )

The first term caps the pace. It is tracked as a real number (`budget`) so that, with the
gradient term off, it reproduces the closed form ceil(L * (1 - (1 - alpha)^T)); when the
gradient term binds, the budget restarts from the integer k. k never decreases.

The second term has two readings (`rule`):
- "through-min" (the default): freeze up to *and including* the block with the smallest
  accumulated gradient norm (blocks are 0-indexed, hence the +1), the block judged
  converged; every decision freezes at least one more block.
- "below-min": the paper's formula as printed, without the +1: only the blocks below the one with the
  smallest norm freeze, so none do when the lowest active block has the smallest norm.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["MODES", "RULES", "FreezeState", "decide", "closed_form", "GradNormMeter", "decide_across_world",
           "meter_shard"]

MODES = ("off", "schedule", "adaptive")
RULES = ("through-min", "below-min")
_EPS = 1e-9  # so that ceil(4.0000000001) from float error stays 4


@dataclass
class FreezeState:
    """Everything AutoFreeze remembers between decisions."""
    num_blocks: int
    frozen: int = 0            # k: blocks 0..k-1 are frozen (the embedding freezes with block 0)
    budget: float = 0.0        # real-valued cap term, see module docstring
    decisions: int = 0         # T

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def closed_form(num_blocks: int, alpha: float, decisions: int) -> int:
    """k_T with the gradient term switched off: ceil(L * (1 - (1 - alpha)^T))."""
    return min(num_blocks, _ceil(num_blocks * (1.0 - (1.0 - alpha) ** decisions)))


def decide(state: FreezeState, alpha: float, mode: str, grad_norms: Sequence[float] | None = None,
           rule: str = "through-min") -> int:
    """Apply one decision to `state` in place and return the new k.

    mode "off": never freeze; "schedule": the cap alone (closed form);
    "adaptive": the cap and the gradient-norm term (needs grad_norms, one per block), read
    by `rule` (module docstring).
    """
    if mode not in MODES:
        raise ValueError(f"freeze mode {mode!r}: choose one of {MODES}")
    if rule not in RULES:
        raise ValueError(f"freeze rule {rule!r}: choose one of {RULES}")
    L, k = state.num_blocks, state.frozen
    state.decisions += 1
    if mode == "off" or k >= L:
        return k
    budget = state.budget + alpha * (L - state.budget)
    cap = min(L, _ceil(budget))
    new_k = cap
    if mode == "adaptive":
        if grad_norms is None or len(grad_norms) != L:
            raise ValueError(f"adaptive freezing needs {L} gradient norms, got "
                             f"{None if grad_norms is None else len(grad_norms)}")
        norms = [float(n) for n in grad_norms]
        active = norms[k:]
        smallest = k + min(range(len(active)), key=active.__getitem__)
        new_k = min(cap, smallest + 1 if rule == "through-min" else smallest)
    assert new_k >= k
    state.frozen = new_k
    state.budget = budget if new_k == cap else float(new_k)
    return new_k


def meter_shard(block_params: dict[int, list[tuple[str, torch.Tensor]]], replica: int,
                replicas: int) -> dict[int, list[tuple[str, torch.Tensor]]]:
    """The parameters whose gradient sums replica `replica` of `replicas` keeps: every
    replica holds the same averaged gradients, so each keeps a disjoint share (round robin
    over the stage's parameters in order) and no process holds a copy of them all."""
    out: dict[int, list[tuple[str, torch.Tensor]]] = {}
    i = 0
    for block, params in block_params.items():
        for name, p in params:
            if i % replicas == replica:
                out.setdefault(block, []).append((name, p))
            i += 1
    return out


class GradNormMeter:
    """Accumulates each block's gradient over a decision interval; reports the norms.

    The gradient *vectors* are summed over every step of the interval (the paper's
    accumulated gradient), and the norm is taken once at the end. The gradients are read
    after averaging over replicas and before clipping (a clip factor would reweight each
    step). Each process tracks its share of its stage's parameters (`meter_shard`);
    `squared_norms()` returns partial sums to be all-reduced over the world.
    """

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._sums: dict[tuple[int, str], torch.Tensor] = {}

    def accumulate(self, block_params: dict[int, list[tuple[str, torch.Tensor]]]) -> None:
        sums, grads = [], []
        with torch.no_grad():
            for block, params in block_params.items():
                for name, p in params:
                    if p.grad is None:
                        continue
                    key = (block, name)
                    if key in self._sums:
                        sums.append(self._sums[key])
                        grads.append(p.grad)
                    else:
                        self._sums[key] = p.grad.detach().float().clone()
            if sums:  # one multi-tensor kernel, not one per parameter: this runs every step
                torch._foreach_add_(sums, grads)

    def squared_norms(self) -> torch.Tensor:
        """Per block, the sum over owned parameters of ||accumulated grad||^2 (float64)."""
        out = torch.zeros(self.num_blocks, dtype=torch.float64)
        for (block, _), g in self._sums.items():
            out[block] += g.double().pow(2).sum().cpu()
        return out

    def reset(self) -> None:
        self._sums.clear()

    def named_sums(self) -> dict[str, torch.Tensor]:
        """The interval's sums so far by parameter name (for checkpoints)."""
        return {name: g for (_, name), g in self._sums.items()}

    def restore(self, block_params: dict[int, list[tuple[str, torch.Tensor]]],
                sums: dict[str, torch.Tensor]) -> None:
        """Take back sums saved by `named_sums` for the blocks this process now owns."""
        self._sums = {(block, name): sums[name].float().to(p.device)
                      for block, params in block_params.items() for name, p in params if name in sums}


def decide_across_world(state: FreezeState, meter: GradNormMeter, alpha: float, mode: str,
                        comm_device: torch.device, rule: str = "through-min") -> int:
    """One decision for the whole run: the interval's squared norms are summed over every
    process (each parameter counted once: the replicas of a stage share its parameters out,
    `meter_shard`), rank 0 decides, every rank takes its k. Collective."""
    sq = meter.squared_norms().to(comm_device)
    dist.all_reduce(sq)
    meter.reset()
    k = torch.tensor([decide(state, alpha, mode, sq.cpu().sqrt().tolist(), rule)], device=comm_device)
    dist.broadcast(k, src=0)
    state.frozen = int(k)
    return state.frozen
