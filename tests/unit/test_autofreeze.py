"""AutoFreeze: the paper's rule as a pure function."""
from __future__ import annotations

import math

import pytest
import torch

from pipetransformer.autofreeze import FreezePolicy, FreezeState, closed_form, converged_prefix, decide, interval_alpha
from pipetransformer.freeze_stats import BlockMeter, block_statistic, meter_shard

# the closed form k_T = ceil(L (1 - (1 - alpha)^T)) for L = 12, worked out by hand
CLOSED_FORM = {1 / 3: [0, 4, 7, 9, 10, 11, 11, 12], 1 / 4: [0, 3, 6, 7, 9, 10, 10, 11, 11, 12],
        1 / 2: [0, 6, 9, 11, 12], 1 / 5: [0, 3, 5, 6, 8, 9, 9, 10, 10, 11]}


@pytest.mark.parametrize("alpha", sorted(CLOSED_FORM))
def test_schedule_mode_reproduces_the_closed_form(alpha):
    state = FreezeState(12)
    seq = [0] + [decide(state, alpha, "schedule") for _ in range(len(CLOSED_FORM[alpha]) - 1)]
    assert seq == CLOSED_FORM[alpha]
    assert [closed_form(12, alpha, t) for t in range(len(seq))] == CLOSED_FORM[alpha]


