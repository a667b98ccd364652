"""AutoDP: the layout (W = K stages x D replicas), replica slicing, batch and LR policy."""
from __future__ import annotations

import pytest
import torch

from pipetransformer.autodp import Layout, dropout_seed, lr_scale, ramped, replica_batch, replica_rows
from pipetransformer.autopipe import divisors
from pipetransformer.data.sampler import BatchSampler


def test_six_processes_as_three_stages_by_two_replicas():
    layout = Layout(6, 3)
    assert layout.replicas == 2 and str(layout) == "3 stages x 2 replicas"
    assert layout.pipeline_ranks(0) == [0, 1, 2] and layout.pipeline_ranks(1) == [3, 4, 5]
    assert layout.stage_ranks(1) == [1, 4]
    assert [(layout.replica_of(r), layout.stage_of(r)) for r in range(6)] == \
        [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert all(layout.rank(layout.replica_of(r), layout.stage_of(r)) == r for r in range(6))


def test_every_rank_is_in_exactly_one_pipeline_and_one_replica_group():
    for world in (1, 2, 4, 6, 8, 12):
        for k in divisors(world):
            layout = Layout(world, k)
            pipelines = [r for p in range(layout.replicas) for r in layout.pipeline_ranks(p)]
            stages = [r for s in range(k) for r in layout.stage_ranks(s)]
            assert sorted(pipelines) == sorted(stages) == list(range(world))


def test_a_layout_that_does_not_divide_the_world_is_an_internal_error():
    with pytest.raises(AssertionError):  # users meet config.validate's message first
        Layout(6, 4)


def test_sampler_orders_are_seeded_per_epoch_and_drop_the_tail():
    sampler = BatchSampler(100, seed=3)
    assert sampler.steps(32) == 3
    a, b = sampler.epoch_order(0), sampler.epoch_order(1)
    assert sorted(a.tolist()) == list(range(100)) and not torch.equal(a, b)
    assert torch.equal(a, BatchSampler(100, seed=3).epoch_order(0))
    assert not torch.equal(a, BatchSampler(100, seed=4).epoch_order(0))


@pytest.mark.parametrize("replicas", [1, 2, 4, 8])
def test_replicas_together_read_exactly_the_global_batch_of_one_process(replicas):
    order = BatchSampler(100, seed=0).epoch_order(0)
    for step in range(3):
        whole = replica_rows(order, step, 32, 0, 1)
        parts = [replica_rows(order, step, 32, r, replicas) for r in range(replicas)]
        assert all(len(p) == 32 // replicas for p in parts)
        assert torch.equal(torch.cat(parts), whole)


def test_batch_and_lr_policies():
    start, later = Layout(4, 4), Layout(4, 1)
    assert replica_batch(32, start, "constant", start) == 32
    assert replica_batch(32, later, "constant", start) == 8     # the global batch is split
    assert replica_batch(32, later, "per-replica", start) == 32  # each replica keeps its batch
    assert lr_scale(later, "constant", start) == 1.0
    assert lr_scale(later, "per-replica", start) == 2.0                # sqrt of the batch's growth
    assert lr_scale(later, "per-replica", start, "linear") == 4.0      # or the growth itself
    assert lr_scale(Layout(4, 2), "per-replica", Layout(4, 2)) == 1.0


def test_the_lr_ramps_to_a_new_scale_without_a_jump():
    seen = [ramped(1.0, 2.0, step, 4) for step in range(7)]
    assert seen == [1.0, 1.25, 1.5, 1.75, 2.0, 2.0, 2.0]
    assert max(b - a for a, b in zip(seen, seen[1:])) == 0.25          # never more than 1/ramp per step
    assert ramped(1.0, 2.0, 0, 0) == 2.0                               # no ramp: at once
    assert ramped(1.5, 1.0, 1, 2) == 1.25                              # down as well as up


def test_each_process_and_step_draws_from_its_own_dropout_stream():
    seeds = {dropout_seed(3, seen, rank) for seen in range(0, 64 * 16, 16) for rank in range(8)}
    assert len(seeds) == 64 * 8 and all(0 <= s < 2**63 for s in seeds)
    assert dropout_seed(3, 32, 1) == dropout_seed(3, 32, 1) != dropout_seed(4, 32, 1)  # a replay, another seed
