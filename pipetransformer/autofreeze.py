"""AutoFreeze: how many bottom blocks are frozen after each decision point. Pure (stdlib
only): the statistics are gathered by `freeze_stats`.

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
from dataclasses import dataclass, field

__all__ = ["MODES", "RULES", "POLICIES", "PAPER", "FreezePolicy", "FreezeState", "converged_prefix", "decide",
           "closed_form", "interval_alpha"]

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
    history: dict = field(default_factory=dict)  # what a policy carries between decisions
    last: dict = field(default_factory=dict)     # the last decision's numbers (metrics.jsonl)

    def state_dict(self) -> dict:
        return dict(self.__dict__)

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


def _ceil(x: float) -> int:
    return math.ceil(x - _EPS)


def interval_alpha(alpha: float, epochs: float) -> float:
    """The cap's ratio for a decision interval of `epochs` epochs (--freeze-every), such that
    the decisions of one epoch compound to `alpha`: 1 - (1 - alpha)^epochs."""
    return alpha if epochs == 1 else 1.0 - (1.0 - alpha) ** epochs


def closed_form(num_blocks: int, alpha: float, decisions: int) -> int:
    """k_T with the gradient term switched off: ceil(L * (1 - (1 - alpha)^T))."""
    return min(num_blocks, _ceil(num_blocks * (1.0 - (1.0 - alpha) ** decisions)))


@dataclass(frozen=True)
class FreezePolicy:
    """How the adaptive mode judges that a block has converged, from one statistic per block
    gathered over the decision interval (the alpha cap bounds every policy alike):

    - "paper" (PipeTransformer, He et al., ICML 2021): the argmin of the accumulated gradient
      norms, read by `rule` (module docstring).
    - "autofreeze" (Liu, Agarwal, Venkataraman, "AutoFreeze", arXiv 2102.01386): a block's
      gradient norm's rate of change against the previous interval, |n_prev - n| / n_prev;
      blocks below the `percentile`-th percentile of the active blocks' rates are converged
      (the absolute value: a growing gradient is no sign of convergence). Needs one interval
      of history, so the first decision freezes nothing.
    - "update-ratio": the block's drift: how far its weights moved over the interval, per
      weight, ||w_T - w_{T-1}|| / sqrt(n) for its n weights, over how far a random walk of
      the interval's steps would move them, (sum of the LRs) / sqrt(steps). Adam moves each
      weight by about the LR per step, so a block whose gradient keeps its direction drifts
      up to sqrt(steps) (it still learns); once its gradient is noise the steps cancel and
      the drift falls to 1 or below. Blocks under `threshold` are converged. A direct measure
      of the weights settling, in the spirit of Egeria's plasticity (Wang et al., EuroSys
      2023) without its reference model.

    For every policy the frozen prefix grows up to the first active block not judged
    converged (blocks freeze bottom-up)."""
    name: str = "paper"
    rule: str = "through-min"   # paper
    percentile: float = 50.0    # autofreeze
    threshold: float = 1.0      # update-ratio

    @property
    def statistic(self) -> str:
        """What the trainer measures for it: "grad_norm" or "update"."""
        return "update" if self.name == "update-ratio" else "grad_norm"


POLICIES = ("paper", "autofreeze", "update-ratio")
PAPER = FreezePolicy()


def _percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation between order statistics."""
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = math.floor(pos)
    return v[lo] + (v[min(lo + 1, len(v) - 1)] - v[lo]) * (pos - lo)


def _first_unconverged(k: int, converged: Sequence[bool]) -> int:
    """The frozen count when the prefix grows from k through every converged block in order."""
    while k < len(converged) and converged[k]:
        k += 1
    return k


def converged_prefix(state: FreezeState, stat: Sequence[float], policy: FreezePolicy) -> tuple[int, float | None]:
    """The frozen count `policy` alone would give from this interval's per-block statistic
    (never below state.frozen), and the threshold it applied (None for the paper's argmin).
    Updates the history a policy keeps in `state.history`."""
    k = state.frozen
    if policy.name == "paper":
        active = stat[k:]
        smallest = k + min(range(len(active)), key=active.__getitem__)
        return (smallest + 1 if policy.rule == "through-min" else smallest), None
    if policy.name == "autofreeze":
        previous, state.history["grad_norms"] = state.history.get("grad_norms"), list(stat)
        if previous is None:
            return k, None
        rates = [abs(p - n) / p if p > 0 else 0.0 for p, n in zip(previous, stat)]
        threshold = _percentile(rates[k:], policy.percentile)
        return _first_unconverged(k, [r < threshold for r in rates]), threshold
    if policy.name == "update-ratio":
        return _first_unconverged(k, [u < policy.threshold for u in stat]), policy.threshold
    raise ValueError(f"freeze policy {policy.name!r}: choose one of {POLICIES}")


def decide(state: FreezeState, alpha: float, mode: str, statistic: Sequence[float] | None = None,
           policy: FreezePolicy = PAPER) -> int:
    """Apply one decision to `state` in place and return the new k.

    mode "off": never freeze; "schedule": the cap alone (closed form); "adaptive": the cap
    and `policy`'s judgement of `statistic` (one value per block; `FreezePolicy`). The
    decision's numbers are kept in `state.last` (metrics.jsonl shows them).
    """
    if mode not in MODES:
        raise ValueError(f"freeze mode {mode!r}: choose one of {MODES}")
    if policy.rule not in RULES:
        raise ValueError(f"freeze rule {policy.rule!r}: choose one of {RULES}")
    L, k = state.num_blocks, state.frozen
    state.decisions += 1
    if mode == "off" or k >= L:
        state.last = {"frozen": k}
        return k
    budget = state.budget + alpha * (L - state.budget)
    cap = min(L, _ceil(budget))
    new_k = cap
    state.last = {"cap": cap}
    if mode == "adaptive":
        if statistic is None or len(statistic) != L:
            raise ValueError(f"adaptive freezing needs {L} per-block statistics, got "
                             f"{None if statistic is None else len(statistic)}")
        stat = [float(x) for x in statistic]
        candidate, threshold = converged_prefix(state, stat, policy)
        new_k = min(cap, candidate)
        state.last.update({"policy": policy.name, "statistic": policy.statistic, "values": stat,
                           "threshold": threshold, "converged": candidate})
    assert new_k >= k
    state.frozen = new_k
    state.last["frozen"] = new_k
    state.budget = budget if new_k == cap else float(new_k)
    return new_k
