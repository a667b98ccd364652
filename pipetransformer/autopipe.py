"""AutoPipe: balanced pipeline partitions, stage compression, micro-batches, unit costs.

Pure functions (stdlib only, no torch) so that every decision the trainer makes about
the pipeline layout can be unit-tested and reproduced without devices.

Vocabulary.  The model is an ordered list of *units* ("embed", "block.0.attn",
"block.0.mlp", ..., "head").  Frozen units form a prefix and run outside the pipeline on
stage 0's device; only the ACTIVE suffix is partitioned into ``K`` contiguous, non-empty
stages.  Stages balance compute (matrix parameters, or profiled time); compression checks
memory: every parameter a stage holds, embedding tables included, the frozen prefix charged
to stage 0 as ``frozen_factor * sum(frozen memory)`` (the paper's lambda_frozen = 1/6:
frozen weights need no gradients, optimizer state or stored activations).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "DEFAULT_FROZEN_FACTOR",
    "Plan",
    "UnitCost",
    "balance",
    "compress",
    "choose_microbatches",
    "divisors",
    "largest_divisor_at_most",
    "memory_costs",
    "balance_costs",
    "layout_memory",
    "stage_memory",
    "next_stage_count",
]

#: The paper's lambda_frozen: a frozen layer costs about 1/6 of an active one in memory.
DEFAULT_FROZEN_FACTOR: float = 1.0 / 6.0

# Relative slack when comparing a candidate layout against the memory budget, so that
# float noise in costs that are sums of measured times cannot flip a decision.
_BUDGET_RTOL = 1e-9


@dataclass(frozen=True)
class Plan:
    """A partition of the active units into ``num_stages`` contiguous stages.

    ``bounds`` has K+1 entries, ``bounds[0] == 0`` and ``bounds[-1] == len(active)``;
    stage ``s`` is ``active[bounds[s]:bounds[s+1]]``.  ``stage_costs[0]`` includes the
    frozen cost charged to stage 0.
    """

    bounds: tuple[int, ...]
    stage_costs: tuple[float, ...]

    @property
    def num_stages(self) -> int:
        return len(self.stage_costs)

    @property
    def max_cost(self) -> float:
        return max(self.stage_costs)


def _as_int(value: object, name: str, minimum: int = 1) -> int:
    # Accept anything int-like (e.g. numpy integers) but not bools or floats.
    try:
        if isinstance(value, bool):
            raise TypeError
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if out < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return out


def _check_costs(costs: Sequence[float], frozen_cost: float) -> list[float]:
    out = [float(c) for c in costs]
    for i, c in enumerate(out):
        if not math.isfinite(c) or c < 0:
            raise ValueError(f"unit cost #{i} must be finite and >= 0, got {c!r}")
    if not math.isfinite(frozen_cost) or frozen_cost < 0:
        raise ValueError(f"frozen_cost must be finite and >= 0, got {frozen_cost!r}")
    return out


def _check_stage_count(n: int, num_stages: int) -> None:
    if n == 0:
        raise ValueError(
            "no active units to pipeline (everything is frozen): freeze fewer layers"
        )
    if num_stages > n:
        # Every stage needs at least one unit; say which knob fixes it.
        raise ValueError(
            f"cannot split {n} active units into {num_stages} non-empty stages: "
            f"use at most {n} stages or freeze fewer layers"
        )


def balance(costs: Sequence[float], num_stages: int, *, frozen_cost: float = 0.0) -> Plan:
    """Split ``costs`` into ``num_stages`` contiguous non-empty parts, min-max optimal.

    Part 0 additionally carries ``frozen_cost``.  The largest part is exactly minimal
    (dynamic programme, O(K * n^2) worst case, pruned; fine for n up to a few hundred).

    Tie-breaking (deterministic): among all plans with the optimal bottleneck, the one
    with the smallest sum of squared stage costs is returned (spreads the slack evenly
    instead of piling it on one stage); remaining exact ties prefer the earlier cut,
    decided from the last stage backwards.

    Raises ValueError if ``num_stages < 1``, if a cost is negative or not finite, or if
    there are fewer active units than stages.
    """
    K = _as_int(num_stages, "num_stages")
    c = _check_costs(costs, frozen_cost)
    n = len(c)
    _check_stage_count(n, K)

    prefix = [0.0] * (n + 1)
    for i, x in enumerate(c):
        prefix[i + 1] = prefix[i] + x

    # One expression for a stage's cost, used by both passes and for the result, so the
    # bottleneck found in pass 1 compares exactly (bit-for-bit) in pass 2.
    def seg(i: int, j: int) -> float:
        return (frozen_cost + prefix[j]) if i == 0 else (prefix[j] - prefix[i])

    inf = math.inf
    # Pass 1: best[k][j] = minimal bottleneck splitting units[:j] into k stages.
    best = [[inf] * (n + 1) for _ in range(K + 1)]
    for j in range(1, n - K + 2):
        best[1][j] = seg(0, j)
    for k in range(2, K + 1):
        prev, cur = best[k - 1], best[k]
        # units[:j] must leave at least K-k units for the remaining stages.
        for j in range(k, n - (K - k) + 1):
            b = inf
            # Walk the last stage's start i leftwards: seg grows, so once it reaches the
            # best value found nothing further left can improve it.
            for i in range(j - 1, k - 2, -1):
                s = seg(i, j)
                if s >= b:
                    break
                v = prev[i] if prev[i] > s else s
                if v < b:
                    b = v
            cur[j] = b
    bottleneck = best[K][n]

    # Pass 2: among plans whose every stage is <= bottleneck, minimise the sum of
    # squares (additive, so the DP is exact for this secondary objective).
    sq = [[inf] * (n + 1) for _ in range(K + 1)]
    arg = [[-1] * (n + 1) for _ in range(K + 1)]
    for j in range(1, n - K + 2):
        s = seg(0, j)
        if s <= bottleneck:
            sq[1][j] = s * s
            arg[1][j] = 0
    for k in range(2, K + 1):
        prev, cur, acur = sq[k - 1], sq[k], arg[k]
        for j in range(k, n - (K - k) + 1):
            b, bi = inf, -1
            for i in range(j - 1, k - 2, -1):
                s = seg(i, j)
                if s > bottleneck:
                    break
                if prev[i] == inf:
                    continue
                v = prev[i] + s * s
                if v <= b:  # '<=' while i decreases: exact ties keep the earlier cut
                    b, bi = v, i
            cur[j], acur[j] = b, bi

    bounds = [n]
    j = n
    for k in range(K, 0, -1):
        j = arg[k][j]
        assert j >= 0, "internal error: optimal plan not reconstructible"
        bounds.append(j)
    bounds.reverse()
    stage_costs = tuple(seg(bounds[s], bounds[s + 1]) for s in range(K))
    return Plan(bounds=tuple(bounds), stage_costs=stage_costs)


def divisors(n: int) -> list[int]:
    """All valid pipeline lengths for ``n`` devices: its divisors, descending.

    K stages times n/K data-parallel replicas must use every device, hence divisors.
    """
    n = _as_int(n, "world_size")
    return [d for d in range(n, 0, -1) if n % d == 0]


def largest_divisor_at_most(n: int, limit: int) -> int:
    """The largest divisor of ``n`` not above ``limit`` (1 always divides: total for limit >= 1)."""
    return next(d for d in divisors(n) if d <= limit)


def stage_memory(bounds: Sequence[int], memory: Sequence[float], frozen_memory: float) -> float:
    """The fullest stage's memory when the active units are cut at ``bounds``: the sum of its
    units' ``memory``, stage 0 also holding the frozen prefix's ``frozen_memory``."""
    return max((frozen_memory if s == 0 else 0.0) + sum(memory[a:b])
               for s, (a, b) in enumerate(zip(bounds, bounds[1:])))


def compress(
    active_costs: Sequence[float],
    frozen_cost: float,
    num_stages: int,
    world_size: int,
    budget: float,
    memory: tuple[Sequence[float], float] | None = None,
) -> int:
    """The paper's pipeline compression rule; returns the new stage count K.

    From K = ``num_stages``, the next candidate is the largest divisor d of
    ``world_size`` with ``d <= K // 2`` (exactly K/2 for the paper's powers of two;
    W=6 goes 6 -> 3 -> 1).  The active units are cut into d stages by
    ``balance(active_costs, d, frozen_cost)``; if the fullest stage's memory
    (``stage_memory`` of ``memory`` = (active units' memory, frozen prefix's memory); the
    costs themselves when not given) fits in ``budget`` (the fullest stage at the start of
    training), switch to d and try again; stop at the first candidate that does not fit, or
    at K == 1.  K never grows.

    If ``num_stages`` exceeds the number of active units, K first drops to the largest
    divisor of ``world_size`` not above that number (forced: stages must be non-empty,
    even if that layout exceeds the budget).

    Raises ValueError if ``num_stages`` does not divide ``world_size`` or nothing is active.
    """
    valid = divisors(world_size)
    num_stages = _as_int(num_stages, "num_stages")
    if num_stages not in valid:
        raise ValueError(
            f"num_stages={num_stages!r} is not a divisor of world_size={world_size}; "
            f"valid stage counts: {valid}"
        )
    n = len(active_costs)
    if n == 0:
        raise ValueError(
            "no active units to pipeline (everything is frozen): freeze fewer layers"
        )
    if not math.isfinite(budget):
        raise ValueError(f"budget must be finite, got {budget!r}")
    K = num_stages if num_stages <= n else largest_divisor_at_most(world_size, n)
    limit = budget + abs(budget) * _BUDGET_RTOL
    unit_memory, frozen_memory = memory if memory is not None else (active_costs, frozen_cost)
    while K > 1:
        nxt = largest_divisor_at_most(world_size, K // 2)
        cut = balance(active_costs, nxt, frozen_cost=frozen_cost).bounds
        if stage_memory(cut, unit_memory, frozen_memory) > limit:
            break
        K = nxt
    return K


def choose_microbatches(num_stages: int, batch_per_replica: int) -> int:
    """Pick the number of micro-batches M per replica batch (a fixed rule, no profiling).

    A GPipe pipeline of K stages and M micro-batches idles a fraction
    ``bubble = (K-1)/(M+K-1)`` of the time.  Target: M = 1 for K == 1 (no pipeline, no
    bubble; splitting only shrinks kernels) and M = 2K for K > 1, which keeps the bubble
    below 1/3 ((K-1)/(3K-1)) without making micro-batches needlessly small.

    M must divide ``batch_per_replica`` and be >= K (fewer micro-batches than stages
    leaves stages idle).  If the target does not divide, search upward from the target
    for the first divisor (more micro-batches, smaller bubble), then downward towards K.

    Raises ValueError when no admissible M exists (batch too small for the pipeline).
    """
    K = _as_int(num_stages, "num_stages")
    B = _as_int(batch_per_replica, "batch_per_replica")
    target = 1 if K == 1 else 2 * K
    ok = [m for m in range(K, B + 1) if B % m == 0]
    up = [m for m in ok if m >= target]
    if up:
        return up[0]
    if ok:
        return ok[-1]  # largest admissible below the target
    raise ValueError(
        f"batch_per_replica={B} cannot be split into at least num_stages={K} equal "
        f"micro-batches: use a larger --batch-size or fewer --stages"
    )


@dataclass(frozen=True)
class UnitCost:
    """What the planner knows of one unit: its place and its costs.

    ``size``: matrix parameters, the compute the stages balance (lookups left out);
    ``memory``: every parameter the unit holds, embedding tables included (the memory rule;
    ``size`` when not given); ``seconds``: (forward+backward, forward) when profiled.
    """

    name: str
    freeze_index: int
    size: float
    seconds: tuple[float, float] | None = None
    memory: float | None = None

    @property
    def held(self) -> float:
        return self.size if self.memory is None else self.memory


def _weighed(units: Sequence[UnitCost], frozen: int, weight) -> tuple[list[float], float]:
    # a frozen unit holds no gradients and no Adam state: it weighs DEFAULT_FROZEN_FACTOR
    active = [weight(u) for u in units if u.freeze_index >= frozen]
    return active, DEFAULT_FROZEN_FACTOR * sum(weight(u) for u in units if u.freeze_index < frozen)


def memory_costs(units: Sequence[UnitCost], frozen: int) -> tuple[list[float], float]:
    """(active units' memory, the frozen prefix's memory) with k = ``frozen``: every parameter
    (an active one also carries its gradient and Adam state, a frozen one only its weight,
    hence DEFAULT_FROZEN_FACTOR)."""
    return _weighed(units, frozen, lambda u: u.held)


def balance_costs(units: Sequence[UnitCost], frozen: int) -> tuple[list[float], float]:
    """The costs the stages balance: measured time when every unit carries a profile (frozen
    units then cost their forward pass on stage 0), else matrix parameters (a frozen unit's
    forward weighing DEFAULT_FROZEN_FACTOR)."""
    if units and all(u.seconds is not None for u in units):
        active = [u.seconds[0] for u in units if u.freeze_index >= frozen and u.seconds]
        return active, sum(u.seconds[1] for u in units if u.freeze_index < frozen and u.seconds)
    return _weighed(units, frozen, lambda u: u.size)


def layout_memory(units: Sequence[UnitCost], frozen: int, stages: int) -> float:
    """The fullest stage's memory when the active units are cut into ``stages`` as the
    trainer cuts them (``balance`` of ``balance_costs``)."""
    active, frozen_cost = balance_costs(units, frozen)
    return stage_memory(balance(active, stages, frozen_cost=frozen_cost).bounds, *memory_costs(units, frozen))


def next_stage_count(units: Sequence[UnitCost], frozen: int, stages: int, world_size: int,
                     budget: float, elastic: bool) -> int:
    """Stages after freezing to ``frozen``: the compression rule (elastic), or the current
    count unless fewer units stay active than it has stages (fixed layout)."""
    active, frozen_cost = balance_costs(units, frozen)
    if not elastic:
        return largest_divisor_at_most(world_size, min(stages, len(active)))
    return compress(active, frozen_cost, stages, world_size, budget, memory_costs(units, frozen))
