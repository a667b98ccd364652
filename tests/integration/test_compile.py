"""--compile: the compiled run trains like the eager one, and compiling counts in the time it takes."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import make_model_folder, run_cli, run_command

pytestmark = pytest.mark.integration


def _train(run_dir, model, data, *extra):
    runner = run_cli if "--compile" in extra else run_command  # dynamo's caches stay out of the test process
    out = runner("train", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
                 "--epochs", "2", "--batch-size", "16", "--train-samples", "64", "--max-length", "16",
                 "--freeze", "schedule", "--alpha", "0.5", "--dropout", "off", "--cache", "off", *extra)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()], out.stdout


def test_compiled_run_matches_eager_and_recompiles_after_the_transition(tmp_path, tiny_csv):
    model = make_model_folder(tmp_path / "bert", layers=1)
    eager, _ = _train(tmp_path / "eager", model, tiny_csv)
    compiled, stdout = _train(tmp_path / "compiled", model, tiny_csv, "--compile")
    assert [r["frozen_layers"] for r in compiled] == [0, 1]
    # compiled once at the start, once more for the new layout after epoch 1 (inside its transition)
    assert stdout.count("compiled layout") == 2, stdout
    assert compiled[0]["compile_seconds"] > 0
    # the transition's recompile (seconds, against a transition of milliseconds) is in its time
    assert compiled[0]["transition_seconds"] > eager[0]["transition_seconds"] + 0.5
    assert all(r["compile_seconds"] == 0 for r in eager)
    got = torch.tensor([x for r in compiled for x in r["step_losses"]])
    ref = torch.tensor([x for r in eager for x in r["step_losses"]])
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)  # fused kernels round differently
    assert compiled[-1]["val_loss"] == pytest.approx(eager[-1]["val_loss"], rel=1e-4)
