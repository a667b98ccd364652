"""The engine against a plain PyTorch loop written here, not against itself.

The transparency tests compare the elastic run with the engine's own one-process run, which
goes through the same transitions: an optimizer, learning-rate schedule or head that a
transition re-created would be re-created in both and pass. Here the reference is what a
user would write with Hugging Face and PyTorch alone: AutoModelForSequenceClassification
from the same folder, AdamW (no decay on biases and norms) built once, a LambdaLR warm-up
and decay, clip_grad_norm_, the same rows in the same order, and the embedding and blocks
0..k-1 frozen by requires_grad_(False) at the epoch boundaries where the alpha schedule puts
them: ceil(L (1 - (1 - alpha)^T)). `pipetransformer train` (1 process, and 2: a 2-stage
pipeline that compresses to 2 replicas) must end with the loop's weights and have its
per-step and validation losses.

fp32 on CPU, dropout off. Tolerance 1e-5 (relative over all weights and absolute per
tensor, weights being O(0.01..1)): the two compute the same math in another order (the
engine's clip norm is summed in float64, torch's in float32; Hugging Face builds its own
attention mask; 2 processes split each batch into micro-batches), which leaves differences
of a few float32 ulps per step that 25 Adam steps carry to about 1e-6 at most. A re-created
optimizer or head, or a schedule restarted at a transition, moves the weights by 1e-3 and
more. Attention key biases are left out, as in conftest.assert_same_training: their true
gradient is zero, so they hold only rounding noise that Adam normalises to full-size steps.
"""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli, run_command

pytestmark = pytest.mark.integration

SEED, EPOCHS, BATCH, LR, ALPHA, MAX_LENGTH = 3, 5, 16, 3e-3, 0.5, 16
WEIGHT_DECAY, WARMUP, CLIP, VAL_FRACTION = 0.01, 0.1, 1.0, 0.1  # the defaults of `train`
TOL = 1e-5
ARGS = ["--stages", "all",
        "--freeze", "schedule", "--alpha", str(ALPHA), "--epochs", str(EPOCHS), "--batch-size", str(BATCH),
        "--lr", str(LR), "--seed", str(SEED), "--max-length", str(MAX_LENGTH), "--train-samples", "0",
        "--dropout", "off", "--cache", "off", "--keep-checkpoints", "0"]


def frozen_at(epoch: int, blocks: int) -> int:
    """Blocks frozen while epoch `epoch` (0-based) trains: the schedule after `epoch` decisions."""
    return min(blocks, math.ceil(blocks * (1 - (1 - ALPHA) ** epoch) - 1e-9))


def _split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per class a seeded shuffle, the first ceil(10 %) held out; each side shuffled again
    (the split `train` documents for --val-fraction)."""
    rng = np.random.default_rng(SEED)
    train, val = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val = math.ceil(VAL_FRACTION * len(rows))
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def plain_loop(model_dir, data) -> tuple[list[dict], dict[str, torch.Tensor], dict[str, int]]:
    """Fine-tune with Hugging Face and torch alone. Returns per-epoch records (frozen blocks,
    step losses, validation loss), the final weights and AdamW's step count per parameter."""
    import transformers
    torch.manual_seed(SEED)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model.eval()  # no dropout anywhere (train() with p = 0 would compute the same)
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    with open(data, newline="") as f:
        rows = list(csv.DictReader(f))
    enc = tokenizer([r["text"] for r in rows], padding="max_length", truncation=True, max_length=MAX_LENGTH,
                    return_tensors="pt")
    labels = torch.tensor([int(r["label"]) for r in rows])
    train_rows, val_rows = (torch.from_numpy(r) for r in _split(labels.numpy()))

    params = list(model.named_parameters())
    opt = torch.optim.AdamW([{"params": [p for _, p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
                             {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=LR, fused=True)
    steps = len(train_rows) // BATCH  # the tail that does not fill a batch is dropped
    total, warm = EPOCHS * steps, WARMUP * EPOCHS * steps
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: i / warm if i < warm else max(0.0, (total - i) / (total - warm)))
    bert, blocks = model.bert, model.bert.encoder.layer
    records = []
    for epoch in range(EPOCHS):
        k = frozen_at(epoch, len(blocks))
        for module in ([bert.embeddings, *blocks[:k]] if k else []):  # the embedding freezes with block 0
            module.requires_grad_(False)
        order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(SEED * 1_000_003 + epoch))
        losses = []
        for step in range(steps):
            batch = train_rows[order[step * BATCH:(step + 1) * BATCH]]
            loss = model(input_ids=enc["input_ids"][batch], attention_mask=enc["attention_mask"][batch],
                         labels=labels[batch]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], CLIP)
            opt.step()  # a frozen parameter has no gradient: AdamW skips it (no step, no decay)
            schedule.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"][val_rows], attention_mask=enc["attention_mask"][val_rows]).logits
        val_loss = float(torch.nn.functional.cross_entropy(logits, labels[val_rows]))
        records.append({"frozen_layers": k, "step_losses": losses, "val_loss": val_loss})
    step_counts = {n: int(opt.state[p]["step"]) for n, p in params if p in opt.state}
    return records, {n: p.detach().clone() for n, p in params}, step_counts


@pytest.fixture(scope="module")
def reference(tiny_bert, tiny_csv):
    return plain_loop(tiny_bert, tiny_csv)


def _engine(run_dir, model, data, nproc: str):
    run = run_command if nproc == "1" else run_cli
    out = run("train", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir), "--nproc", nproc, *ARGS)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(run_dir / "final" / "model.safetensors")


