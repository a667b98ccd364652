"""Image models train through the same engine: a tiny ViT on .npz arrays and on an image folder."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import assert_same_training, make_vit_folder, run_command, with_flags

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory):
    return make_vit_folder(tmp_path_factory.mktemp("tiny-vit"), layers=4, num_labels=3, processor=True)


def _images(n=90, seed=0):
    """Three classes told apart by which third of the image is bright."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 60, size=(n, 20, 20), dtype=np.uint8)
    y = np.arange(n) % 3
    for i, c in enumerate(y):
        x[i, :, 7 * c:7 * c + 6] += 150
    return x, y


def _train(run_dir, model, data):
    out = run_command("train", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
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


# --- augmentation ---------------------------------------------------------------------------

def _augmented(run_dir, model, data, *extra):
    out = run_command("train", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
                      "--image-size", "16", "--epochs", "3", "--batch-size", "16", "--lr", "2e-3",
                      *with_flags(["--freeze", "schedule", "--alpha", "0.5", "--dropout", "off", "--augment",
                                   "crop-flip"], *extra))
    assert out.returncode == 0, out.stderr[-4000:]
    return out.stdout, [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_augmentation_keeps_the_auto_cache_off_and_opt_in_warns(tmp_path, tiny_vit):
    x, y = _images()
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    stdout, records = _augmented(tmp_path / "auto", tiny_vit, tmp_path / "digits.npz")
    assert "cache off because --augment=crop-flip" in stdout
    assert {r["cache_tier"] for r in records} == {"off"} and records[-1]["frozen_layers"] == 3
    _, plain = _augmented(tmp_path / "plain", tiny_vit, tmp_path / "digits.npz", "--augment", "off", "--cache", "off")
    assert plain[0]["step_losses"][0] != records[0]["step_losses"][0]  # the pixels did change
    stdout, records = _augmented(tmp_path / "on", tiny_vit, tmp_path / "digits.npz", "--cache", "on")
    assert "--cache on with --augment=crop-flip" in stdout and records[-1]["cache_hits"] > 0


def test_augmented_training_is_the_same_on_two_processes(tmp_path, tiny_vit):
    """The draw follows the row, not the replica: 2 processes (2x1 -> 1x2) equal 1."""
    from safetensors.torch import load_file
    x, y = _images(n=96)
    np.savez(tmp_path / "digits.npz", x=x, y=y)
    _, one = _augmented(tmp_path / "one", tiny_vit, tmp_path / "digits.npz")
    _, two = _augmented(tmp_path / "two", tiny_vit, tmp_path / "digits.npz", "--nproc", "2", "--stages", "all")
    assert [r["replicas"] for r in two] == [1, 1, 2]
    weights = [load_file(tmp_path / d / "final" / "model.safetensors") for d in ("one", "two")]
    assert_same_training((one, weights[0]), (two, weights[1]))
