"""Image models train through the same engine: a tiny ViT on .npz arrays and on an image folder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import run_cli


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    import torch
    import transformers
    folder = tmp_path_factory.mktemp("tiny-vit")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=4,
                                 num_attention_heads=4, intermediate_size=64, num_labels=3)
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


def _images(n=90, seed=0):
    """Three classes told apart by which third of the image is bright."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n, 20, 20), dtype=np.uint8)
    y = np.arange(n) % 3
    for i, c in enumerate(y):
        x[i, :, 7 * c:7 * c + 6] += 150
    return x, y


def _train(run_dir, model, data):
    out = run_cli("train", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
                  "--image-size", "16", "--epochs", "3", "--batch-size", "16", "--lr", "2e-3",
                  "--freeze", "schedule", "--alpha", "0.5", "--cache", "on")
    assert out.returncode == 0, out.stderr[-4000:]
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_vit_trains_on_npz_arrays_and_freezes(tmp_path, tiny_vit):
    x, y = _images()
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    records = _train(tmp_path / "run", tiny_vit, tmp_path / "digits.npz")
    assert [r["frozen_layers"] for r in records] == [0, 2, 3]
    assert records[-1]["val_accuracy"] > 0.5  # chance is 1/3
    assert records[-1]["cache_hits"] > 0
    from transformers import AutoModelForImageClassification
    assert AutoModelForImageClassification.from_pretrained(tmp_path / "run" / "final").config.num_labels == 3


def test_vit_trains_on_an_image_folder(tmp_path, tiny_vit):
    from PIL import Image
    x, y = _images(n=45)
    for i, (img, label) in enumerate(zip(x, y)):
        (tmp_path / "imgs" / f"class{label}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "imgs" / f"class{label}" / f"{i}.png")
    records = _train(tmp_path / "run", tiny_vit, tmp_path / "imgs")
    assert len(records) == 3 and records[0]["total_layers"] == 4


def test_npz_without_labels_is_named(tmp_path, tiny_vit):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8)))
    out = run_cli("train", "--model", str(tiny_vit), "--data", str(tmp_path / "bad.npz"),
                  "--run-dir", str(tmp_path / "run"))
    assert out.returncode == 2 and "arrays named x" in out.stderr
