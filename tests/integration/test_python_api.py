"""The Python API: `fine_tune` with keyword settings, and `Trainer(config, model=...)` with a
Hugging Face model built in memory (no folder for --model to name)."""
from __future__ import annotations

import json

import pytest
import torch

from pipetransformer import checkpoint
from pipetransformer.config import Config, apply_overrides
from pipetransformer.engine import Trainer, fine_tune
from pipetransformer.models.loading import wrap_model

pytestmark = pytest.mark.integration

SETTINGS = {"epochs": 2, "batch_size": 16, "max_length": 16, "lr": 3e-3, "freeze": "schedule", "alpha": 0.5,
            "train_samples": 0, "dropout": False}


def test_fine_tune_takes_keyword_settings_and_writes_a_run(tmp_path, tiny_bert, tiny_csv):
    torch.set_num_threads(1)
    records = fine_tune(model=str(tiny_bert), data=str(tiny_csv), run_dir=str(tmp_path / "run"), **SETTINGS)
    assert [r["epoch"] for r in records] == [1, 2] and [r["frozen_layers"] for r in records] == [0, 4]
    written = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_accuracy"] for r in written] == [r["val_accuracy"] for r in records]
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_a_model_built_in_memory_trains_and_is_fingerprinted_by_its_own_config(tmp_path, tiny_bert, tiny_csv):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    torch.set_num_threads(1)
    torch.manual_seed(0)
    hf_config = AutoConfig.from_pretrained(tiny_bert, num_labels=2)
    hf_model = AutoModelForSequenceClassification.from_config(hf_config)  # weights nowhere on disk
    model = wrap_model(hf_model, AutoTokenizer.from_pretrained(tiny_bert))
    cfg = apply_overrides(Config(), {"data": str(tiny_csv), "run_dir": str(tmp_path / "run"), **SETTINGS})
    assert cfg.model.model == "minilm-l6"  # the default names another model: the fingerprint must not use it
    trainer = Trainer(cfg, model=model, progress=False)
    try:
        records = trainer.fit()
    finally:
        trainer.close()
    assert [r["frozen_layers"] for r in records] == [0, 4] and records[-1]["train_loss"] < records[0]["train_loss"]
    saved = checkpoint.read_manifest(checkpoint.latest(tmp_path / "run")).fingerprint
    assert saved["model"] != "minilm-l6" and saved["num_blocks"] == model.num_blocks
    assert saved == checkpoint.fingerprint(cfg, saved["labels"], model.num_blocks, "classify",
                                           tmp_path / "run" / "data-cache", hf_model.config.to_dict())
    # the trained weights are the ones written to final/
    final = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "final")
    for name, p in final.state_dict().items():
        assert torch.equal(p, hf_model.state_dict()[name]), name
