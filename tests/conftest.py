"""Shared fixtures: a tiny BERT-family model folder and a small labelled CSV, made on the fly."""
from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

WORDS = ["good", "great", "fine", "superb", "bad", "awful", "poor", "dull", "the", "a", "movie",
         "film", "plot", "was", "is", "very", "not", "actors", "story", "really"]
POSITIVE, NEGATIVE = WORDS[:4], WORDS[4:8]


def make_tokenizer(folder: Path):
    import transformers
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))


def make_model_folder(folder: Path, family: str = "bert", layers: int = 8, seed: int = 0) -> Path:
    """Random-init encoder + tokenizer saved with save_pretrained (what a user would pass)."""
    import torch
    import transformers
    tok = make_tokenizer(folder)
    torch.manual_seed(seed)
    # a larger init than BERT's 0.02 keeps the tiny models' gradients well above rounding noise
    common = dict(vocab_size=tok.vocab_size, num_labels=2, pad_token_id=0, initializer_range=0.1)
    if family == "distilbert":
        cfg = transformers.DistilBertConfig(dim=32, n_layers=layers, n_heads=4, hidden_dim=64,
                                            max_position_embeddings=32, **common)
        model = transformers.DistilBertForSequenceClassification(cfg)
    else:
        cls = {"bert": transformers.BertConfig, "roberta": transformers.RobertaConfig}[family]
        cfg = cls(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=40, **common)
        model = transformers.AutoModelForSequenceClassification.from_config(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def make_vit_folder(folder: Path, layers: int = 2, num_labels: int = 2, processor: bool = False,
                    image_size: int = 16, patch_size: int = 4) -> Path:
    """A random-init ViT for image_size x image_size images, saved with save_pretrained."""
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=image_size, patch_size=patch_size, hidden_size=32,
                                 num_hidden_layers=layers, num_attention_heads=4, intermediate_size=64,
                                 num_labels=num_labels)
    transformers.ViTForImageClassification(cfg).save_pretrained(folder)
    if processor:
        transformers.ViTImageProcessor(size={"height": image_size, "width": image_size}).save_pretrained(folder)
    return folder


def make_csv(path: Path, rows: int = 96, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(rows):
            label = i % 2
            words = rng.choices(WORDS[8:], k=rng.randint(3, 9))
            words.insert(rng.randrange(len(words) + 1), rng.choice(POSITIVE if label else NEGATIVE))
            w.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    return make_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`pipetransformer ...` in a fresh interpreter, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pipetransformer", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def assert_same_training(ref, got, tol=1e-5, key_biases=False):
    """Two runs' (records, weights, ...) agree: per-step losses and final weights within tol,
    with the same freezing."""
    import torch
    ref_records, ref_w = ref[:2]
    records, w = got[:2]
    ref_losses = torch.tensor([x for r in ref_records for x in r["step_losses"]], dtype=torch.float64)
    losses = torch.tensor([x for r in records for x in r["step_losses"]], dtype=torch.float64)
    assert len(losses) == len(ref_losses) > 0
    assert torch.allclose(losses, ref_losses, rtol=tol, atol=0), (losses - ref_losses).abs().max()
    assert ref_w.keys() == w.keys()
    # Attention key biases are left out unless asked for: softmax ignores a shift shared by all keys, so
    # their true gradient is exactly zero and they hold only rounding noise that Adam
    # normalises to full-size steps. Everything else must agree, as a whole (relative)
    # and tensor by tensor (absolute: the weights are O(0.01..1)).
    names = [n for n in ref_w if key_biases or not n.endswith(("key.bias", "k_lin.bias", "k_proj.bias"))]
    num = sum(float((w[n] - ref_w[n]).double().pow(2).sum()) for n in names) ** 0.5
    den = sum(float(ref_w[n].double().pow(2).sum()) for n in names) ** 0.5
    assert num / den < tol, f"relative difference of the weights {num / den:.2e}"
    for name in names:
        diff = float((w[name] - ref_w[name]).abs().max())
        assert diff < tol, f"{name}: max abs difference {diff:.2e}"
    assert [r["frozen_layers"] for r in records] == [r["frozen_layers"] for r in ref_records]
