"""AutoPipe's pure planning functions: partition, compression, micro-batches, unit costs."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from pipetransformer.autopipe import (
    DEFAULT_FROZEN_FACTOR,
    Plan,
    UnitCost,
    balance,
    balance_costs,
    choose_microbatches,
    compress,
    divisors,
    largest_divisor_at_most,
    layout_memory,
    memory_costs,
    next_stage_count,
)

# ---------------------------------------------------------------------------------------
# Real unit sizes (parameter counts by formula) for ViT-B/16 and BERT-base.

H, L = 768, 12


def attn_params(h: int) -> int:
    return 4 * h * h + 4 * h + 2 * h  # q,k,v,o weights+biases, pre/post LayerNorm


def mlp_params(h: int) -> int:
    return 2 * h * 4 * h + 4 * h + h + 2 * h  # fc1+fc2 weights, biases, LayerNorm


def vit_units(h: int = H, layers: int = L, classes: int = 100) -> list[float]:
    embed = 3 * 16 * 16 * h + h + 197 * h + h  # patch conv + bias, pos emb, cls token
    head = 2 * h + h * classes + classes  # final LayerNorm + classifier
    return [embed] + [attn_params(h), mlp_params(h)] * layers + [head]


def bert_units(h: int = H, layers: int = L, labels: int = 2) -> list[float]:
    embed = (30522 + 512 + 2) * h + 2 * h  # word, position, type embeddings + LayerNorm
    head = h * h + h + h * labels + labels  # pooler + classifier
    return [embed] + [attn_params(h), mlp_params(h)] * layers + [head]


def split_frozen(units: list[float], frozen_blocks: int, factor: float = DEFAULT_FROZEN_FACTOR):
    """Frozen prefix = embed + first k blocks (2 sub-units each)."""
    cut = 0 if frozen_blocks == 0 else 1 + 2 * frozen_blocks
    return units[cut:], factor * sum(units[:cut])


def naive_block_split(units: list[float], k: int) -> float:
    """Max stage of the obvious plan: whole blocks dealt out evenly, embed on stage 0,
    head on the last stage (the baseline the optimiser must beat or match)."""
    blocks = [units[1 + 2 * b] + units[2 + 2 * b] for b in range((len(units) - 2) // 2)]
    per = [len(blocks) // k + (1 if s < len(blocks) % k else 0) for s in range(k)]
    loads, pos = [], 0
    for p in per:
        loads.append(sum(blocks[pos:pos + p]))
        pos += p
    loads[0] += units[0]
    loads[-1] += units[-1]
    return max(loads)


# ---------------------------------------------------------------------------------------
# balance: optimality and structure


def brute_force(costs, k, frozen):
    n = len(costs)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0,) + cuts + (n,)
        loads = [sum(costs[b[s]:b[s + 1]]) for s in range(k)]
        loads[0] += frozen
        best = min(best, max(loads))
    return best


def check_plan(plan: Plan, costs, k, frozen):
    n = len(costs)
    assert plan.num_stages == k
    assert len(plan.bounds) == k + 1
    assert plan.bounds[0] == 0 and plan.bounds[-1] == n
    assert all(a < b for a, b in zip(plan.bounds, plan.bounds[1:])), "empty stage"
    for s in range(k):
        want = sum(costs[plan.bounds[s]:plan.bounds[s + 1]]) + (frozen if s == 0 else 0)
        assert plan.stage_costs[s] == pytest.approx(want)
    assert plan.max_cost == max(plan.stage_costs)


@pytest.mark.parametrize("with_frozen", [False, True])
def test_balance_optimal_vs_brute_force(with_frozen):
    rng = random.Random(1234 + with_frozen)
    for _ in range(300):
        n = rng.randint(1, 9)
        k = rng.randint(1, min(4, n))
        if rng.random() < 0.5:
            costs = [float(rng.randint(0, 20)) for _ in range(n)]  # integer ties
        else:
            costs = [rng.uniform(0, 10) for _ in range(n)]
        frozen = rng.uniform(0, 15) if with_frozen else 0.0
        plan = balance(costs, k, frozen_cost=frozen)
        check_plan(plan, costs, k, frozen)
        assert plan.max_cost == pytest.approx(brute_force(costs, k, frozen), abs=1e-9)


def test_balance_deterministic_and_even_tie_break():
    # Bottleneck is the 10; the rest can go several ways; the tie-break spreads it evenly
    # (min sum of squares) rather than piling it on one stage.
    costs = [1, 1, 1, 1, 10, 1, 1, 1, 1]
    p1 = balance(costs, 3)
    assert p1 == balance(list(costs), 3)
    assert p1.max_cost == 10
    assert p1.stage_costs == (4.0, 10.0, 4.0)
    # Exact ties (all plans equal) fall to the earlier cut.
    assert balance([0, 0, 0], 2).bounds == (0, 1, 3)


def test_frozen_cost_shifts_work_off_stage0():
    costs = [1.0] * 8
    assert balance(costs, 2).bounds == (0, 4, 8)
    p = balance(costs, 2, frozen_cost=4.0)
    assert p.bounds == (0, 2, 8)
    assert p.stage_costs == (6.0, 6.0)


# ---------------------------------------------------------------------------------------
# Real models


@pytest.mark.parametrize("name,units", [("ViT-B/16", vit_units()), ("BERT-base", bert_units())])
@pytest.mark.parametrize("frozen_blocks", [0, 4])
def test_real_model_partitions(name, units, frozen_blocks):
    active, frozen = split_frozen(units, frozen_blocks)
    total = sum(active) + frozen
    for k in (8, 4, 2, 1):
        plan = balance(active, k, frozen_cost=frozen)
        check_plan(plan, active, k, frozen)
        ideal = total / k
        lower = max(ideal, max(active), frozen + active[0])
        print(
            f"\n{name} frozen_blocks={frozen_blocks} K={k}: "
            f"stages(M params)={[round(c / 1e6, 2) for c in plan.stage_costs]} "
            f"bounds={plan.bounds} max/ideal={plan.max_cost / ideal:.3f}"
        )
        # Never below the trivial lower bound, never worse than lower bound + one unit.
        assert plan.max_cost >= lower - 1e-6
        assert plan.max_cost <= ideal + max(active) + 1e-6
        if frozen_blocks == 0:
            assert plan.max_cost <= naive_block_split(units, k) + 1e-6
        if k == 1:
            assert plan.max_cost == pytest.approx(total)


def test_vit_b16_eight_stages_is_tight():
    units = vit_units()
    plan = balance(units, 8)
    ideal = sum(units) / 8
    # Sub-block granularity lets ViT-B/16 get within ~15% of a perfect split at K=8,
    # clearly better than dealing out whole blocks (which is ~1.4x ideal).
    assert plan.max_cost <= 1.15 * ideal
    assert naive_block_split(units, 8) >= 1.3 * ideal
    assert plan.max_cost < naive_block_split(units, 8)


def test_bert_base_embedding_is_the_bottleneck():
    units = bert_units()
    # The 23.8M-parameter embedding is bigger than total/8, so K=8 can do no better.
    assert balance(units, 8).max_cost == units[0]
    # Freezing it (and a block) charges only 1/6 of it to stage 0: the bottleneck drops.
    active, frozen = split_frozen(units, 1)
    assert balance(active, 8, frozen_cost=frozen).max_cost < units[0]


# ---------------------------------------------------------------------------------------
# Edge cases


def test_one_active_unit():
    assert balance([5.0], 1).stage_costs == (5.0,)
    assert balance([5.0], 1, frozen_cost=2.0).stage_costs == (7.0,)
    with pytest.raises(ValueError, match=r"1 active units into 2"):
        balance([5.0], 2)


def test_stages_equal_units():
    costs = [3.0, 1.0, 4.0, 1.0, 5.0]
    plan = balance(costs, 5, frozen_cost=1.0)
    assert plan.bounds == (0, 1, 2, 3, 4, 5)
    assert plan.stage_costs == (4.0, 1.0, 4.0, 1.0, 5.0)


def test_one_huge_unit():
    costs = [1.0] * 5 + [100.0] + [1.0] * 5
    plan = balance(costs, 4)
    assert plan.max_cost == 100.0
    s = next(i for i in range(4) if plan.bounds[i] <= 5 < plan.bounds[i + 1])
    assert plan.bounds[s:s + 2] == (5, 6), "huge unit should sit alone"


def test_too_many_stages_message():
    with pytest.raises(ValueError) as e:
        balance([1.0, 2.0, 3.0], 4)
    msg = str(e.value)
    assert "3" in msg and "4" in msg
    assert "at most 3 stages" in msg and "freeze fewer layers" in msg


@pytest.mark.parametrize("bad", [0, -1])
def test_bad_stage_count(bad):
    with pytest.raises(ValueError):
        balance([1.0, 2.0], bad)


def test_bad_costs():
    with pytest.raises(ValueError):
        balance([1.0, -2.0], 1)
    with pytest.raises(ValueError):
        balance([1.0, float("nan")], 1)
    with pytest.raises(ValueError):
        balance([1.0], 1, frozen_cost=-1.0)
    with pytest.raises(ValueError):
        balance([], 1)


# ---------------------------------------------------------------------------------------
# compress


def test_divisors_are_the_stage_counts():
    assert divisors(8) == [8, 4, 2, 1]
    assert divisors(6) == [6, 3, 2, 1]
    assert divisors(1) == [1]
    assert [largest_divisor_at_most(6, n) for n in (1, 2, 4, 5, 9)] == [1, 2, 3, 3, 6]
    with pytest.raises(ValueError):
        divisors(0)


def test_compress_no_change_at_start():
    units = vit_units()
    budget = balance(units, 8).max_cost
    assert compress(units, 0.0, 8, 8, budget) == 8


def simulate(units, world, factor):
    """Freeze block by block, compressing after each decision as the trainer would."""
    k = world
    budget = balance(units, k).max_cost
    path = [k]
    for fb in range(1, (len(units) - 2) // 2 + 1):
        active, frozen = split_frozen(units, fb, factor)
        new = compress(active, frozen, k, world, budget)
        assert new <= k, "K must never go up"
        assert world % new == 0
        # The chosen layout honours the budget, except a drop forced by having fewer
        # active units than stages (then K is the largest divisor of W that fits).
        forced = k if k <= len(active) else max(d for d in divisors(world) if d <= len(active))
        if new < forced:
            assert balance(active, new, frozen_cost=frozen).max_cost <= budget
        else:
            assert new == forced
        k = new
        path.append(k)
    return path


def test_compress_shrinks_8_4_2_1():
    # Uniform units with a cheap frozen charge: every halving is reached in turn.
    path = simulate([1.0] * 34, 8, factor=0.01)
    assert [k for i, k in enumerate(path) if i == 0 or k != path[i - 1]] == [8, 4, 2, 1]
    assert path == sorted(path, reverse=True)


def test_compress_vit_real_sizes():
    path = simulate(vit_units(), 8, DEFAULT_FROZEN_FACTOR)
    print(f"\nViT-B/16 K after freezing 0..12 blocks (W=8, lambda=1/6): {path}")
    assert path[0] == 8 and path == sorted(path, reverse=True)
    # Budget-driven 8 -> 4 once 7 blocks are frozen.  4 -> 2 never fits the budget with
    # lambda=1/6 (the frozen prefix alone weighs ~12-14M on stage 0 against an ~11.9M
    # budget); the last two drops are forced by running out of active units
    # (11 frozen: 3 units -> K=2; 12 frozen: only the head -> K=1).
    assert path == [8, 8, 8, 8, 8, 8, 8, 4, 4, 4, 4, 2, 1]


def test_compress_world6_path():
    budget = 2.0
    # 6 units of 1 at K=6: K=3 fits (2 per stage), K=1 would be 6 -> stop at 3.
    assert compress([1.0] * 6, 0.0, 6, 6, budget) == 3
    # From 3 the next candidate is 1 (3 // 2 = 1), not 2.
    assert compress([1.0, 1.0], 0.0, 3, 6, budget) == 1
    assert compress([1.0, 1.0, 1.0], 0.0, 3, 6, budget) == 3
    # W=12: 12 -> 6 -> 3 -> 1 when everything fits.
    assert compress([0.1] * 12, 0.0, 12, 12, budget) == 1


def test_compress_one_stays_one_and_too_many_stages():
    assert compress([5.0, 5.0], 100.0, 1, 8, 1.0) == 1
    # 3 active units with K=8: forced down to 2 (largest divisor of 8 <= 3) even though
    # it is over budget, and no further since K=1 does not fit either.
    assert compress([10.0, 10.0, 10.0], 0.0, 8, 8, 1.0) == 2
    # W=6, 4 active units -> 3 first.
    assert compress([10.0] * 4, 0.0, 6, 6, 1.0) == 3
    with pytest.raises(ValueError, match="divisor"):
        compress([1.0] * 8, 0.0, 3, 8, 10.0)
    with pytest.raises(ValueError):
        compress([], 1.0, 1, 1, 10.0)


def test_compress_budget_is_inclusive():
    # K=4 gives exactly the budget -> accepted; a hair above -> rejected.
    costs = [1.0] * 8
    assert compress(costs, 0.0, 8, 8, 2.0) == 4
    assert compress(costs, 0.0, 8, 8, 1.999) == 8


# ---------------------------------------------------------------------------------------
# micro-batches


def test_choose_microbatches_rule():
    assert choose_microbatches(1, 32) == 1
    assert choose_microbatches(1, 7) == 1
    assert choose_microbatches(4, 32) == 8
    assert choose_microbatches(8, 64) == 16
    assert choose_microbatches(2, 4) == 4
    for k in (2, 4, 8):  # the GPipe bubble (K-1)/(M+K-1) stays under 1/3
        m = choose_microbatches(k, 1024)
        assert (k - 1) / (m + k - 1) < 1 / 3


def test_choose_microbatches_divisibility_fallback():
    assert choose_microbatches(4, 30) == 10  # 8 does not divide 30: upward first
    assert choose_microbatches(4, 28) == 14  # upward: 14
    assert choose_microbatches(4, 12) == 12  # 8 no; upward 12
    assert choose_microbatches(4, 6) == 6  # nothing >= 8 divides 6: downward to 6
    assert choose_microbatches(3, 4) == 4  # target 6 > batch: largest divisor >= 3
    assert choose_microbatches(4, 5) == 5


def test_choose_microbatches_too_small():
    with pytest.raises(ValueError) as e:
        choose_microbatches(8, 4)
    msg = str(e.value)
    assert "4" in msg and "8" in msg and "--batch-size" in msg and "--stages" in msg


# ---------------------------------------------------------------------------------------
# unit costs and the next stage count

UNITS = [UnitCost("embed", 0, 10.0), UnitCost("block.0.attn", 0, 4.0), UnitCost("block.0.mlp", 0, 8.0),
         UnitCost("block.1.attn", 1, 4.0), UnitCost("block.1.mlp", 1, 8.0), UnitCost("head", 2, 1.0)]


def test_memory_costs_charge_frozen_units_a_sixth():
    active, frozen_cost = memory_costs(UNITS, 1)
    assert active == [4.0, 8.0, 1.0]
    assert frozen_cost == pytest.approx((10 + 4 + 8) / 6)


def test_balance_costs_use_the_profile_only_when_every_unit_has_one():
    timed = [UnitCost(u.name, u.freeze_index, u.size, (2.0, 0.5)) for u in UNITS]
    assert balance_costs(timed, 1) == ([2.0, 2.0, 2.0], pytest.approx(1.5))
    assert balance_costs(timed[:-1] + [UNITS[-1]], 1) == memory_costs(UNITS, 1)


def test_next_stage_count_compresses_only_when_elastic():
    budget = balance(*[memory_costs(UNITS, 0)[0]], 2, frozen_cost=0.0).max_cost
    assert next_stage_count(UNITS, 0, 2, 2, budget, elastic=True) == 2
    assert next_stage_count(UNITS, 2, 2, 2, budget, elastic=True) == 1   # only the head is left
    assert next_stage_count(UNITS, 1, 2, 2, budget, elastic=False) == 2  # fixed: keeps two stages
    assert next_stage_count(UNITS, 2, 2, 2, budget, elastic=False) == 1  # one unit cannot fill two


def bert_base_unit_costs() -> list[UnitCost]:
    """BERT-base as the trainer sees it: the embedding unit computes next to nothing (lookups
    and a LayerNorm) yet holds 23.8 M of the model's 110 M parameters."""
    sizes = bert_units()
    names = ["embed"] + [f"block.{i}.{p}" for i in range(L) for p in ("attn", "mlp")] + ["head"]
    index = [0] + [i for i in range(L) for _ in range(2)] + [L]
    compute = [2 * H] + sizes[1:]
    return [UnitCost(n, k, c, None, m) for n, k, c, m in zip(names, index, compute, sizes)]


def test_the_memory_rule_counts_embedding_tables_and_no_compressed_stage_exceeds_the_start():
    units = bert_base_unit_costs()
    start = layout_memory(units, 0, 8)
    tables = bert_units()[0]
    assert start >= tables  # stage 0 holds the vocabulary while it trains (weights, gradients, Adam)
    compute_only = [UnitCost(u.name, u.freeze_index, u.size) for u in units]
    assert start - layout_memory(compute_only, 0, 8) > 0.85 * tables  # leaving them out missed 21 M of 33 M
    stages = 8
    for frozen in range(L + 1):
        stages = next_stage_count(units, frozen, stages, 8, start, elastic=True)
        assert layout_memory(units, frozen, stages) <= start  # every layout fits where the first did
        if stages < 8:  # the next halving would not have fitted
            assert stages == 1 or layout_memory(units, frozen, stages // 2) > start