def test_the_plain_loop_freezes_on_the_schedule_and_adamw_skips_frozen_parameters(reference, tiny_bert):
    """The reference itself: frozen 0, 4, 6, 7, 8 of 8 blocks; a frozen parameter's AdamW
    step count stops where it froze, and its weights stay as they were then."""
    records, weights, step_counts = reference
    assert [r["frozen_layers"] for r in records] == [0, 4, 6, 7, 8]
    steps = len(records[0]["step_losses"])
    assert steps == 5  # 86 training rows, batches of 16
    assert step_counts["bert.embeddings.word_embeddings.weight"] == steps  # frozen after epoch 1
    assert step_counts["bert.encoder.layer.4.output.dense.weight"] == 2 * steps  # after epoch 2
    assert step_counts["bert.encoder.layer.7.output.dense.weight"] == 4 * steps  # after epoch 4
    assert step_counts["classifier.weight"] == EPOCHS * steps  # the head never freezes
    initial = load_file(tiny_bert / "model.safetensors")
    assert not torch.equal(weights["bert.encoder.layer.7.output.dense.weight"],
                           initial["bert.encoder.layer.7.output.dense.weight"])


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_train_ends_with_the_plain_loops_weights_and_losses(tmp_path, tiny_bert, tiny_csv, reference, nproc):
    ref_records, ref_weights, _ = reference
    records, weights = _engine(tmp_path / "run", tiny_bert, tiny_csv, nproc)
    if nproc == "2":  # elastic: a 2-stage pipeline that becomes 2 replicas once enough blocks froze
        layouts = [(r["stages"], r["replicas"]) for r in records]
        assert layouts[0] == (2, 1) and layouts[-1] == (1, 2), layouts
    assert [r["frozen_layers"] for r in records] == [r["frozen_layers"] for r in ref_records]
    losses = torch.tensor([x for r in records for x in r["step_losses"]], dtype=torch.float64)
    ref_losses = torch.tensor([x for r in ref_records for x in r["step_losses"]], dtype=torch.float64)
    assert len(losses) == len(ref_losses) == EPOCHS * 5
    assert torch.allclose(losses, ref_losses, rtol=TOL, atol=0), (losses - ref_losses).abs().max()
    val = torch.tensor([r["val_loss"] for r in records], dtype=torch.float64)
    ref_val = torch.tensor([r["val_loss"] for r in ref_records], dtype=torch.float64)
    assert torch.allclose(val, ref_val, rtol=TOL, atol=0), (val - ref_val).abs().max()
    assert weights.keys() == ref_weights.keys()
    names = [n for n in ref_weights if not n.endswith("key.bias")]
    num = sum(float((weights[n] - ref_weights[n]).double().pow(2).sum()) for n in names) ** 0.5
    den = sum(float(ref_weights[n].double().pow(2).sum()) for n in names) ** 0.5
    assert num / den < TOL, f"relative difference of the weights {num / den:.2e}"
    worst = max(names, key=lambda n: float((weights[n] - ref_weights[n]).abs().max()))
    diff = float((weights[worst] - ref_weights[worst]).abs().max())
    assert diff < TOL, f"{worst}: max abs difference {diff:.2e}"
