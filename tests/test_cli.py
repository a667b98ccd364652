"""The command line and config: flags, YAML, clear errors, outputs of a real (tiny) run."""
from __future__ import annotations

import json

import pytest
import torch

from pipetransformer.cli import build_parser, main
from pipetransformer.config import Config, ConfigError, load_config

from conftest import run_cli

REQUIRED_FIELDS = {"epoch", "frozen_layers", "total_layers", "stages", "replicas", "micro_batches",
                   "train_loss", "val_loss", "val_accuracy", "epoch_seconds", "samples_per_second",
                   "transition_seconds"}


def test_help_names_every_flag():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    for flag in ["--model", "--data", "--epochs", "--batch-size", "--lr", "--alpha", "--freeze",
                 "--train-samples", "--eval-samples", "--max-length", "--seed", "--run-dir",
                 "--nproc", "--stages", "--elastic", "--schedule", "--batch-policy", "--config"]:
        assert flag in text


@pytest.mark.parametrize("args, words", [
    (["--alpha", "1.5"], ["--alpha=1.5", "between 0 and 1"]),
    (["--epochs", "0"], ["--epochs=0", "at least 1"]),
    (["--max-length", "4"], ["--max-length=4", "between 8"]),
    (["--train-samples", "-3"], ["--train-samples=-3"]),
])
def test_bad_values_name_field_value_and_fix(args, words, capsys, tmp_path):
    assert main(["train", *args, "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err
    assert not (tmp_path / "r").exists()


def test_yaml_config_and_flag_override(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train: {epochs: 7, lr: 2e-5}\nfreeze: {alpha: 0.25}\nrun_dir: x\n")
    cfg = load_config(path)
    assert (cfg.train.epochs, cfg.train.lr, cfg.freeze.alpha, cfg.run_dir) == (7, 2e-5, 0.25, "x")
    path.write_text("train: {epoks: 7}\n")
    with pytest.raises(ConfigError, match="epoks"):
        load_config(path)
    path.write_text("train: {epochs: many}\n")
    with pytest.raises(ConfigError, match="epochs"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    assert Config.from_dict(Config().to_dict()) == Config()


def test_bare_off_and_on_in_yaml_are_the_choices_not_booleans(tmp_path):
    path = tmp_path / "c.yaml"  # YAML 1.1 reads these as false / true
    path.write_text("freeze: {freeze: off}\ncache: {cache: on}\ndata: {augment: off}\ntrain: {dropout: off}\n")
    cfg = load_config(path)
    assert (cfg.freeze.freeze, cfg.cache.cache, cfg.data.augment, cfg.train.dropout) == ("off", "on", "off", False)


def test_csv_without_label_column_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,sentiment\ngood,1\n")
    assert main(["train", "--data", str(bad), "--run-dir", str(tmp_path / "r")]) == 2
    assert "label" in capsys.readouterr().err


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
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(run / "final")
    model = AutoModelForSequenceClassification.from_pretrained(run / "final").eval()
    with torch.no_grad():
        logits = model(**tok(["the movie was great", "awful plot"], return_tensors="pt", padding=True)).logits
    assert logits.shape == (2, 2)
    # the same run folder again: refused, and nothing in it is touched
    before = (run / "metrics.jsonl").read_bytes()
    again = run_cli(*args)
    assert again.returncode == 2 and "already holds a run" in again.stderr
    assert (run / "metrics.jsonl").read_bytes() == before
