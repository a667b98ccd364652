"""The layout object: W = K stages x D replicas, rank placement and validation."""
from __future__ import annotations

import pytest

from pipetransformer.topology import Layout, divisors


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


def test_stage_count_must_divide_the_world():
    assert divisors(12) == [12, 6, 4, 3, 2, 1]
    with pytest.raises(ValueError, match=r"--stages=4 must divide .* \(6\); valid: \[6, 3, 2, 1\]"):
        Layout(6, 4)
