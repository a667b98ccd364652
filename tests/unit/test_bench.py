"""`bench`'s pure part: runs -> rows, time to accuracy, speedups, tables; and its flags."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipetransformer.bench import (
    PRESETS,
    Targets,
    check_targets,
    describe_row,
    elapsed,
    expand_rows,
    format_predictions,
    format_table,
    markdown_table,
    pareto_frontier,
    parse_row,
    row_configs,
    summarize,
    time_to_target,
    train_seconds,
)
from pipetransformer.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _run(seconds, accuracy, frozen=None, transitions=None, layout=(1, 2)):
    n = len(seconds)
    return [{"epoch_seconds": s, "val_accuracy": a, "transition_seconds": t, "frozen_layers": k,
             "stages": layout[0], "replicas": layout[1], "micro_batches": 1}
            for s, a, t, k in zip(seconds, accuracy, transitions or [0.0] * n, frozen or [0] * n)]


def test_elapsed_counts_epochs_and_the_transitions_between_them():
    run = _run([10.0, 5.0, 2.0], [0.5, 0.6, 0.7], transitions=[1.0, 0.5, 0.0])
    assert elapsed(run) == [10.0, 16.0, 18.5]
    assert train_seconds(run) == 18.5


def test_time_to_target_reads_the_mean_curve_over_seeds():
    seeds = [_run([10, 10, 10], [0.70, 0.76, 0.80]), _run([12, 12, 12], [0.72, 0.80, 0.80])]
    assert time_to_target(seeds, 0.78) == pytest.approx(22.0)  # epoch 2: mean 0.78, mean time 11 + 11
    assert time_to_target(seeds, 0.81) is None


def _runs():
    return {
        "a1": [_run([30, 30, 30], [0.70, 0.78, 0.800], layout=(2, 1)), _run([30, 30, 30], [0.70, 0.78, 0.80],
                                                                           layout=(2, 1))],
        "a2": [_run([20, 20, 20], [0.70, 0.78, 0.802]), _run([20, 20, 20], [0.70, 0.78, 0.798])],
        "d": [_run([30, 8, 2], [0.72, 0.799, 0.797], frozen=[0, 2, 4], transitions=[0.5, 0.1, 0.0]),
              _run([30, 8, 2], [0.72, 0.797, 0.793], frozen=[0, 3, 4], transitions=[0.5, 0.1, 0.0])],
    }


def test_summary_has_accuracy_over_seeds_speedups_and_the_target():
    summary = summarize(_runs(), {"a1": [100.0, 100.0], "a2": [70.0, 70.0], "d": [50.0, 54.0]})
    assert summary["target_accuracy"] == pytest.approx(0.800 - Targets.accuracy_gap)
    d = summary["rows"]["d"]
    assert d["final_accuracy"] == pytest.approx(0.795) and d["final_accuracy_std"] == pytest.approx(0.004 / 2 ** 0.5)
    assert d["best_accuracy"] == pytest.approx(0.798)
    assert d["train_seconds"] == pytest.approx(40.6) and d["total_seconds"] == 52.0
    assert d["transition_share"] == pytest.approx(0.6 / 40.6)
    # mean curve 0.72, 0.798, 0.795 against 0.797: reached after epoch 2, at 30 + 0.5 + 8 s
    assert d["time_to_target"] == pytest.approx(38.5)
    assert summary["rows"]["a2"]["time_to_target"] == pytest.approx(60.0)
    assert d["speedup_over_a1"] == pytest.approx(90 / 40.6) and d["speedup_over_a2"] == pytest.approx(60 / 40.6)
    assert d["tta_speedup_over_a1"] == pytest.approx(90 / 38.5)
    assert d["frozen_layers"] == [[0, 2, 4], [0, 3, 4]]
    over_a1, over_a2, over_plain, accuracy, matched, transitions = check_targets(summary, Targets(row="d"))
    assert over_a1 == "d over a1 in time to accuracy: 2.34x (target 2.5x: missed by 0.16x)"
    assert over_a2 == "d over a2 in time to accuracy: 1.56x (target 1.5x: met)"
    assert summary["fastest_plain"] == "a2" and over_plain.startswith("d over the fastest plain layout (a2) ")
    assert accuracy == ("d's mean final accuracy against a2's: -0.50 points "
                        "(target at most 0.3 below: missed by 0.20 points)")
    # without a2@E rows, a2 itself is the nearest in time: d's finals 0.797, 0.793 against 0.802, 0.798
    assert matched == "d's mean final accuracy against the time-matched a2's: -0.50 ± 0.00 points (target higher: " \
                      "missed by 0.50 points)"
    assert transitions.startswith("transitions: at most 1.5 % of training time (d) (target 2 %: met)")
    assert check_targets(summary, Targets(row="x")) == ["targets: need rows a2 and x"]


def test_never_reaching_the_target_is_said_and_speedups_stay_empty():
    runs = _runs()
    runs["d"] = [_run([30, 8, 2], [0.70, 0.70, 0.70])]
    summary = summarize(runs, {"a1": [100.0] * 2, "a2": [70.0] * 2, "d": [50.0]})
    assert summary["rows"]["d"]["time_to_target"] is None
    assert summary["rows"]["d"]["tta_speedup_over_a1"] is None
    table = format_table(summary)
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["a1", "a2", "d"]
    assert "never" in lines[3] and any(line.startswith("target: ") for line in lines[4:])
    md = markdown_table(summary).splitlines()
    assert md[0].startswith("| config |") and len(md) == 5 and "never" in md[-1]
    planned = format_predictions(summary, {"a1": [33.0] * 3, "a2": [20.0] * 3, "d": [30.0, 8.0, 1.0]})
    assert "+10%" in planned and "-50%" in planned


def test_bench_flags_are_checked_before_anything_runs(tmp_path, capsys):
    assert main(["bench", "--small", "--configs", "a1,z", "--out", str(tmp_path / "b")]) == 2
    assert "--configs='a1,z'" in capsys.readouterr().err
    assert main(["bench", "--small", "--configs", "a2@0", "--out", str(tmp_path / "b")]) == 2
    assert "--configs='a2@0'" in capsys.readouterr().err
    assert main(["bench", "--small", "--train-less", "d", "--out", str(tmp_path / "b")]) == 2
    assert "--train-less='d' is invalid: name a row without freezing" in capsys.readouterr().err
    assert main(["bench", "--small", "--seeds", "0", "--out", str(tmp_path / "b")]) == 2
    assert main(["bench", "--small", "--batch-size", "3", "--out", str(tmp_path / "b")]) == 2
    assert "bench row a1" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # a profile of another process count: its times are not the runs'
    profile = tmp_path / "p.json"
    profile.write_text(json.dumps({**json.loads((ROOT / "benchmarks" / "results" / "profile_bert-base_cpu.json")
                                                 .read_text()), "processes": 1, "cores": 2}))
    assert main(["bench", "--small", "--profile", str(profile), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert "was measured as one of 1 process(es) and this bench runs 2" in err and "--processes 2" in err
    assert not (tmp_path / "b").exists()


def test_rows_name_variants_and_epochs_and_the_train_less_family_follows_its_row():
    assert parse_row("a2") == ("a2", None) and parse_row("a2@3") == ("a2", 3)
    for bad in ("z", "a2@", "a2@0", "a2@x", "z@2"):
        with pytest.raises(ValueError):
            parse_row(bad)
    assert expand_rows(["p1", "a2", "d-auto"], "a2", 4) == ["p1", "a2", "a2@1", "a2@2", "a2@3", "d-auto"]
    assert expand_rows(["a2", "a2@2"], "a2", 3) == ["a2", "a2@1", "a2@2"]
    assert expand_rows(["d"], "a2", 4) == ["d"] and expand_rows(["a2"], "", 4) == ["a2"]


def test_row_settings_keep_the_papers_start_only_where_the_variant_does():
    from pipetransformer.config import ALL_STAGES, Config, apply_overrides
    base = apply_overrides(Config(), {k: v for k, v in PRESETS["default"].config.items()})
    configs = row_configs(base, ["p1", "a1", "a2@2", "d", "d-auto", "d-update-ratio"])
    assert (configs["p1"].parallel.nproc, configs["p1"].parallel.stages, configs["p1"].freeze.freeze) == (1, 1, "off")
    assert configs["a1"].parallel.stages == configs["d"].parallel.stages == ALL_STAGES
    assert configs["d-auto"].parallel.stages == configs["d-update-ratio"].parallel.stages == 0  # auto
    assert configs["d-update-ratio"].freeze.freeze_policy == "update-ratio"
    assert (configs["a2@2"].train.epochs, configs["a2@2"].parallel.stages) == (2, 1)
    assert configs["d"].train.epochs == 4


def test_a_row_can_change_settings_and_keeps_them_apart_from_its_variants_family():
    from pipetransformer.config import Config, ConfigError, apply_overrides
    assert parse_row("d-auto:alpha=0.2:freeze-every=8@3") == ("d-auto:alpha=0.2:freeze-every=8", 3)
    for bad in ("d-auto:alpha", "d-auto:=1", "z:alpha=0.2", "d-auto:alpha=", "d-auto:alpha=0.2@0"):
        with pytest.raises(ValueError):
            parse_row(bad)
    assert describe_row("d-auto:alpha=0.2@2").endswith(", alpha=0.2, trained for 2 epoch(s)")
    base = apply_overrides(Config(), {k: v for k, v in PRESETS["default"].config.items()})
    configs = row_configs(base, ["d-auto:alpha=0.2:freeze-every=8", "a2:lr=1e-4@2"])
    cfg = configs["d-auto:alpha=0.2:freeze-every=8"]
    assert (cfg.freeze.alpha, cfg.freeze.freeze_every, cfg.parallel.stages) == (0.2, 8, 0)
    assert (configs["a2:lr=1e-4@2"].train.lr, configs["a2:lr=1e-4@2"].train.epochs) == (1e-4, 2)
    with pytest.raises(ConfigError, match="bench row d-auto:alfa=0.2: unknown setting 'alfa'"):
        row_configs(base, ["d-auto:alfa=0.2"])
    # a2 with another learning rate is not the a2 family that d-auto is compared with
    runs = _runs()
    runs["a2:lr=1e-4@2"] = [_run([20, 20], [0.9, 0.9]), _run([20, 20], [0.9, 0.9])]  # nearer d's 40.6 s than a2
    m = summarize(runs, {n: [1.0] * len(r) for n, r in runs.items()})["rows"]["d"]["time_matched"]
    assert m["baseline"] == "a2"


def test_time_matched_baseline_pairs_seeds_and_the_frontier_keeps_the_undominated():
    runs = _runs()
    runs["a2@1"] = [_run([20], [0.70]), _run([20], [0.72])]
    runs["a2@2"] = [_run([20, 20], [0.70, 0.79]), _run([20, 20], [0.70, 0.785])]
    runs["p1"] = [_run([15, 15, 15], [0.70, 0.78, 0.80])] * 2
    summary = summarize(runs, {n: [1.0] * len(r) for n, r in runs.items()})
    rows = summary["rows"]
    assert summary["fastest_plain"] == "p1"  # a2@E is no full-length baseline
    d = rows["d"]  # 40.6 s: nearest a2@2 (40 s); d's finals 0.797, 0.793 against 0.79, 0.785
    m = d["time_matched"]
    assert m["baseline"] == "a2@2" and m["seeds"] == 2
    assert m["gap"] == pytest.approx(0.0075) and m["gap_std"] == pytest.approx(0.001 / 2 ** 0.5)
    # between a2@2 (40 s, 0.7875) and a2 (60 s, 0.800)
    assert m["interpolated_accuracy"] == pytest.approx(0.7875 + 0.0125 * 0.6 / 20)
    assert "time_matched" not in rows["a2"] and "time_matched" not in rows["p1"]
    assert d["tta_speedup_over_fastest_plain"] == pytest.approx(45 / 38.5)
    # a2@1 20 s 0.71; a2@2 40 s 0.7875; d 40.6 s 0.795; p1 45 s 0.80; a2 60 s 0.80 (no better than p1)
    assert summary["frontier"] == ["a2@1", "a2@2", "d", "p1"]
    assert pareto_frontier({"x": {"train_seconds": 1.0, "final_accuracy": 0.5},
                            "y": {"train_seconds": 2.0, "final_accuracy": 0.4}}) == ["x"]
    table = format_table(summary)
    assert "Pareto frontier (training time against final accuracy): a2@1, a2@2, d, p1" in table
    assert "d against a2@2 at about equal time (40.6 s against 40.0 s): +0.75 ± 0.07 points" in table
    line = [x for x in check_targets(summary, Targets(row="d")) if "time-matched" in x]
    assert line == ["d's mean final accuracy against the time-matched a2@2's: +0.75 ± 0.07 points (target higher: met)"]
