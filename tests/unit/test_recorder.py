"""The freeze-timeline picture a run leaves beside metrics.png."""
from __future__ import annotations

import matplotlib.image

from pipetransformer.recorder import _decision_points, plot_freeze_timeline


def _record(epoch: int, frozen: int, decision: dict | None, layout=(2, 1)) -> dict:
    rec = {"epoch": epoch, "frozen_layers": frozen, "total_layers": 6, "stages": layout[0], "replicas": layout[1]}
    if decision is not None:
        rec["decision"] = decision
    return rec


def test_the_timeline_draws_each_decision_and_nothing_without_one(tmp_path):
    adaptive = {"policy": "paper", "statistic": "grad_norm", "threshold": None}
    records = [
        _record(1, 0, {**adaptive, "cap": 2, "values": [0.1, 0.5, 0.9, 1.0, 1.2, 2.0], "converged": 1, "frozen": 1}),
        _record(2, 1, {**adaptive, "cap": 4, "values": [0.0, 0.2, 0.3, 0.8, 1.5, 2.2], "converged": 2, "frozen": 2},
                (1, 2)),
        _record(3, 2, None, (1, 2)),
    ]
    path = tmp_path / "freeze-timeline.png"
    assert plot_freeze_timeline(records, path)
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 400 and height > 200
    assert not plot_freeze_timeline([_record(1, 0, None)], tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
    off = [_record(1, 0, {"frozen": 0}), _record(2, 0, None)]  # --freeze off decides nothing worth a picture
    assert not plot_freeze_timeline(off, tmp_path / "off.png") and not (tmp_path / "off.png").exists()
    # a schedule run: decisions without a statistic still show the boundary and the layouts
    schedule = [_record(1, 0, {"cap": 3, "frozen": 3}), _record(2, 3, None, (1, 2))]
    assert plot_freeze_timeline(schedule, tmp_path / "schedule.png")


def test_decisions_inside_an_epoch_come_before_its_end_each_from_the_count_before_it(tmp_path):
    first = _record(1, 0, {"cap": 3, "frozen": 3})
    first["decisions_within"] = [{"step": 2, "decision": {"cap": 1, "frozen": 1}, "stages": 2, "replicas": 1},
                                 {"step": 4, "decision": {"cap": 2, "frozen": 2}, "stages": 1, "replicas": 2}]
    records = [first, _record(2, 3, None, (1, 2))]
    assert [(label, before, layout) for label, _, before, layout in _decision_points(records)] == [
        ("1:2", 0, "2x1"), ("1:4", 1, "1x2"), ("after 1", 2, "1x2")]
    assert plot_freeze_timeline(records, tmp_path / "within.png")
