"""`bench`'s pure part: runs -> rows, time to accuracy, speedups, tables; and its flags."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipetransformer.bench import (
    TARGET_MARGIN,
    check_targets,
    elapsed,
    format_predictions,
    format_table,
    markdown_table,
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
    assert summary["target_accuracy"] == pytest.approx(0.800 - TARGET_MARGIN)
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
    speed, accuracy, transitions = check_targets(summary)
    assert speed == "d over a1 in time to accuracy: 2.34x (target 2.5x: missed by 0.16x)"
    assert accuracy == ("d's mean final accuracy against a2's: -0.50 points "
                        "(target: at most 0.3 below: missed by 0.20 points)")
    assert transitions.startswith("transitions: at most 1.5 % of training time (d) (target 2 %: met)")


def test_never_reaching_the_target_is_said_and_speedups_stay_empty():
    runs = _runs()
    runs["d"] = [_run([30, 8, 2], [0.70, 0.70, 0.70])]
    summary = summarize(runs, {"a1": [100.0] * 2, "a2": [70.0] * 2, "d": [50.0]})
    assert summary["rows"]["d"]["time_to_target"] is None
    assert summary["rows"]["d"]["tta_speedup_over_a1"] is None
    table = format_table(summary)
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["a1", "a2", "d"]
    assert "never" in lines[3] and "target:" in lines[-1]
    md = markdown_table(summary).splitlines()
    assert md[0].startswith("| config |") and len(md) == 5 and "never" in md[-1]
    planned = format_predictions(summary, {"a1": [33.0] * 3, "a2": [20.0] * 3, "d": [30.0, 8.0, 1.0]})
    assert "+10%" in planned and "-50%" in planned


def test_bench_flags_are_checked_before_anything_runs(tmp_path, capsys):
    assert main(["bench", "--small", "--configs", "a1,z", "--out", str(tmp_path / "b")]) == 2
    assert "--configs='a1,z'" in capsys.readouterr().err
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
