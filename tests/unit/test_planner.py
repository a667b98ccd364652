"""The planner: a pure simulation of a run from a profile and a hardware description, the
profile file, and the `plan` command on a saved profile."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import transformers

from pipetransformer.autofreeze import closed_form
from pipetransformer.cli import main
from pipetransformer.config import Config, apply_overrides
from pipetransformer.costs import Hardware, Profile, UnitProfile, read_profile, write_profile
from pipetransformer.errors import ConfigError
from pipetransformer.layouts import PlanInputs, next_plan, plan
from pipetransformer.models.loading import wrap_model
from pipetransformer.planner import _linear, assumed_trace, micro_batch_rule, predict, simulate, start_stages
from pipetransformer.profiling import measure_profile

from conftest import make_csv, make_model_folder

MS = 1e-3


def _profile(blocks: int = 4, fixed: float = 0.0, out_bytes: float = 1000.0) -> Profile:
    """Every block section: forward 1 ms a row, backward 2 ms a row (+ `fixed` per call)."""
    def unit(name: str, index: int, size: int, scale: float = 1.0) -> UnitProfile:
        return UnitProfile(name, index, size, 4 * size, out_bytes, 10 * out_bytes,
                           (fixed + 8 * scale * MS, fixed + 32 * scale * MS),
                           (fixed + 16 * scale * MS, fixed + 64 * scale * MS), 0.5 * MS)
    units = [unit("embed", 0, 0, 0.1)]
    units += [unit(f"block.{i}.{part}", i, 1000) for i in range(blocks) for part in ("attn", "mlp")]
    units.append(unit("head", blocks, 10, 0.01))
    return Profile("toy", "text", tuple(units), (8, 32), 16, "cpu", "test cpu", 1, "float32")


def _config(**overrides) -> Config:
    base = {"epochs": 4, "batch_size": 32, "freeze": "schedule", "alpha": 0.5, "train_samples": 320}
    return apply_overrides(Config(), {**base, **overrides})


FREE = dict(latency_us=0.0, intra_gb_s=1e6, inter_gb_s=1e6)  # communication costs nothing


def test_linear_fit_has_a_fixed_and_a_per_row_part_never_below_zero():
    assert _linear((8, 32), (0.010, 0.034), 16) == pytest.approx(0.018)  # 2 ms + 1 ms a row
    assert _linear((8, 32), (0.040, 0.030), 64) == pytest.approx(0.040)  # no per-row part: fixed
    assert _linear((32,), (0.032,), 8) == pytest.approx(0.008)           # one batch: proportional


def test_one_device_epoch_is_steps_times_forward_backward_and_update():
    prof = _profile()
    epochs = simulate(prof, Hardware(1, **FREE), _config(freeze="off"), samples=320)
    per_row = sum(u.forward_seconds[1] + u.backward_seconds[1] for u in prof.units) / 32
    step = 32 * per_row + sum(u.update_seconds for u in prof.units)
    assert [e.seconds for e in epochs] == pytest.approx([10 * step] * 4)  # 320 // 32 = 10 steps
    assert all(e.bubble_seconds == pytest.approx(0) and e.allreduce_seconds == 0 for e in epochs)


def test_pipeline_bubble_is_k_minus_1_over_m_plus_k_minus_1_for_balanced_stages():
    prof = _profile()
    epoch = simulate(prof, Hardware(2, **FREE), _config(freeze="off", micro_batches=4, stages=2), 320,
                     choose_micro_batches=False)[0]
    assert (epoch.stages, epoch.replicas, epoch.micro_batches) == (2, 1, 4)
    busy_and_bubble = epoch.compute_seconds + epoch.bubble_seconds
    # stages are nearly balanced (embed and head are light): bubble close to 1/(M+1)
    assert epoch.bubble_seconds / busy_and_bubble == pytest.approx(1 / 5, rel=0.05)


def test_micro_batches_chosen_by_the_model_trade_bubble_against_per_call_cost():
    cfg = _config(freeze="off", stages=2)
    free = simulate(_profile(fixed=0.0), Hardware(2, **FREE), cfg, 320)[0]
    assert free.micro_batches == 32  # no cost per call: the smallest bubble wins
    costly = simulate(_profile(fixed=20 * MS), Hardware(2, **FREE), cfg, 320)[0]
    assert costly.micro_batches == 2  # every call costs: as few micro-batches as stages
    trainer = simulate(_profile(fixed=20 * MS), Hardware(2, **FREE), cfg, 320, choose_micro_batches=False)[0]
    assert trainer.micro_batches == 4  # the fixed rule, 2 x stages
    assert costly.seconds < trainer.seconds
    # the trainer's --micro-batches auto: the same choice on its own transition plans
    rule = micro_batch_rule(_profile(fixed=20 * MS), Hardware(2, **FREE), cfg, 320)
    inputs = PlanInputs(_profile().unit_costs(False), 2, 2, True, 32, choose_micro_batches=rule)
    assert plan(inputs, 0, 2).micro_batches == 2 and plan(inputs, 0, 1).micro_batches == 1
    assert plan(dataclasses.replace(inputs, micro_batches=8), 0, 2).micro_batches == 8  # a number fixes it


def test_stages_auto_starts_from_the_fastest_layout_that_fits():
    prof, cfg = _profile(), _config(freeze="off")
    # communication free, no cost per call: data parallelism has no bubble and wins
    assert start_stages(prof, Hardware(2, **FREE), cfg, 320)[0] == 1
    assert simulate(prof, Hardware(2, **FREE), cfg, 320)[0].stages == 1  # plan starts there too
    # an all-reduce of every weight over a slow link costs more than the pipeline's bubble and
    # its small activations between stages
    slow = Hardware(2, latency_us=0.0, intra_gb_s=1e-4)
    stages, why = start_stages(_profile(out_bytes=1.0), slow, cfg, 320)
    assert stages == 2 and "fastest priced per sample (1x2" in why and "2x1" in why
    # one replica's whole model over the memory, half of it within: the pipeline, whatever its speed
    one = simulate(prof, Hardware(2, **FREE), _config(freeze="off", stages=1), 320)[0].peak_memory_gb
    half = simulate(prof, Hardware(2, **FREE), _config(freeze="off", stages=2), 320)[0].peak_memory_gb
    assert half < one
    tight = Hardware(2, memory_gb=(one + half) / 2, **FREE)
    stages, why = start_stages(prof, tight, cfg, 320)
    assert stages == 2 and "1 over" in why
    stages, why = start_stages(prof, Hardware(2, memory_gb=half / 2, **FREE), cfg, 320)
    assert stages == 2 and why.startswith("no layout fits")
    assert start_stages(prof, slow, _config(stages=1), 320) == (1, "--stages")


def test_layouts_are_the_trainers_own_transition_plans():
    prof, cfg = _profile(blocks=8), _config(epochs=5, alpha=1 / 3, batch_size=64, train_samples=640)
    epochs = simulate(prof, Hardware(4, **FREE), cfg, 640)
    cfg = apply_overrides(cfg, {"stages": 4})
    epochs = simulate(prof, Hardware(4, **FREE), cfg, 640)
    inputs = PlanInputs(prof.unit_costs(False), 4, 4, True, 64)
    current, expected = plan(inputs, 0, 4), []
    for t in range(5):
        current = next_plan(inputs, current, closed_form(8, 1 / 3, t))
        expected.append((current.frozen, current.layout.stages, current.layout.replicas))
    assert [(e.frozen_layers, e.stages, e.replicas) for e in epochs] == expected
    assert epochs[0].stages == 4 and epochs[-1].stages < 4  # compressed, replicas added


def test_cache_fills_in_the_first_frozen_epoch_and_is_read_after():
    prof = _profile()
    epochs = simulate(prof, Hardware(1, **FREE), _config(), 320)
    assert [e.frozen_layers for e in epochs] == [0, 2, 3, 4]
    assert [e.cache for e in epochs] == ["off", "fill", "read", "read"]
    assert epochs[1].cache_tier == "host" and epochs[2].prefix_seconds < epochs[1].prefix_seconds / 10
    off = simulate(prof, Hardware(1, **FREE), _config(cache="off"), 320)
    assert [e.cache for e in off] == ["off"] * 4 and off[2].prefix_seconds > epochs[2].prefix_seconds
    # opening (a probe) and advancing (the rows through the newly frozen blocks) cost transition time
    assert all(on.transition_seconds > no.transition_seconds for on, no in zip(epochs[:3], off[:3]))
    spilled = simulate(prof, Hardware(1, host_memory_gb=4e-4, **FREE), _config(), 320)
    assert spilled[2].cache_tier == "host+disk"


def test_assumed_trace_is_the_cap_for_every_rule():
    assert assumed_trace(12, 5, "schedule", 1 / 3, "through-min") == [closed_form(12, 1 / 3, t) for t in range(5)]
    for rule in ("through-min", "below-min"):
        assert assumed_trace(6, 4, "adaptive", 1 / 3, rule) == [0, 2, 4, 5]
    assert assumed_trace(6, 3, "off", 1 / 3, "through-min") == [0, 0, 0]


def test_speedups_compare_with_a1_and_a2_on_the_same_devices():
    pred = predict(_profile(blocks=8), Hardware(4, **FREE), _config(epochs=6, batch_size=64, train_samples=640), 640)
    assert {(e.stages, e.replicas, e.frozen_layers) for e in pred.a1} == {(4, 1, 0)}
    assert {(e.stages, e.replicas, e.frozen_layers) for e in pred.a2} == {(1, 4, 0)}
    assert pred.speedup_over_a1 == pytest.approx(pred.total(pred.a1) / pred.total_seconds)
    assert pred.speedup_over_a1 > pred.speedup_over_a2 > 1
    out = pred.to_dict()
    assert {"stages", "replicas", "frozen_layers", "micro_batches", "seconds"} <= set(out["epochs"][0])
    assert out["speedup_over_a2"] == pytest.approx(pred.speedup_over_a2)


def test_machines_slow_the_all_reduce_and_memory_is_checked():
    cfg = _config(freeze="off", stages=1, batch_size=64, train_samples=640)
    one = simulate(_profile(), Hardware(4, latency_us=0, intra_gb_s=10, inter_gb_s=10, gpu=True), cfg, 640)[0]
    two = simulate(_profile(), Hardware(4, per_node=2, latency_us=0, intra_gb_s=10, inter_gb_s=1, gpu=True),
                   cfg, 640)[0]
    assert two.allreduce_seconds == pytest.approx(10 * one.allreduce_seconds)
    assert one.fits and not simulate(_profile(), Hardware(4, memory_gb=1e-6), cfg, 640)[0].fits


def test_bad_trace_and_hardware_are_named():
    with pytest.raises(ConfigError, match="--trace"):
        simulate(_profile(), Hardware(1), _config(), 320, trace=[0, 2, 1, 3])
    with pytest.raises(ConfigError, match="0 to 4"):
        simulate(_profile(), Hardware(1), _config(), 320, trace=[0, 2, 3, 5])
    with pytest.raises(ConfigError, match="--per-node"):
        Hardware(16, per_node=6)
    with pytest.raises(ConfigError, match="--speed"):
        Hardware(2, speed=0)


def test_profile_file_round_trips_and_a_bad_file_is_named(tmp_path):
    prof = _profile()
    write_profile(prof, tmp_path / "p.json")
    assert read_profile(tmp_path / "p.json") == prof
    assert [c.seconds for c in prof.unit_costs(True)][1] == pytest.approx((0.032 + 0.064, 0.032))
    (tmp_path / "bad.json").write_text('{"units": []}')
    with pytest.raises(ConfigError, match="not a profile file"):
        read_profile(tmp_path / "bad.json")


def test_measured_profile_of_a_tiny_bert(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=50, max_position_embeddings=32)
    model = wrap_model(transformers.BertForSequenceClassification(cfg))
    before = {n: p.clone() for n, p in model.hf_model.named_parameters()}
    prof = measure_profile(model, "tiny", (2, 8), 16, "cpu")
    assert [u.name for u in prof.units] == [u.name for u in model.units] and prof.num_blocks == 2
    block = prof.units[1]
    assert block.output_bytes == 16 * 32 * 4 and block.saved_bytes > block.output_bytes
    assert all(len(u.forward_seconds) == 2 and min(u.forward_seconds) > 0 for u in prof.units)
    assert block.param_bytes == 4 * sum(p.numel() for p in model.units[1].module.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.hf_model.named_parameters())
    write_profile(prof, tmp_path / "tiny.json")
    assert dataclasses.asdict(read_profile(tmp_path / "tiny.json")) == dataclasses.asdict(prof)


def test_plan_command_prints_json_and_a_table(tmp_path, capsys):
    write_profile(_profile(blocks=8), tmp_path / "p.json")
    args = ["plan", "--profile", str(tmp_path / "p.json"), "--devices", "16", "--per-node", "8",
            "--train-samples", "6400", "--batch-size", "64", "--epochs", "5"]
    assert main([*args, "--stages", "16", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["epochs"]) == 5 and out["epochs"][0]["stages"] == 16 and out["speedup_over_a1"] > 1
    assert main(args) == 0  # --stages auto; a1 is still the paper's one pipeline over every device
    assert "a1 (16x1 fixed, no freezing)" in capsys.readouterr().out
    assert main([*args, "--stages", "3"]) == 2
    assert "--stages=3" in capsys.readouterr().err


def test_profile_and_plan_check_the_model_before_timing_it(tmp_path, capsys):
    model, data = make_model_folder(tmp_path / "bert", layers=2), make_csv(tmp_path / "r.csv", rows=40)
    capsys.readouterr()  # making the folder may draw a progress bar
    for command in (["profile", "--out", str(tmp_path / "p.json")], ["plan"]):
        assert main([*command, "--model", str(model), "--data", str(data), "--max-length", "64"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "--max-length=64" in err and "40 positions" in err, err
    assert not (tmp_path / "p.json").exists()
    (tmp_path / "p.json").write_text("measured earlier\n")
    assert main(["profile", "--out", str(tmp_path / "p.json"), "--model", str(model), "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "p.json' exists already; nothing was overwritten" in err, err
    assert (tmp_path / "p.json").read_text() == "measured earlier\n"


def test_cpu_processes_sharing_cores_wait_only_while_more_of_them_compute_than_cores():
    prof, cfg = _profile(), _config(freeze="off", micro_batches=8, stages=4)
    # measured as one of 4 processes on 2 cores (each at half speed), planned on that machine
    prof4, shared = dataclasses.replace(prof, processes=4, cores=2), Hardware(4, cores=2, threads=1, **FREE)
    assert prof4.sharing == shared.oversubscription == 2 and Hardware(2, cores=2).oversubscription == 1
    assert Hardware(4, cores=2, gpu=True).oversubscription == 1  # GPUs do not share cores
    # data parallel: all 4 replicas compute the whole step at once, at the profiled (shared) speed
    dp_cfg = apply_overrides(cfg, {"stages": 1})
    dp = simulate(prof4, shared, dp_cfg, 640, choose_micro_batches=False)[0]
    assert dp.seconds == pytest.approx(simulate(prof, Hardware(4, **FREE), dp_cfg, 640, choose_micro_batches=False)[0]
                                       .seconds)
    assert dp.wait_seconds == pytest.approx(dp.compute_seconds + dp.update_seconds)
    # a 4-stage pipeline: stages filling and draining leave cores free, the 4 busy in the middle share 2
    alone = simulate(prof, Hardware(4, **FREE), cfg, 640, choose_micro_batches=False)[0]
    pp = simulate(prof4, shared, cfg, 640, choose_micro_batches=False)[0]
    assert pp.stages == 4 and alone.seconds / 2 < pp.seconds < alone.seconds
    slots = [max(1.0, sum(0 <= j - s < 8 for s in range(4)) / 2) for j in range(11)]  # 1,1,1.5,2,...,1.5,1,1
    fb = pp.compute_seconds + pp.bubble_seconds + pp.p2p_seconds
    assert pp.wait_seconds == pytest.approx(fb * (sum(slots) / 11 - 1) + pp.update_seconds, rel=1e-6)
    # a profile of one process alone, planned for 4 on 2 cores: no division, the same waits
    solo = simulate(prof, shared, cfg, 640, choose_micro_batches=False)[0]
    assert solo.seconds == pytest.approx(2 * pp.seconds)
    # two machines of 2 processes and 1 core each: a slot is as slow as its busiest machine
    # (stages 0,1 on one, 2,3 on the other; with 4 micro-batches: 1,2,2,2,2,2,1)
    two_machines = Hardware(4, per_node=2, cores=1, threads=1, **FREE)
    two = simulate(prof, two_machines, apply_overrides(cfg, {"micro_batches": 4}), 640, choose_micro_batches=False)[0]
    fb = two.compute_seconds + two.bubble_seconds + two.p2p_seconds
    assert two.wait_seconds == pytest.approx(fb * (12 / 7 - 1) + two.update_seconds, rel=1e-6)
    with pytest.raises(ConfigError, match="--threads=0 is invalid: use a positive number"):
        Hardware(2, cores=2, threads=0)


def test_cores_are_the_ones_this_process_may_use():
    """A process pinned to one core (taskset, a container) gives its runs one thread and
    records one core in its profile, whatever the machine has."""
    import subprocess
    import sys
    code = ("import os; os.sched_setaffinity(0, {0}); "
            "from pipetransformer.costs import usable_cores, threads_per_process; "
            "print(usable_cores(), threads_per_process(usable_cores(), 1))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["1", "1"]
