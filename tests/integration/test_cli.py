"""The command line end to end: a real (tiny) run's outputs, and a run folder never overwritten."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli

pytestmark = pytest.mark.integration

REQUIRED_FIELDS = {"epoch", "frozen_layers", "total_layers", "stages", "replicas", "micro_batches",
                   "train_loss", "val_loss", "val_accuracy", "epoch_seconds", "samples_per_second",
                   "transition_seconds"}


def test_tiny_run_writes_metrics_plot_and_a_loadable_model(tmp_path, tiny_bert, tiny_csv):
    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_bert), "--data", str(tiny_csv), "--run-dir", str(run),
            "--epochs", "3", "--batch-size", "16", "--max-length", "16", "--lr", "3e-3",
            "--freeze", "schedule", "--alpha", "0.5"]
    out = run_cli(*args)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and REQUIRED_FIELDS <= set(records[0])
    assert [r["frozen_layers"] for r in records] == [0, 4, 6]
    assert (run / "metrics.png").stat().st_size > 10_000
    assert (run / "freeze-timeline.png").stat().st_size > 10_000 and "freeze-timeline.png" in out.stdout + out.stderr
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run / "final")
    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    with torch.no_grad():
        logits = model(**tok(["the movie was great", "awful plot"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)
    # the same run folder again: refused, and nothing in it is touched
    before = (run / "metrics.jsonl").read_bytes()
    again = run_cli(*args)
    assert again.returncode == 2 and "already holds a finished run" in again.stderr
    assert (run / "metrics.jsonl").read_bytes() == before


def test_a_non_finite_loss_ends_the_run_with_one_line_naming_the_step(tmp_path, tiny_bert, tiny_csv):
    """A broken model file (a NaN in the head) trains every weight to NaN: the run stops at the
    epoch's loss check, exit 1, one line from the launcher, no final model."""
    import shutil

    from safetensors.torch import load_file, save_file
    broken = shutil.copytree(tiny_bert, tmp_path / "broken")
    weights = load_file(broken / "model.safetensors")
    weights["classifier.weight"][0, 0] = float("nan")
    save_file(weights, broken / "model.safetensors")
    run = tmp_path / "run"
    out = run_cli("train", "--model", str(broken), "--data", str(tiny_csv), "--run-dir", str(run), "--nproc", "2",
                  "--epochs", "2", "--batch-size", "16", "--max-length", "16")
    lines = [x for x in out.stderr.splitlines() if x.startswith("error")]
    assert out.returncode == 1 and len(lines) == 1, out.stderr[-3000:]
    assert "the training loss is nan at epoch 1, step 1 of" in lines[0], lines[0]
    assert not (run / "final").exists() and not (run / "checkpoints").exists()
