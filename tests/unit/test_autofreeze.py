"""AutoFreeze: the paper's rule as a pure function."""
from __future__ import annotations

import math

import pytest
import torch

from pipetransformer.autofreeze import FreezeState, GradNormMeter, closed_form, decide, meter_shard

# the closed form k_T = ceil(L (1 - (1 - alpha)^T)) for L = 12, worked out by hand
CLOSED_FORM = {1 / 3: [0, 4, 7, 9, 10, 11, 11, 12], 1 / 4: [0, 3, 6, 7, 9, 10, 10, 11, 11, 12],
        1 / 2: [0, 6, 9, 11, 12], 1 / 5: [0, 3, 5, 6, 8, 9, 9, 10, 10, 11]}


@pytest.mark.parametrize("alpha", sorted(CLOSED_FORM))
def test_schedule_mode_reproduces_the_closed_form(alpha):
    state = FreezeState(12)
    seq = [0] + [decide(state, alpha, "schedule") for _ in range(len(CLOSED_FORM[alpha]) - 1)]
    assert seq == CLOSED_FORM[alpha]
    assert [closed_form(12, alpha, t) for t in range(len(seq))] == CLOSED_FORM[alpha]


@pytest.mark.parametrize("num_blocks", [6, 12, 24])
@pytest.mark.parametrize("alpha", [0.2, 1 / 3, 0.5])
def test_adaptive_without_a_binding_gradient_term_follows_the_cap(num_blocks, alpha):
    # decreasing norms put the argmin on the last block, so only the cap can bind
    state = FreezeState(num_blocks)
    norms = list(range(num_blocks, 0, -1))
    got = [decide(state, alpha, "adaptive", norms) for _ in range(12)]
    assert got == [closed_form(num_blocks, alpha, t) for t in range(1, 13)]
    assert got[-1] <= num_blocks


def test_gradient_term_freezes_up_to_and_including_the_smallest_norm():
    state = FreezeState(12)
    norms = [5.0] * 12
    norms[1] = 0.1  # block 1 judged converged: blocks 0 and 1 freeze, cap (4) does not bind
    assert decide(state, 1 / 3, "adaptive", norms) == 2
    assert state.budget == 2.0  # the cap restarts from the integer k
    # next: argmin among active blocks [2, 12) only; frozen blocks' norms are ignored
    norms = [0.0, 0.0] + [3.0] * 10
    norms[9] = 0.5
    assert decide(state, 1 / 3, "adaptive", norms) == min(math.ceil(2 + (12 - 2) / 3), 10)


def test_cap_binds_when_the_converged_block_is_high():
    state = FreezeState(12)
    norms = [9.0] * 11 + [0.01]
    assert decide(state, 1 / 4, "adaptive", norms) == 3


@pytest.mark.parametrize("num_blocks", [6, 12, 24])
def test_k_never_decreases_and_stays_in_range(num_blocks):
    gen = torch.Generator().manual_seed(num_blocks)
    state, last = FreezeState(num_blocks), 0
    for _ in range(40):
        k = decide(state, 0.3, "adaptive", torch.rand(num_blocks, generator=gen).tolist())
        assert last <= k <= num_blocks
        last = k
    assert last == num_blocks


def test_off_mode_never_freezes_and_bad_input_is_named():
    state = FreezeState(6)
    assert [decide(state, 0.5, "off") for _ in range(5)] == [0] * 5
    with pytest.raises(ValueError, match="6 gradient norms"):
        decide(FreezeState(6), 0.5, "adaptive", [1.0] * 5)
    with pytest.raises(ValueError, match="freeze mode"):
        decide(FreezeState(6), 0.5, "sometimes")


def test_state_round_trips():
    a = FreezeState(12)
    decide(a, 0.25, "schedule")
    b = FreezeState(12)
    b.load_state_dict(a.state_dict())
    assert decide(a, 0.25, "schedule") == decide(b, 0.25, "schedule") == 6


def test_meter_sums_gradient_vectors_over_the_interval():
    p = torch.nn.Parameter(torch.zeros(3))
    meter = GradNormMeter(2)
    for g in ([1.0, 0.0, 0.0], [-1.0, 2.0, 0.0]):  # summed: [0, 2, 0] -> norm 2, not 1 + sqrt(5)
        p.grad = torch.tensor(g)
        meter.accumulate({1: [("w", p)]})
    assert meter.squared_norms().tolist() == [0.0, 4.0]
    meter.reset()
    assert meter.squared_norms().tolist() == [0.0, 0.0]


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_replicas_share_the_meter_out_and_their_partial_norms_add_up_to_one_process(replicas):
    blocks = {b: [(f"b{b}.w{i}", torch.nn.Parameter(torch.zeros(2))) for i in range(3)] for b in (2, 3)}
    shares = [meter_shard(blocks, r, replicas) for r in range(replicas)]
    names = [n for share in shares for params in share.values() for n, _ in params]
    assert sorted(names) == sorted(n for params in blocks.values() for n, _ in params)  # each once
    whole, parts = GradNormMeter(4), [GradNormMeter(4) for _ in shares]
    for step in range(2):
        for b, params in blocks.items():
            for i, (_, p) in enumerate(params):
                p.grad = torch.tensor([float(b + i), float(step - i)])
        whole.accumulate(blocks)
        for meter, share in zip(parts, shares):
            meter.accumulate(share)
    assert torch.allclose(sum(m.squared_norms() for m in parts), whole.squared_norms())


def test_below_min_reading_keeps_the_block_with_the_smallest_norm_active():
    norms = [5.0] * 12
    norms[1] = 0.1  # block 1 smallest: through-min freezes 0 and 1, below-min only block 0
    assert decide(FreezeState(12), 1 / 3, "adaptive", norms, "through-min") == 2
    below = FreezeState(12)
    assert decide(below, 1 / 3, "adaptive", norms, "below-min") == 1
    assert below.budget == 1.0  # the cap restarts from k, as when the gradient term binds
    # the lowest active block has the smallest norm: no new freeze under below-min
    norms = [9.0] * 12
    norms[1] = 0.2
    assert decide(below, 1 / 3, "adaptive", norms, "below-min") == 1
    assert decide(FreezeState(12), 1 / 3, "adaptive", [0.1] + [9.0] * 11, "below-min") == 0


@pytest.mark.parametrize("rule", ["through-min", "below-min"])
def test_both_readings_follow_the_cap_when_the_top_block_has_the_smallest_norm(rule):
    state = FreezeState(6)
    got = [decide(state, 1 / 3, "adaptive", [6.0, 5.0, 4.0, 3.0, 2.0, 1.0], rule) for _ in range(4)]
    assert got == [closed_form(6, 1 / 3, t) for t in range(1, 5)] == [2, 4, 5, 5]
    with pytest.raises(ValueError, match="freeze rule"):
        decide(FreezeState(6), 0.5, "adaptive", [1.0] * 6, "sideways")