@pytest.mark.parametrize("blocks, alpha, per_epoch", [(6, 1 / 3, 4), (12, 0.2, 3), (8, 0.5, 7)])
def test_decisions_inside_epochs_share_the_cap_so_an_epoch_allows_alpha(blocks, alpha, per_epoch):
    """--freeze-every: `per_epoch` decisions of interval_alpha(alpha, 1/per_epoch) compound to one
    of alpha, so each epoch's end sees the closed form, and in between the cap rises in steps."""
    state, seen = FreezeState(blocks), []
    for decision in range(1, 5 * per_epoch + 1):
        seen.append(decide(state, interval_alpha(alpha, 1 / per_epoch), "schedule"))
        if decision % per_epoch == 0:
            assert state.frozen == closed_form(blocks, alpha, decision // per_epoch)
    assert seen == sorted(seen) and len(set(seen[:per_epoch])) > 1  # it moved inside the first epoch
    assert interval_alpha(alpha, 1.0) == alpha  # one decision an epoch: the paper's ratio itself


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
    with pytest.raises(ValueError, match="6 per-block statistics"):
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
    meter = BlockMeter(2)
    for g in ([1.0, 0.0, 0.0], [-1.0, 2.0, 0.0]):  # summed: [0, 2, 0] -> norm 2, not 1 + sqrt(5)
        p.grad = torch.tensor(g)
        meter.accumulate({1: [("w", p)]})
    assert meter.partials()[0].tolist() == [0.0, 4.0]
    meter.reset()
    assert meter.partials()[0].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_replicas_share_the_meter_out_and_their_partial_norms_add_up_to_one_process(replicas):
    blocks = {b: [(f"b{b}.w{i}", torch.nn.Parameter(torch.zeros(2))) for i in range(3)] for b in (2, 3)}
    shares = [meter_shard(blocks, r, replicas) for r in range(replicas)]
    names = [n for share in shares for params in share.values() for n, _ in params]
    assert sorted(names) == sorted(n for params in blocks.values() for n, _ in params)  # each once
    whole, parts = BlockMeter(4), [BlockMeter(4) for _ in shares]
    for step in range(2):
        for b, params in blocks.items():
            for i, (_, p) in enumerate(params):
                p.grad = torch.tensor([float(b + i), float(step - i)])
        whole.accumulate(blocks)
        for meter, share in zip(parts, shares):
            meter.accumulate(share)
    assert torch.allclose(sum(m.partials() for m in parts), whole.partials())


def test_below_min_reading_keeps_the_block_with_the_smallest_norm_active():
    norms = [5.0] * 12
    norms[1] = 0.1  # block 1 smallest: through-min freezes 0 and 1, below-min only block 0
    assert decide(FreezeState(12), 1 / 3, "adaptive", norms, FreezePolicy(rule="through-min")) == 2
    below = FreezeState(12)
    assert decide(below, 1 / 3, "adaptive", norms, FreezePolicy(rule="below-min")) == 1
    assert below.budget == 1.0  # the cap restarts from k, as when the gradient term binds
    # the lowest active block has the smallest norm: no new freeze under below-min
    norms = [9.0] * 12
    norms[1] = 0.2
    assert decide(below, 1 / 3, "adaptive", norms, FreezePolicy(rule="below-min")) == 1
    assert decide(FreezeState(12), 1 / 3, "adaptive", [0.1] + [9.0] * 11, FreezePolicy(rule="below-min")) == 0


@pytest.mark.parametrize("rule", ["through-min", "below-min"])
def test_both_readings_follow_the_cap_when_the_top_block_has_the_smallest_norm(rule):
    state = FreezeState(6)
    norms = [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    got = [decide(state, 1 / 3, "adaptive", norms, FreezePolicy(rule=rule)) for _ in range(4)]
    assert got == [closed_form(6, 1 / 3, t) for t in range(1, 5)] == [2, 4, 5, 5]
    with pytest.raises(ValueError, match="freeze rule"):
        decide(FreezeState(6), 0.5, "adaptive", [1.0] * 6, FreezePolicy(rule="sideways"))


def test_autofreeze_policy_freezes_the_blocks_whose_gradient_norm_stopped_changing():
    """Liu et al.'s rule: rates |n_prev - n| / n_prev against the active blocks' percentile."""
    state, policy = FreezeState(6), FreezePolicy("autofreeze", percentile=50)
    assert decide(state, 0.9, "adaptive", [4.0, 4.0, 4.0, 4.0, 4.0, 4.0], policy) == 0  # no history yet
    # rates: 0.0, 0.05, 0.5, 0.0, 0.5, 0.5 -> median 0.275: blocks 0, 1 and 3 below it, 2 is not
    assert decide(state, 0.9, "adaptive", [4.0, 3.8, 2.0, 4.0, 6.0, 2.0], policy) == 2
    assert state.last["threshold"] == pytest.approx(0.275) and state.last["converged"] == 2
    # now 2 and 3 barely move against the last interval: the prefix grows through them, capped
    assert decide(state, 0.5, "adaptive", [4.0, 3.8, 2.01, 4.0, 3.0, 1.0], policy) == 4


def test_update_ratio_policy_freezes_bottom_blocks_whose_updates_cancel_out():
    state, policy = FreezeState(4), FreezePolicy("update-ratio", threshold=1.0)
    assert decide(state, 0.9, "adaptive", [0.5, 0.8, 5.0, 0.1], policy) == 2  # stops at block 2
    assert state.last["values"] == [0.5, 0.8, 5.0, 0.1] and state.last["statistic"] == "update"
    assert decide(state, 0.2, "adaptive", [0.0, 0.0, 0.9, 0.2], policy) == 3  # the cap: 2 + 0.2 * 2


def test_every_policy_never_lowers_k_and_respects_the_cap():
    gen = torch.Generator().manual_seed(1)
    for policy in (FreezePolicy("paper"), FreezePolicy("autofreeze"), FreezePolicy("update-ratio", threshold=0.5)):
        state, k = FreezeState(8), 0
        for t in range(1, 11):
            new = decide(state, 0.3, "adaptive", torch.rand(8, generator=gen).tolist(), policy)
            assert k <= new <= closed_form(8, 0.3, t)  # never thaws, never outruns the cap
            k = new


def test_the_update_statistic_is_the_per_weight_move_over_the_summed_lr():
    w = torch.nn.Parameter(torch.zeros(4))
    meter = BlockMeter(1, "update")
    meter.accumulate({0: [("w", w)]})  # the interval's first step keeps the starting weights
    with torch.no_grad():
        w += torch.tensor([0.1, -0.1, 0.1, -0.1])  # every weight moved by 0.1 in 4 steps of lr 0.05
    meter.accumulate({0: [("w", w)]})  # later steps keep nothing new
    # a random walk of 4 steps of 0.05 moves 0.1: drift 1; steps in one direction would drift 2
    assert block_statistic(meter.partials(), "update", lr_sum=0.2, steps=4) == pytest.approx([1.0])
    assert converged_prefix(FreezeState(1), [0.5], FreezePolicy("update-ratio", threshold=0.6)) == (1, 0.6)
