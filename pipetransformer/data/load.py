"""The one entry to a run's data: the checks every task shares, then the task's loader
(classification in dataset.py, SQuAD-style question answering in qa_dataset.py)."""
from __future__ import annotations

from pathlib import Path

from ..config import DataConfig
from ..errors import ConfigError
from .dataset import Dataset, load_classification_data
from .qa_dataset import load_qa_data
from .sources import describe_data

__all__ = ["load_data"]


def load_data(cfg: DataConfig, model, max_length: int, seed: int, cache_dir: Path) -> tuple[Dataset, Dataset]:
    """(train, validation) for `model`: the seeded split of --data, or all of --data and the
    --val-data file; each cut to the sample limits. Tokenised text goes to `cache_dir`."""
    facts = describe_data(cfg.data)
    if facts.modality != model.modality:
        raise ConfigError(f"--data={cfg.data!r} is invalid: this is {facts.modality} data but the model is a "
                          f"{model.modality} model; pass data of its kind")
    if model.modality == "text" and model.processor is None:
        raise ConfigError("--model: the model folder has no tokenizer; save one beside it")
    if len(facts.label_names) > model.num_labels:
        raise ConfigError(f"--data={cfg.data!r} has {len(facts.label_names)} classes but the model head has "
                          f"{model.num_labels}")
    if facts.task == "qa":
        return load_qa_data(cfg, model, max_length, seed, cache_dir)
    return load_classification_data(cfg, facts, model, max_length, seed, cache_dir)
