"""Weights on the move at a transition: every unit that was trainable is broadcast from the
process that trained it (with its Adam moments when it stays active), so whoever owns it
next starts from the current weights. Frozen units never change after the broadcast that
froze them, and every process already holds them.

The Trainer (engine._transition) reads a transition top-down: decide, plan (layouts, pure),
`migrate` here, rebuild the runtime, advance the cache, each phase timed there.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from .runtime import Runtime, RuntimeEnv

__all__ = ["migrate", "broadcast_weights"]


def broadcast_weights(rt: Runtime, env: RuntimeEnv) -> None:
    """Bring every trained weight to every process (before saving). Collective."""
    migrate(rt, rt.frozen, False, env)


def migrate(old: Runtime, new_frozen: int, has_state: bool, env: RuntimeEnv) -> dict[str, dict]:
    """Broadcast every unit trained under `old` from its owner (collective); return the
    optimizer state (by parameter name) of the units that stay active."""
    model, rank = env.model, dist.get_rank()
    local_state = {}
    if old.optimizer is not None:
        names = {id(p): n for n, p in old.params}
        local_state = {names[id(p)]: s for p, s in old.optimizer.state.items()}
    keep: dict[str, dict] = {}
    for unit in model.units:
        if unit.freeze_index < old.frozen:
            continue  # frozen before: identical everywhere already
        owner = old.plan.owners[unit.name]
        params = model.named_parameters(unit)
        slots = [p.data for _, p in params]
        states: dict[str, dict[str, torch.Tensor]] = {}
        if has_state and unit.freeze_index >= new_frozen:  # the same on every rank
            states = {name: _adam_slots(p, local_state.get(name) if rank == owner else None)
                      for name, p in params}
            slots += [t for s in states.values() for t in s.values()]
        _broadcast_into(slots, owner, env.comm_device)
        for name, s in states.items():
            keep[name] = {"step": s["step"].detach().cpu().view(()).clone(),
                          "exp_avg": s["exp_avg"], "exp_avg_sq": s["exp_avg_sq"]}
    return keep


def _adam_slots(p: torch.Tensor, state: dict | None) -> dict[str, torch.Tensor]:
    """AdamW's state of `p` as tensors to broadcast: the owner's copy, zeros elsewhere."""
    if state is not None:
        return {"exp_avg": state["exp_avg"].detach().clone(),
                "exp_avg_sq": state["exp_avg_sq"].detach().clone(),
                "step": torch.as_tensor(state["step"], dtype=p.dtype, device=p.device).detach().clone().view(1)}
    return {"exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data),
            "step": torch.zeros(1, dtype=p.dtype, device=p.device)}


def _broadcast_into(tensors: list[torch.Tensor], src: int, comm_device: torch.device) -> None:
    """One flat broadcast from `src`; every tensor is overwritten with the owner's values."""
    flat = torch.cat([t.detach().reshape(-1).to(comm_device, torch.float32) for t in tensors])
    dist.broadcast(flat, src=src)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
