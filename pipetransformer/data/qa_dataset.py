"""Question answering data as tensors: SQuAD-format examples split by question, cut into
token windows once per machine (memory-mapped under <run_dir>/data-cache), and served with
the same interface as dataset.Dataset: `len`, `label_names`, `batch(rows)`."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError
from .dataset import Dataset, length_mask, tokenizer_id
from .squad import QA_LABELS, Example, build_features, read_squad, split_examples
from .store import cache_key, cached_arrays, file_stamp

__all__ = ["QADataset", "load_qa_data"]


@dataclass
class QADataset(Dataset):
    """Windows (features) of questions; `examples` are the questions they come from
    (`arrays["example"]` indexes them), kept for scoring answers against their gold texts.
    `labels` are each window's (start, end) answer tokens."""
    arrays: dict[str, np.ndarray]
    examples: list[Example]
    label_names = QA_LABELS
    modality = "text"

    @property
    def labels(self) -> np.ndarray:  # type: ignore[override]
        return self.arrays["positions"]

    def fetch(self, rows) -> dict[str, torch.Tensor]:
        rows, out = self._rows(rows)
        at = rows.numpy()
        for name in ("input_ids", "token_type_ids", "lengths"):
            out[name] = torch.from_numpy(self.arrays[name][at].astype(np.int64))
        out["labels"] = out["labels"].long()
        return out

    def finish(self, raw, device):
        """Model inputs on `device`; `labels` (B, 2: start and end token) and `index` (= rows)."""
        ids = raw["input_ids"].to(device, non_blocking=True)
        mask = length_mask(raw["lengths"].to(device, non_blocking=True), ids.shape[1])  # windows pad right
        return {"input_ids": ids, "token_type_ids": raw["token_type_ids"].to(device, non_blocking=True),
                "attention_mask": mask, "labels": raw["labels"], "index": raw["index"]}


def load_qa_data(cfg: DataConfig, model, max_length: int, seed: int, cache_dir: Path) -> tuple[QADataset, QADataset]:
    """(train, validation) windows, built once into `cache_dir`. Without --val-data the
    questions of cfg.data are split seeded by question (cfg.val_fraction); with it, cfg.data
    trains and cfg.val_data validates, whole. cfg.train_samples / eval_samples count questions."""
    val_path = cfg.val_data or None
    tokenizer = model.processor
    if tokenizer is None or not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"--model={model.hf_model.name_or_path!r}: question answering needs a fast tokenizer "
                          f"(its offsets map answers back to the text); save a tokenizer.json beside the model")
    if tokenizer.padding_side != "right":
        raise ConfigError(f"--model={model.hf_model.name_or_path!r}: its tokenizer pads on the "
                          f"{tokenizer.padding_side}; question answering windows need padding on the right")
    examples = read_squad(cfg.data)
    if val_path:
        train_rows = split_examples(len(examples), 0.0, seed)[0]
        val_examples = read_squad(val_path, "--val-data")
        val_rows = np.arange(len(val_examples))
    else:
        train_rows, val_rows = split_examples(len(examples), cfg.val_fraction, seed)
        val_examples = examples
    if cfg.train_samples:
        train_rows = train_rows[:cfg.train_samples]
    if cfg.eval_samples:
        val_rows = val_rows[:cfg.eval_samples]

    stride = cfg.window_stride(max_length)

    def features(path: str, chosen: list[Example], rows: np.ndarray, scoring: bool) -> QADataset:
        key = cache_key(task="qa", file=str(Path(path).resolve()), **file_stamp(Path(path)),
                        tokenizer=tokenizer_id(tokenizer),
                        max_length=max_length, doc_stride=stride, scoring=scoring,
                        rows=hashlib.sha256(np.asarray(rows, dtype=np.int64).tobytes()).hexdigest())
        arrays = cached_arrays(cache_dir, key, lambda: build_features(chosen, tokenizer, max_length, stride,
                                                                  offsets=scoring))
        return QADataset(arrays, chosen)
    train = features(cfg.data, [examples[i] for i in train_rows], train_rows, scoring=False)
    val = features(val_path or cfg.data, [val_examples[i] for i in val_rows], val_rows, scoring=True)
    return train, val
