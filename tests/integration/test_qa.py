"""Extractive question answering end to end on a generated SQuAD-format file: the pretrained
MiniLM learns to answer (exact match far above the untrained model's), final/ is a Hugging
Face QA model that answers as the run measured, and the elastic 2-process run (pipeline ->
replicas, cache on) equals the 1-process run."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pipetransformer.config import DataConfig
from pipetransformer.data.qa_dataset import load_qa_data
from pipetransformer.data.squad import QA_LABELS
from pipetransformer.models.loading import load_model, wrap_model
from pipetransformer.qa_metrics import best_answers, best_span, squad_scores

from conftest import SQUAD_WORDS, assert_same_training, make_model_folder, make_squad, run_cli, run_command

pytestmark = pytest.mark.integration

# 200 questions of one country each (3-4 facts), 160 train / 40 validation, about one window each
MINILM = ["--model", "minilm-l6", "--max-length", "48", "--doc-stride", "8", "--val-fraction", "0.2",
          "--train-samples", "0", "--batch-size", "8", "--lr", "5e-4", "--seed", "0", "--nproc", "1"]


def _train(run_dir, *args):
    out = run_command("train", "--run-dir", str(run_dir), *args)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()], out.stdout


@torch.no_grad()
def _exact_match(model, data) -> float:
    """The validation exact match of `model`, computed here, outside the engine."""
    model.hf_model.eval()
    logits = model.forward(*model.inputs(data.batch(torch.arange(len(data))))).numpy()
    offsets = np.asarray(data.arrays["offsets"])
    spans = np.array([best_span(logits[i, :, 0], logits[i, :, 1], offsets[i]) for i in range(len(data))])
    answers = best_answers(spans, np.asarray(data.arrays["example"]), [e.context for e in data.examples])
    return squad_scores(answers, [e.answers for e in data.examples])[0]


def test_minilm_learns_to_answer_and_final_is_a_qa_model(tmp_path):
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    data = make_squad(tmp_path / "facts.json", paragraphs=200, questions=2, facts=(3, 4), countries=(1, 1))
    cfg = DataConfig(data=str(data), train_samples=0, val_fraction=0.2, doc_stride=8)
    untrained = load_model("minilm-l6", 2, seed=0, label_names=QA_LABELS, task="qa")  # the run's fresh head
    val = load_qa_data(cfg, untrained, 48, 0, tmp_path / "probe")[1]
    before = _exact_match(untrained, val)

    records, stdout = _train(tmp_path / "run", "--data", str(data), "--epochs", "3", "--freeze", "schedule",
                             "--alpha", "0.5", *MINILM)
    last = records[-1]
    assert "val_accuracy" not in last and {"val_exact_match", "val_f1", "val_loss"} <= set(last)
    assert f"val_exact_match {last['val_exact_match']:.4f} val_f1 {last['val_f1']:.4f}" in stdout
    assert last["val_f1"] >= last["val_exact_match"]
    print(f"exact match: untrained {before:.3f}, after {[r['val_exact_match'] for r in records]}")
    assert last["val_exact_match"] > before + 0.3

    final = tmp_path / "run" / "final"
    trained = wrap_model(AutoModelForQuestionAnswering.from_pretrained(final), AutoTokenizer.from_pretrained(final))
    assert abs(_exact_match(trained, val) - last["val_exact_match"]) < 1e-9
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["val_f1"] == last["val_f1"]


COMMON = ["--stages", "all",
          "--max-length", "32", "--doc-stride", "8", "--freeze", "schedule", "--alpha", "0.5", "--epochs", "3",
          "--batch-size", "16", "--train-samples", "0", "--dropout", "off", "--seed", "3", "--lr", "3e-3"]


def test_two_processes_equal_one_with_the_cache_on(tmp_path):
    model = make_model_folder(tmp_path / "bert", layers=4, words=SQUAD_WORDS)
    data = make_squad(tmp_path / "facts.json", paragraphs=40)
    args = ["--model", str(model), "--data", str(data), *COMMON]
    one, _ = _train(tmp_path / "one", *args, "--nproc", "1", "--cache", "off")
    two, _ = _train(tmp_path / "two", *args, "--nproc", "2", "--cache", "on")
    assert [(r["stages"], r["replicas"]) for r in two] == [(2, 1), (2, 1), (1, 2)]
    assert [r["frozen_layers"] for r in two] == [0, 2, 3]
    assert sum(r["cache_hits"] for r in two) > 0
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("one", "two")]
    assert "qa_outputs.weight" in weights[0]
    # A shift shared by every token leaves the softmax over tokens unchanged: the start/end
    # logit biases and the last block's output bias get exactly zero gradient, hold only
    # rounding noise that Adam normalises to full steps (as attention key biases do), and
    # are left out like those.
    shift = ("qa_outputs.bias", "layer.3.output.LayerNorm.bias")
    weights = [{n: w for n, w in ws.items() if not n.endswith(shift)} for ws in weights]
    assert_same_training((one, weights[0]), (two, weights[1]))
    for a, b in zip(one, two):
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-5)
        assert b["val_exact_match"] == pytest.approx(a["val_exact_match"], abs=0.02)

    # export rebuilds the QA model from the last checkpoint: the same weights as final/
    from transformers import AutoModelForQuestionAnswering
    (tmp_path / "two" / "final").rename(tmp_path / "two-final")
    out = run_cli("export", str(tmp_path / "two"))
    assert out.returncode == 0, out.stderr[-3000:]
    exported = AutoModelForQuestionAnswering.from_pretrained(tmp_path / "two" / "final").state_dict()
    saved = load_file(tmp_path / "two-final" / "model.safetensors")
    assert saved.keys() <= exported.keys()
    assert all(torch.equal(exported[n], w) for n, w in saved.items())
