"""What AutoFreeze's policies judge, gathered while training: per block, over a decision
interval, on every process its share of the parameters (`meter_shard`), summed over the
world at the decision (`decide_across_world`)."""
from __future__ import annotations

import torch
import torch.distributed as dist

from .autofreeze import PAPER, FreezePolicy, FreezeState, decide

__all__ = ["BlockMeter", "block_statistic", "decide_across_world", "meter_shard"]


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


class BlockMeter:
    """Gathers each block's statistic over a decision interval, for `FreezePolicy.statistic`:

    - "grad_norm": the gradient *vectors* summed over every step of the interval (the paper's
      accumulated gradient), the norm taken once at the end. The gradients are read after
      averaging over replicas and before clipping (a clip factor would reweight each step).
    - "update": the weights as the interval began, kept to measure how far they moved.

    Each process tracks its share of its stage's parameters (`meter_shard`); `partials()`
    returns per-block sums to be all-reduced over the world.
    """

    def __init__(self, num_blocks: int, statistic: str = "grad_norm"):
        self.num_blocks, self.statistic = num_blocks, statistic
        self._kept: dict[tuple[int, str], torch.Tensor] = {}  # gradient sums, or starting weights
        self._params: dict[tuple[int, str], torch.Tensor] = {}

    def accumulate(self, block_params: dict[int, list[tuple[str, torch.Tensor]]]) -> None:
        """Once per step, after the replica average and before the optimizer step."""
        if self.statistic == "update" and self._kept:
            return  # the interval's starting weights are kept: nothing to do until the decision
        sums, grads = [], []
        with torch.no_grad():
            for block, params in block_params.items():
                for name, p in params:
                    key = (block, name)
                    if self.statistic == "update":
                        if key not in self._kept:
                            self._kept[key], self._params[key] = p.detach().float().clone(), p
                    elif p.grad is None:
                        continue
                    elif key in self._kept:
                        sums.append(self._kept[key])
                        grads.append(p.grad)
                    else:
                        self._kept[key] = p.grad.detach().float().clone()
            if sums:  # one multi-tensor kernel, not one per parameter: this runs every step
                torch._foreach_add_(sums, grads)

    def partials(self) -> torch.Tensor:
        """(2, blocks) float64: per block, the sum over this process's parameters of the squared
        accumulated gradient ("grad_norm") or the squared change of the weights ("update"),
        and their element count."""
        out = torch.zeros(2, self.num_blocks, dtype=torch.float64)
        with torch.no_grad():
            for (block, name), kept in self._kept.items():
                x = kept if self.statistic == "grad_norm" else self._params[(block, name)].float() - kept
                out[0, block] += x.double().pow(2).sum().cpu()
                out[1, block] += kept.numel()
        return out

    def reset(self) -> None:
        self._kept.clear()
        self._params.clear()

    def named_sums(self) -> dict[str, torch.Tensor]:
        """What the interval has kept so far, by parameter name (for checkpoints)."""
        return {name: g for (_, name), g in self._kept.items()}

    def restore(self, block_params: dict[int, list[tuple[str, torch.Tensor]]],
                sums: dict[str, torch.Tensor]) -> None:
        """Take back what `named_sums` saved, for the parameters this process now tracks."""
        self._kept, self._params = {}, {}
        for block, params in block_params.items():
            for name, p in params:
                if name in sums:
                    self._kept[(block, name)], self._params[(block, name)] = sums[name].float().to(p.device), p


def block_statistic(partials: torch.Tensor, statistic: str, lr_sum: float, steps: int) -> list[float]:
    """Per block, from the world's summed `BlockMeter.partials`: the accumulated gradient's
    norm, or the update's drift: the per-weight move ||dw|| / sqrt(n) over what a random walk
    of the interval's steps would move, lr_sum / sqrt(steps) (`FreezePolicy`; 0 where nothing
    was measured)."""
    squared, count = partials[0].double(), partials[1].double()
    if statistic == "grad_norm":
        return squared.sqrt().tolist()
    per_weight = (squared / count.clamp(min=1)).sqrt()
    walk = lr_sum / steps ** 0.5 if steps else 0.0
    return (per_weight / walk if walk > 0 else torch.zeros_like(per_weight)).tolist()


def decide_across_world(state: FreezeState, meter: BlockMeter, alpha: float, mode: str,
                        comm_device: torch.device, policy: FreezePolicy = PAPER) -> int:
    """One decision for the whole run: the interval's per-block partial sums are summed over
    every process (each parameter counted once: the replicas of a stage share its parameters
    out, `meter_shard`), every rank decides on the same numbers, rank 0's k holds.
    Collective."""
    partials = meter.partials().to(comm_device)
    dist.all_reduce(partials)
    meter.reset()
    stat = block_statistic(partials.cpu(), meter.statistic, state.history.pop("lr_sum", 0.0),
                           state.history.pop("steps", 0))
    k = torch.tensor([decide(state, alpha, mode, stat, policy)], device=comm_device)
    dist.broadcast(k, src=0)
    state.frozen = int(k)
    return state.frozen
