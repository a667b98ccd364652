"""`pipetransformer bench --small` end to end: five real 2-process runs, a profile, the
planner beside them, and the JSON, markdown and plot they leave (4.5-6.5 minutes measured on
the 2-core machine under load averages of 3-6 from other test runs)."""
from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.integration


def test_small_bench_runs_the_ablation_and_writes_its_tables(tmp_path):
    out = tmp_path / "bench"
    done = run_cli("bench", "--small", "--out", str(out), timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "bench.json").read_text())
    rows = result["rows"]
    assert list(rows) == ["a1", "a2", "b", "c", "d"]
    for name, row in rows.items():
        assert row["seeds"] == 1 and 0.4 < row["final_accuracy"] <= 1, name
        assert len(row["epoch_seconds"]) == len(row["planned_epoch_seconds"]) == 3
        assert all(s > 0 for s in row["planned_epoch_seconds"])
        assert row["speedup_over_a1"] > 0 and row["speedup_over_a2"] > 0
    assert rows["a1"]["layouts"] == [["2x1"] * 3] and rows["a1"]["frozen_layers"] == [[0, 0, 0]]
    assert rows["a2"]["layouts"] == [["1x2"] * 3]
    for name in ("b", "c", "d"):  # the alpha schedule, 1/2: 0, 3, 5 of 6 blocks
        assert rows[name]["frozen_layers"] == [[0, 3, 5]], name
    assert rows["b"]["layouts"] == [["2x1"] * 3]  # freezes, never re-lays out
    # MiniLM's vocabulary (11.7 M of its 22.7 M parameters) sits on stage 0 at the start and sets the
    # memory budget, so once 3 blocks freeze one stage holding the rest fits within it
    assert rows["c"]["layouts"] == rows["d"]["layouts"] == [["2x1", "1x2", "1x2"]]
    assert rows["d"]["speedup_over_a1"] > 1.2  # five of six blocks frozen in the last epoch must pay
    assert result["target_accuracy"] == pytest.approx(rows["a2"]["final_accuracy"] - 0.003)
    md = (out / "bench.md").read_text()
    assert "pipetransformer bench --small" in md and md.count("\n| ") >= 6
    assert (out / "bench.png").stat().st_size > 20_000
    lines = done.stdout.splitlines()
    assert any(line.startswith("d ") for line in lines) and any("planned" in line for line in lines)
