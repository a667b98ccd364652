"""The pure transition plan (layout, bounds, owners, micro-batches), the rule for the next
one, the profile it can balance by, and the learning-rate schedule."""
from __future__ import annotations

import pytest
import torch
import transformers

from pipetransformer.autodp import Layout
from pipetransformer.autopipe import UnitCost, memory_costs, stage_memory
from pipetransformer.engine import lr_factor
from pipetransformer.layouts import PlanInputs, next_plan, plan
from pipetransformer.models.loading import wrap_model
from pipetransformer.runtime import profile_units, unit_costs


def _units(blocks: int, seconds=None) -> tuple[UnitCost, ...]:
    names = ["embed"] + [f"block.{i}.{p}" for i in range(blocks) for p in ("attn", "mlp")] + ["head"]
    index = [0] + [i for i in range(blocks) for _ in range(2)] + [blocks]
    size = [1.0] + [4.0, 8.0] * blocks + [1.0]
    return tuple(UnitCost(n, k, s, seconds) for n, k, s in zip(names, index, size))


def test_plan_places_every_unit_and_names_its_owner():
    inputs = PlanInputs(_units(4), world=4, start_stages=4, global_batch=32)
    p = plan(inputs, frozen=1, stages=2)
    assert p.layout == Layout(4, 2) and p.replica_batch == 16 and p.micro_batches == 4
    assert len(p.bounds) == 3 and p.bounds[0] == 0 and p.bounds[-1] == 7  # 7 active units
    assert p.units_per_stage() == f"{p.bounds[1]}+{7 - p.bounds[1]}"
    # frozen units live on replica 0's first stage; active ones on their stage of replica 0
    assert {p.owners[n] for n in ("embed", "block.0.attn", "block.0.mlp")} == {0}
    stage_of = {u.name: s for s in range(2) for u in
                [u for u in inputs.units if u.freeze_index >= 1][p.bounds[s]:p.bounds[s + 1]]}
    assert all(p.owners[n] == s for n, s in stage_of.items()) and p.owners["head"] == 1
    assert len(p.owners) == len(inputs.units)


def test_per_replica_batches_and_fixed_micro_batches():
    inputs = PlanInputs(_units(4), world=4, start_stages=2, global_batch=32,
                        batch_policy="per-replica", micro_batches=2)
    p = plan(inputs, 0, 1)
    assert (p.layout.replicas, p.replica_batch, p.micro_batches) == (4, 16, 2)


def test_next_plan_halves_the_pipeline_once_the_active_part_fits():
    inputs = PlanInputs(_units(8), world=4, start_stages=4)
    start = plan(inputs, 0, 4)
    assert next_plan(inputs, start, 0).layout.stages == 4
    trace = [start]
    for k in (4, 6, 7, 8):
        trace.append(next_plan(inputs, trace[-1], k))
    stages = [t.layout.stages for t in trace]
    assert stages == sorted(stages, reverse=True) and stages[-1] == 1 and 2 in stages
    fixed = PlanInputs(_units(8), world=4, start_stages=4, elastic=False)
    assert next_plan(fixed, plan(fixed, 0, 4), 6).layout.stages == 4
    assert next_plan(fixed, plan(fixed, 0, 4), 8).layout.stages == 1  # only the head is left


def test_a_profile_moves_the_cut():
    flat = PlanInputs(_units(3, seconds=(1.0, 0.3)), world=2, start_stages=2)
    slow = list(flat.units)
    slow[1] = UnitCost("block.0.attn", 0, 4.0, (7.0, 2.0))  # as slow as everything else together
    timed = PlanInputs(tuple(slow), world=2, start_stages=2)
    assert plan(timed, 0, 2).bounds == (0, 2, 8)
    # frozen units weigh their forward time on stage 0: embed and block 0 (0.3 + 2.0 + 0.3)
    p = plan(timed, 1, 2)
    assert p.stage_costs[0] == pytest.approx(2.6 + p.bounds[1] * 1.0)
    # the compression budget is the memory of the starting stages as they are cut (stage 1: all but 2 units)
    assert timed.budget == stage_memory(plan(timed, 0, 2).bounds, *memory_costs(timed.units, 0)) == 33.0
    assert PlanInputs(_units(3), world=2, start_stages=2).budget == 21.0  # cut by size instead


def test_profile_times_every_unit_and_changes_no_state():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=50, max_position_embeddings=32)
    staged = wrap_model(transformers.BertForSequenceClassification(cfg))
    inputs = staged.inputs({"input_ids": torch.randint(0, 50, (4, 8)), "attention_mask": torch.ones(4, 8)})
    rng = torch.get_rng_state()
    seconds = profile_units(staged, inputs, "cpu")
    assert list(seconds) == [u.name for u in staged.units]
    assert all(both > 0 and fwd > 0 for both, fwd in seconds.values())
    assert torch.equal(torch.get_rng_state(), rng)  # dropout draws were undone
    assert all(p.grad is None for p in staged.hf_model.parameters())
    costs = unit_costs(staged, seconds)
    assert [c.seconds for c in costs] == list(seconds.values()) and all(c.size > 0 for c in costs)


def test_lr_warms_up_then_decays_linearly_to_zero():
    assert lr_factor(0.0, 0.1) == 0.0
    assert lr_factor(0.05, 0.1) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1) == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1) == 0.0
    assert lr_factor(0.5, 0.0) == pytest.approx(0.5)  # no warm-up
