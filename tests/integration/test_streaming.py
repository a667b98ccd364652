"""Streaming input end to end: memory that does not grow with the data set, a separate
validation file, and text from a Parquet file and a datasets folder."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import make_csv, make_model_folder, make_vit_folder, run_command

pytestmark = pytest.mark.integration

# Runs `pipetransformer train` as a child of a small Python parent that prints the peak
# resident memory (ru_maxrss, KiB on Linux) of its waited-for descendants: the training
# process, which is the largest of them (its loader workers are forked from it and smaller).
_PEAK = ("import resource, subprocess, sys; "
         "code = subprocess.run([sys.executable, '-m', 'pipetransformer', *sys.argv[1:]]).returncode; "
         "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def _image_folder(folder, n: int) -> None:
    """n 64 x 64 PNGs in two classes (bright left or right half)."""
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(n):
        c = i % 2
        img = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
        img[:, 32 * c:32 * c + 32] += 150
        (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"c{c}" / f"{i}.png", compress_level=1)


def _peak_mb(model, data, run_dir) -> float:
    out = subprocess.run([sys.executable, "-c", _PEAK, "train", "--model", str(model), "--data", str(data),
                          "--run-dir", str(run_dir), "--image-size", "64", "--epochs", "1", "--batch-size", "64",
                          "--train-samples", "0", "--eval-samples", "64", "--freeze", "off", "--cache", "off"],
                         capture_output=True, text=True, timeout=300, env={"OMP_NUM_THREADS": "1", **_env()})
    code, kib = out.stdout.split()[-2:]
    assert code == "0", out.stderr[-3000:]
    return int(kib) / 1024


def _env() -> dict:
    import os
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def test_memory_does_not_grow_with_the_number_of_images(tmp_path):
    # the in-memory design held every image as float32: 8000 * 3 * 64 * 64 * 4 B = 393 MB
    # against 98 MB for 2000, a difference of 295 MB (more while decoding)
    vit = make_vit_folder(tmp_path / "vit", layers=1, image_size=64, patch_size=16)
    _image_folder(tmp_path / "small", 2000)
    _image_folder(tmp_path / "large", 8000)
    small = _peak_mb(vit, tmp_path / "small", tmp_path / "run-small")
    large = _peak_mb(vit, tmp_path / "large", tmp_path / "run-large")
    print(f"peak RSS: 2000 images {small:.0f} MB, 8000 images {large:.0f} MB")
    assert large - small < 150, (small, large)


def test_a_separate_validation_file(tmp_path, tiny_bert):
    data, val = make_csv(tmp_path / "train.csv", rows=64), make_csv(tmp_path / "val.csv", rows=24, seed=5)
    out = run_command("train", "--model", str(tiny_bert), "--data", str(data), "--val-data", str(val),
                      "--run-dir", str(tmp_path / "run"), "--max-length", "16", "--epochs", "2", "--batch-size", "16",
                  "--train-samples", "0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "64 train / 24 val samples" in out.stdout  # all of --data trains, all of the file validates
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["steps"] for r in records] == [4, 4] and 0 <= records[-1]["val_accuracy"] <= 1
    # the launcher counts the training rows of --data, not of a split
    bad = run_command("train", "--model", str(tiny_bert), "--data", str(data), "--val-data", str(val),
                      "--run-dir", str(tmp_path / "run2"), "--max-length", "16", "--batch-size", "128")
    assert bad.returncode == 2 and "training set (64 samples)" in bad.stderr


def test_text_from_parquet_and_a_datasets_folder(tmp_path):
    import csv

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    model = make_model_folder(tmp_path / "bert", layers=2)
    rows = list(csv.DictReader(open(make_csv(tmp_path / "r.csv", rows=96))))
    table = pa.table({"sentence": [r["text"] for r in rows], "label": [int(r["label"]) for r in rows]})
    pq.write_table(table, tmp_path / "r.parquet")
    datasets.Dataset(table).save_to_disk(str(tmp_path / "hf"))
    runs = []
    for name, source in (("csv", tmp_path / "r.csv"), ("parquet", tmp_path / "r.parquet"), ("hf", tmp_path / "hf")):
        out = run_command("train", "--model", str(model), "--data", str(source), "--run-dir", str(tmp_path / name),
                          "--max-length", "16", "--epochs", "1", "--batch-size", "16", "--freeze", "off")
        assert out.returncode == 0, out.stderr[-3000:]
        runs.append(json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[-1]))
        assert any((tmp_path / name / "data-cache").iterdir())  # tokenised once into the run folder
    assert runs[0]["step_losses"] == runs[1]["step_losses"] == runs[2]["step_losses"]  # same rows, same training
