"""Streaming data: every text format gives the same rows and labels, text batches equal the
tokenizer's own output, .npz files are mapped (not loaded), images decode to uint8 and become
the same pixels as before on the device."""
from __future__ import annotations

import csv
import json
import zipfile

import numpy as np
import pytest
import torch

from pipetransformer.config import DataConfig
from pipetransformer.data.dataset import ImageData, TextData, pixel_values
from pipetransformer.data.load import load_data
from pipetransformer.data.loader import StepLoader, loader_workers
from pipetransformer.data.sources import describe_data, describe_validation, iter_texts, run_sizes
from pipetransformer.errors import ConfigError
from pipetransformer.models.loading import load_model

from conftest import make_csv, make_model_folder

ROWS = [("good film", "1"), ("dull, \"bad\" plot", "0"), ("a great movie\nreally", "1"), ("awful", "0")] * 5


def _formats(tmp_path) -> dict[str, str]:
    """The same rows as CSV, JSONL (with `sentence`), Parquet and a datasets folder."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    with open(tmp_path / "d.csv", "w", newline="") as f:
        csv.writer(f).writerows([("text", "label"), *ROWS])
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"sentence": t, "label": int(y)}) + "\n" for t, y in ROWS))
    table = pa.table({"text": [t for t, _ in ROWS], "label": [int(y) for _, y in ROWS]})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=7)
    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    return {k: str(tmp_path / n) for k, n in [("csv", "d.csv"), ("jsonl", "d.jsonl"), ("parquet", "d.parquet"),
                                               ("datasets", "hf")]}


def test_every_text_format_gives_the_same_rows_and_labels(tmp_path):
    for kind, path in _formats(tmp_path).items():
        facts = describe_data(path)
        assert (facts.modality, facts.label_names) == ("text", ["0", "1"]), kind
        assert facts.labels.tolist() == [int(y) for _, y in ROWS], kind
        assert [t for chunk in iter_texts(path, chunk_rows=3) for t in chunk] == [t for t, _ in ROWS], kind


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    folder = make_model_folder(tmp_path_factory.mktemp("bert"), layers=1)
    return load_model(str(folder), 2)


def test_text_batches_equal_the_tokenizers_output_and_the_cache_is_built_once(tmp_path, bert):
    data = make_csv(tmp_path / "r.csv", rows=60)
    texts = [row["text"] for row in csv.DictReader(open(data))]
    cfg = DataConfig(data=str(data), train_samples=0)
    train, val = load_data(cfg, bert, 12, seed=0, cache_dir=tmp_path / "cache")
    assert isinstance(train, TextData) and train.ids.dtype == np.uint16 and isinstance(train.ids, np.memmap)
    rows = torch.tensor([5, 0, 17, 3])
    got = train.batch(rows)
    want = bert.processor([texts[i] for i in train.rows[rows.numpy()]], padding="max_length", truncation=True,
                          max_length=12, return_tensors="pt")
    for name in ("input_ids", "attention_mask"):
        assert got[name].dtype == want[name].dtype == torch.int64
        assert torch.equal(got[name], want[name]), name
    assert 0 < int(want["attention_mask"].sum()) < want["attention_mask"].numel()  # padding is exercised
    assert torch.equal(got["index"], rows) and torch.equal(got["labels"], torch.from_numpy(train.labels[rows]))
    built = sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy"))
    again, _ = load_data(cfg, bert, 12, seed=0, cache_dir=tmp_path / "cache")  # a resume: same key, mapped
    assert sorted(p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*.npy")) == built
    assert torch.equal(again.batch(rows)["input_ids"], got["input_ids"])
    # the loader yields the same batches, step by step
    steps = [torch.tensor([1, 2]), torch.tensor([7, 4])]
    for (rows_, batch), step in zip(StepLoader(0, torch.device("cpu"))(train, steps), steps):
        assert rows_ is step and torch.equal(batch["attention_mask"], train.batch(step)["attention_mask"])


def test_val_data_trains_on_all_of_data_and_checks_labels(tmp_path, bert):
    data, val = make_csv(tmp_path / "r.csv", rows=40), make_csv(tmp_path / "v.csv", rows=10, seed=1)
    cfg = DataConfig(data=str(data), val_data=str(val), train_samples=30, eval_samples=0)
    train, v = load_data(cfg, bert, 12, seed=0, cache_dir=tmp_path / "cache")
    assert (len(train), len(v)) == (30, 10) == run_sizes(describe_data(str(data)), describe_data(str(val)), 0.1, 30, 0)
    assert sorted(v.rows.tolist()) == list(range(10))
    (tmp_path / "odd.csv").write_text("text,label\ngood,1\nbad,7\n")
    with pytest.raises(ConfigError, match=r"--val-data=.*odd.csv.*label '7' is not among"):
        describe_validation(describe_data(str(data)), str(tmp_path / "odd.csv"))
    np.savez(tmp_path / "i.npz", x=np.zeros((4, 4, 4), np.uint8), y=np.array([0, 1, 0, 1]))
    with pytest.raises(ConfigError, match="holds image data but --data holds text"):
        describe_validation(describe_data(str(data)), str(tmp_path / "i.npz"))


class _Vision:
    modality, num_labels, processor = "image", 3, None


def _old_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """The pixels of the in-memory design this replaced, image by image."""
    batch = []
    for img in images:
        t = torch.from_numpy(np.array(img, dtype=np.float32))
        t = (t[..., None] if t.ndim == 2 else t).permute(2, 0, 1)
        t = t.expand(3, -1, -1) if t.shape[0] == 1 else t
        batch.append(t[:3] / (255.0 if t.max() > 1.0 else 1.0))
    x = torch.nn.functional.interpolate(torch.stack(batch), size=(size, size), mode="bilinear", align_corners=False)
    return (x - 0.5) / 0.5


@pytest.mark.parametrize("x", [
    np.random.default_rng(0).integers(0, 256, (9, 6, 6, 3)).astype(np.uint8),
    np.random.default_rng(1).random((9, 5, 5)).astype(np.float64),        # floats in 0..1 stay so
    np.random.default_rng(2).random((9, 5, 5, 1)).astype(np.float32) * 200,  # floats in 0..255
])
@pytest.mark.parametrize("compressed", [False, True])
def test_npz_is_mapped_and_gives_the_same_pixels_as_before(tmp_path, x, compressed):
    y = np.arange(9) % 3
    (np.savez_compressed if compressed else np.savez)(tmp_path / "a.npz", x=x, y=y)
    train, val = load_data(DataConfig(data=str(tmp_path / "a.npz"), train_samples=0, image_size=8), _Vision(), 0,
                           seed=0, cache_dir=tmp_path / "cache")
    assert isinstance(train, ImageData) and isinstance(train.read.x, np.memmap)  # type: ignore[attr-defined]
    assert (tmp_path / "cache").is_dir() == compressed  # only a compressed archive is extracted
    rows = torch.tensor([2, 0, 1])
    raw = train.fetch(rows)
    assert raw["pixels"].dtype == torch.from_numpy(x[:1]).dtype  # as stored: uint8 stays uint8
    assert torch.equal(train.batch(rows)["pixel_values"], _old_pixels(x[train.rows[rows.numpy()]], 8))


def test_images_decode_to_uint8_and_mixed_sizes_are_resized_in_the_reader(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b", "c"):
        (tmp_path / "same" / c).mkdir(parents=True)
        (tmp_path / "mixed" / c).mkdir(parents=True)
        for i in range(3):
            img = rng.integers(0, 256, (6, 6, 3)).astype(np.uint8)
            Image.fromarray(img).save(tmp_path / "same" / c / f"{i}.png")
            Image.fromarray(img[: 4 + i]).save(tmp_path / "mixed" / c / f"{i}.png")
    cfg = DataConfig(data=str(tmp_path / "same"), train_samples=0, image_size=8, val_fraction=0.34)
    train, _ = load_data(cfg, _Vision(), 0, seed=0, cache_dir=tmp_path / "cache")
    rows = torch.arange(len(train))
    pixels = train.fetch(rows)["pixels"]
    files = sorted((tmp_path / "same").rglob("*.png"))
    want = np.stack([np.asarray(Image.open(files[i]).convert("RGB")) for i in train.rows])
    assert pixels.dtype == torch.uint8 and np.array_equal(pixels.numpy(), want)
    assert torch.equal(train.batch(rows)["pixel_values"], _old_pixels(want, 8))
    mixed, _ = load_data(DataConfig(data=str(tmp_path / "mixed"), train_samples=0, image_size=8, val_fraction=0.34),
                         _Vision(), 0, seed=0, cache_dir=tmp_path / "cache")
    assert tuple(mixed.fetch(torch.arange(len(mixed)))["pixels"].shape) == (len(mixed), 8, 8, 3)


def test_parquet_and_datasets_images_read_like_the_folder(tmp_path):
    import io

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 6, 6, 3)).astype(np.uint8)
    encoded = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        encoded.append(buf.getvalue())
    labels = [f"c{i % 3}" for i in range(12)]
    pq.write_table(pa.table({"image": pa.array([{"bytes": b, "path": None} for b in encoded]), "label": labels}),
                   tmp_path / "i.parquet", row_group_size=5)
    datasets.Dataset(pa.table({"img": encoded, "label": labels})).save_to_disk(str(tmp_path / "hf"))
    for path in (tmp_path / "i.parquet", tmp_path / "hf"):
        facts = describe_data(str(path))
        assert (facts.modality, facts.label_names) == ("image", ["c0", "c1", "c2"])
        train, _ = load_data(DataConfig(data=str(path), train_samples=0, image_size=6, val_fraction=0.3),
                             _Vision(), 0, seed=0, cache_dir=tmp_path / "cache")
        assert np.array_equal(train.fetch(torch.arange(len(train)))["pixels"].numpy(), images[train.rows])


def test_loader_workers_auto_rule():
    assert loader_workers(-1, "text", 1) == 0 and loader_workers(3, "text", 1) == 3
    assert 1 <= loader_workers(-1, "image", 1) <= 4
    assert loader_workers(-1, "image", 10**6) == 0


def test_pixel_values_runs_on_the_inputs_device():
    x = torch.randint(0, 256, (2, 4, 4, 3), dtype=torch.uint8)
    out = pixel_values(x, 4, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    assert out.shape == (2, 3, 4, 4) and out.device == x.device
    assert torch.allclose(out, (x.permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5)


def test_an_npz_member_is_found_by_offset_not_by_loading(tmp_path):
    from pipetransformer.data.sources import npz_member
    x = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4)
    np.savez(tmp_path / "a.npz", y=np.array([0, 1]), x=x)
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        m = npz_member(tmp_path / "a.npz", zf, "x.npy")
    assert m.offset is not None and (m.shape, m.dtype) == ((2, 3, 4), np.int16)
    assert np.array_equal(np.memmap(tmp_path / "a.npz", m.dtype, "r", m.offset, m.shape), x)
