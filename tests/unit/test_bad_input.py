"""Every bad input ends the same way: one line naming the field or file, the value and the
fix; exit code 2; no traceback; nothing written. One row per case; docs/BAD_INPUT.md lists
the same cases (checked below)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipetransformer.cli import main

from conftest import make_csv, make_model_folder, make_vit_folder

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    return make_model_folder(tmp_path_factory.mktemp("bert"), layers=2)


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return make_vit_folder(tmp_path_factory.mktemp("vit"))


def _model_copy(src: Path, dest: Path, drop=(), replace=None) -> Path:
    shutil.copytree(src, dest)
    for name in drop:
        (dest / name).unlink()
    for name, data in (replace or {}).items():
        (dest / name).write_bytes(data)
    return dest


def _images(folder: Path, broken: bool = False) -> Path:
    from PIL import Image
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((16, 16), 30 * i, np.uint8)).save(folder / c / f"{i}.png")
    if broken:
        (folder / "a" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return folder


def _npz(path: Path, x, y=None) -> Path:
    np.savez(path, x=x, y=np.arange(len(x)) % 2 if y is None else y)
    return path


# (case id, argv builder given (tmp, bert, vit, csv), words the line must hold)
CASES = [
    ("seed-negative", lambda t, b, v, c: ["--seed", "-1"], ["--seed=-1", "between 0 and"]),
    ("image-size-zero", lambda t, b, v, c: ["--image-size", "0"], ["--image-size=0", "positive"]),
    ("epochs-zero", lambda t, b, v, c: ["--epochs", "0"], ["--epochs=0", "at least 1"]),
    ("comm-timeout-zero", lambda t, b, v, c: ["--comm-timeout", "0"], ["--comm-timeout=0.0", "seconds"]),
    ("checkpoints-off-but-every", lambda t, b, v, c: ["--keep-checkpoints", "0", "--checkpoint-every", "5"],
     ["--checkpoint-every=5", "--keep-checkpoints 0", "drop --checkpoint-every"]),
    ("restarts-without-checkpoints", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--nproc", "2", "--max-length", "16",
                                                         "--keep-checkpoints", "0", "--max-restarts", "1"],
     ["--max-restarts=1", "--keep-checkpoints 0", "--max-restarts 0"]),
    ("csv-not-utf8", lambda t, b, v, c: ["--model", str(b), "--data", _write(t / "l1.csv", "text,label\ncaf\xe9,1\n".encode("latin-1"))],
     ["is not UTF-8", "l1.csv"]),
    ("csv-random-bytes", lambda t, b, v, c: ["--model", str(b), "--data", _write(t / "r.csv", bytes(range(256)) * 4)],
     ["r.csv", "UTF-8"]),
    ("csv-missing-column", lambda t, b, v, c: ["--model", str(b), "--data", _write(t / "m.csv", b"text,stars\ngood,5\n")],
     ["m.csv", "lacks column", "label"]),
    ("data-missing", lambda t, b, v, c: ["--data", str(t / "nope.csv")], ["nope.csv", "not a built-in name"]),
    ("npz-random-bytes", lambda t, b, v, c: ["--model", str(v), "--image-size", "16", "--data", _write(t / "r.npz", b"junk" * 50)],
     ["r.npz", "not a readable .npz"]),
    ("npz-bad-shape", lambda t, b, v, c: ["--model", str(v), "--image-size", "16", "--data", str(_npz(t / "s.npz", np.zeros((8, 4, 4, 5))))],
     ["s.npz", "x has shape (8, 4, 4, 5)"]),
    ("npz-nan", lambda t, b, v, c: ["--model", str(v), "--image-size", "16", "--data",
                                   str(_npz(t / "n.npz", np.where(np.arange(8)[:, None, None] == 5, np.nan, np.zeros((8, 4, 4)))))],
     ["n.npz", "image 5 holds NaN"]),
    ("image-corrupt", lambda t, b, v, c: ["--model", str(v), "--image-size", "16", "--batch-size", "4",
                                          "--data", str(_images(t / "imgs", broken=True))],
     ["3.png", "cannot be read"]),
    ("image-size-mismatch", lambda t, b, v, c: ["--model", str(v), "--image-size", "32", "--data", str(_images(t / "imgs2"))],
     ["--image-size=32", "use --image-size 16"]),
    ("text-data-for-image-model", lambda t, b, v, c: ["--model", str(v), "--image-size", "16", "--data", str(c)],
     ["this is text data", "image model"]),
    ("squad-not-json", lambda t, b, v, c: ["--model", str(b), "--data", _write(t / "b.json", b'{"data": [')],
     ["b.json", "is not valid JSON", "SQuAD v1.1"]),
    ("squad-no-data", lambda t, b, v, c: ["--model", str(b), "--data", _write(t / "v.json", b'{"version": "1.1"}')],
     ["v.json", 'no top-level "data" list']),
    ("squad-answer-misplaced", lambda t, b, v, c: ["--model", str(b), "--data", _squad(t / "m.json", answer_start=2)],
     ["m.json", "question 'q1': answer 'Paris' is not at character 2", "fix its answer_start"]),
    ("squad-no-answers", lambda t, b, v, c: ["--model", str(b), "--data", _squad(t / "n.json", answers=False)],
     ["n.json", "question 'q1' has no answers", "give it at least one answer"]),
    ("doc-stride-over-half", lambda t, b, v, c: ["--model", str(b), "--data", _squad(t / "s.json"), "--max-length", "32",
                                                   "--doc-stride", "128"],
     ["--doc-stride=128", "use at most 16"]),
    ("model-missing", lambda t, b, v, c: ["--model", str(t / "none")], ["--model=", "config.json"]),
    ("model-config-corrupt", lambda t, b, v, c: ["--model", str(_model_copy(b, t / "m", replace={"config.json": b"{oops"})), "--data", str(c)],
     ["config.json", "not a Hugging Face config"]),
    ("model-without-tokenizer", lambda t, b, v, c: ["--model", str(_model_copy(b, t / "m", drop=["vocab.txt", "tokenizer.json", "tokenizer_config.json"])),
                                                    "--data", str(c)], ["has no tokenizer"]),
    ("model-without-weights", lambda t, b, v, c: ["--model", str(_model_copy(b, t / "m", drop=["model.safetensors"])), "--data", str(c)],
     ["has no weights"]),
    ("model-weights-garbage", lambda t, b, v, c: ["--model", str(_model_copy(b, t / "m", replace={"model.safetensors": b"\0" * 100})),
                                                  "--data", str(c), "--max-length", "16"], ["cannot be loaded", "save the model again"]),
    ("model-weights-truncated", lambda t, b, v, c: ["--model", str(_model_copy(b, t / "m", replace={
        "model.safetensors": (b / "model.safetensors").read_bytes()[:5000]})), "--data", str(c), "--max-length", "16"],
     ["cannot be loaded"]),
    ("max-length-over-positions", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--max-length", "64"],
     ["--max-length=64", "40 positions"]),
    ("training-split-empty", lambda t, b, v, c: ["--model", str(b), "--max-length", "16", "--data", _write(t / "two.csv", b"text,label\ngood,1\nbad,0\n")],
     ["--batch-size=32", "training set (0 samples)"]),
    ("run-dir-uncreatable", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--max-length", "16",
                                                "--run-dir", str(Path(_write(t / "file", b"x")) / "run")], ["cannot be written"]),
    ("run-dir-is-a-file", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--max-length", "16",
                                              "--run-dir", _write(t / "afile", b"x")], ["afile", "cannot be written"]),
    ("stages-not-dividing", lambda t, b, v, c: ["--nproc", "4", "--stages", "3"], ["--stages=3", "must divide"]),
    ("freeze-every-per-replica", lambda t, b, v, c: ["--nproc", "2", "--freeze-every", "4", "--batch-policy",
                                                     "per-replica"],
     ["--freeze-every=4 is invalid", "use --freeze-every 0 or --batch-policy constant"]),
    ("stages-over-units", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--max-length", "16",
                                              "--nproc", "8", "--stages", "8", "--batch-size", "8"],
     ["--stages=8 is invalid", "use one of [1, 2, 4]"]),
    ("batch-not-divisible", lambda t, b, v, c: ["--nproc", "2", "--batch-size", "33"], ["--batch-size=33", "multiple of 2"]),
    ("node-rank-out-of-range", lambda t, b, v, c: ["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "n0:29500"],
     ["--node-rank=2", "numbered 0 to 1"]),
    ("nodes-without-endpoint", lambda t, b, v, c: ["--nnodes", "2", "--node-rank", "1"],
     ["--rdzv-endpoint=''", "node 0's name or address"]),
    ("endpoint-without-port", lambda t, b, v, c: ["--nnodes", "2", "--rdzv-endpoint", "node0"],
     ["--rdzv-endpoint='node0'", "HOST:PORT"]),
    ("endpoint-port-out-of-range", lambda t, b, v, c: ["--nnodes", "2", "--rdzv-endpoint", "node0:70000"],
     ["--rdzv-endpoint='node0:70000'", "1 to 65535"]),
    ("stages-not-dividing-machines", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--max-length", "16",
                                                         "--nnodes", "2", "--nproc", "2", "--stages", "3",
                                                         "--rdzv-endpoint", "localhost:29500"],
     ["--stages=3", "number of processes (4)"]),
    ("endpoint-host-unknown", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--max-length", "16", "--nnodes", "2",
                                                  "--node-rank", "1", "--rdzv-endpoint", "no-such-host.invalid:29500"],
     ["--rdzv-endpoint='no-such-host.invalid:29500'", "cannot be resolved"]),
    ("endpoint-port-in-use", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--max-length", "16", "--nnodes", "2",
                                                 "--rdzv-endpoint", f"localhost:{_busy_port()}"],
     ["port", "cannot be opened on this machine", "node 0 hosts the rendezvous"]),
    ("yaml-unknown-key", lambda t, b, v, c: ["--config", _write(t / "c.yaml", b"train: {epoks: 3}\n")], ["epoks", "known keys"]),
    ("yaml-float-epochs", lambda t, b, v, c: ["--config", _write(t / "c.yaml", b"train: {epochs: 1.7}\n")], ["--epochs=1.7", "int"]),
    ("yaml-broken", lambda t, b, v, c: ["--config", _write(t / "c.yaml", b"train: [\n")], ["c.yaml", "not valid YAML"]),
    ("jsonl-bad-line", lambda t, b, v, c: ["--model", str(b), "--data", _write(t / "d.jsonl", b'{"text": "good", "label": 1}\n{oops\n')],
     ["d.jsonl", "line 2", "not a JSON object"]),
    ("parquet-no-label", lambda t, b, v, c: ["--model", str(b), "--data", _parquet(t / "p.parquet", {"text": ["good", "bad"]})],
     ["p.parquet", "lacks a label column", "['text']"]),
    ("parquet-random-bytes", lambda t, b, v, c: ["--model", str(b), "--data", _write(t / "r.parquet", b"junk" * 50)],
     ["r.parquet", "not a readable Parquet file"]),
    ("datasets-dict-folder", lambda t, b, v, c: ["--model", str(b), "--data", _dataset_dict(t / "dd")],
     ["dd", "several splits", "pass one split's folder"]),
    ("val-data-unknown-label", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--val-data",
                                                   _write(t / "v.csv", b"text,label\ngood,1\nbad,7\n")],
     ["--val-data=", "v.csv", "label '7' is not among"]),
    ("val-data-other-kind", lambda t, b, v, c: ["--model", str(b), "--data", str(c), "--val-data", str(_npz(t / "v.npz", np.zeros((4, 4, 4))))],
     ["--val-data=", "holds image data but --data holds text"]),
    ("resume-no-run", lambda t, b, v, c: ["--resume", str(t)], ["--resume=", "no config.yaml"]),
    ("weight-decay-nan", lambda t, b, v, c: ["--weight-decay", "nan"], ["--weight-decay=nan", "finite"]),
    ("grad-clip-inf", lambda t, b, v, c: ["--grad-clip", "inf"], ["--grad-clip=inf", "finite"]),
    ("yaml-nan", lambda t, b, v, c: ["--config", _write(t / "n.yaml", b"train: {weight_decay: .nan}\n")],
     ["--weight-decay=nan", "finite"]),
    ("yaml-repeated-key", lambda t, b, v, c: ["--config", _write(t / "r.yaml", b"train:\n  epochs: 2\n  epochs: 3\n")],
     ["r.yaml", "'epochs' appears twice"]),
    ("yaml-repeated-section", lambda t, b, v, c: ["--config", _write(t / "s.yaml", b"train: {epochs: 2}\ntrain: {lr: 0.1}\n")],
     ["s.yaml", "'train' appears twice"]),
    ("jsonl-label-object", lambda t, b, v, c: ["--model", str(b), "--data", _write(t / "o.jsonl", b'{"text": "a good film", "label": {"id": 0}}\n')],
     ["o.jsonl", "line 1", "label {'id': 0} is a dict", "strings or whole numbers"]),
    ("resume-finished-run", lambda t, b, v, c: ["--resume", _run_folder(t / "done", b, c, epochs_done=2, finished=True)],
     ["--resume=", "that run finished", "nothing was changed"]),
    ("resume-without-checkpoints", lambda t, b, v, c: ["--resume", _run_folder(t / "gone", b, c, epochs_done=1)],
     ["--resume=", "holds no checkpoint", "overwrite its 1 finished epoch"]),
]

# argparse's own errors: one line too (SystemExit 2), never its usage text
FLAG_CASES = [
    ("flag-unknown", ["--epoch", "1"], ["unrecognized arguments: --epoch 1", "--help"]),
    ("flag-repeated", ["--batch-size", "16", "--batch-size", "8"], ["--batch-size is given twice (16, then 8)",
                                                                   "give it once"]),
    ("flag-repeated-switch", ["--compile", "--compile", "off"], ["--compile is given twice (on, then off)"]),
]


def _squad(path: Path, answer_start: int = 25, answers: bool = True) -> str:
    """A one-question SQuAD v1.1 file (the answer "Paris" sits at character 25)."""
    qa = {"id": "q1", "question": "What is the capital of France?",
          "answers": [{"text": "Paris", "answer_start": answer_start}] if answers else []}
    para = {"context": "The capital of France is Paris.", "qas": [qa]}
    return _write(path, json.dumps({"data": [{"title": "t", "paragraphs": [para]}]}).encode())


def _parquet(path: Path, columns: dict) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table(columns), path)
    return str(path)


def _dataset_dict(folder: Path) -> str:
    folder.mkdir()
    (folder / "dataset_dict.json").write_text('{"splits": ["train", "test"]}')
    return str(folder)


def _run_folder(folder: Path, model: Path, data: Path, epochs_done: int, finished: bool = False) -> str:
    """A run folder as `train` leaves it: config.yaml, its epochs' metrics, summary.json once done."""
    import yaml

    from pipetransformer.config import Config, apply_overrides
    folder.mkdir()
    cfg = apply_overrides(Config(), {"model": str(model), "data": str(data), "run_dir": str(folder)})
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    (folder / "metrics.jsonl").write_text("".join(json.dumps({"epoch": e + 1}) + "\n" for e in range(epochs_done)))
    if finished:
        (folder / "summary.json").write_text("{}\n")
    return str(folder)


_HELD: list = []  # listening sockets the port-in-use case keeps open


def _busy_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("", 0))
    s.listen()
    _HELD.append(s)
    return s.getsockname()[1]


def _write(path: Path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize("case, argv, words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_one_line_exit_2_and_nothing_written(tmp_path, bert, vit, case, argv, words, capsys):
    csv = make_csv(tmp_path / "reviews.csv", rows=40)
    args = argv(tmp_path, bert, vit, csv)
    run = tmp_path / "run-out"
    if "--run-dir" not in args and "--resume" not in args:
        args += ["--run-dir", str(run)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["train", *args])
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert "Traceback" not in captured.err + captured.out
    assert all(w in lines[0] for w in words), lines[0]
    assert not (run / "config.yaml").exists() and not (run / "metrics.jsonl").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "run-out") == [b for b in before if b != "run-out"]


@pytest.mark.parametrize("case, argv, words", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_a_flag_error_is_one_line(tmp_path, case, argv, words, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", *argv, "--run-dir", str(tmp_path / "run")])
    lines = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2 and len(lines) == 1, lines
    assert all(w in lines[0] for w in words), lines[0]
    assert not (tmp_path / "run").exists()


def test_a_csv_saved_with_a_byte_order_mark_reads_as_without(tmp_path):
    from pipetransformer.data.sources import describe_data
    plain = make_csv(tmp_path / "plain.csv", rows=12)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())  # what Excel's "CSV UTF-8" writes
    a, b = describe_data(str(plain)), describe_data(str(bom))
    assert (a.modality, a.label_names, a.labels.tolist()) == (b.modality, b.label_names, b.labels.tolist())


def test_every_case_is_in_the_docs():
    doc = (ROOT / "docs" / "BAD_INPUT.md").read_text()
    missing = [case for case, _, _ in CASES + FLAG_CASES if f"`{case}`" not in doc]
    assert not missing, f"docs/BAD_INPUT.md lacks {missing}"


def test_a_checkpoint_manifest_that_cannot_be_read_is_named(tmp_path):
    from pipetransformer.checkpoint import read_manifest
    from pipetransformer.errors import ConfigError
    (tmp_path / "manifest.json").write_text(json.dumps({"format": 99}))
    with pytest.raises(ConfigError, match="manifest.json is missing or unreadable"):
        read_manifest(tmp_path)


def test_the_stop_line_names_the_phase(tmp_path):
    """A stop after the last epoch's metrics is a stop while the final model is written."""
    from pipetransformer.cli import _stopped
    from pipetransformer.config import Config, apply_overrides
    cfg = apply_overrides(Config(), {"epochs": 2, "run_dir": str(tmp_path)})
    assert _stopped(cfg).startswith("stopped before training started")
    (tmp_path / "config.yaml").write_text("{}\n")
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    assert _stopped(cfg).startswith("stopped during epoch 2;")
    (tmp_path / "metrics.jsonl").write_text("{}\n{}\n")
    assert _stopped(cfg).startswith("stopped while writing the final model;")


def test_a_datasets_class_label_keeps_its_names(tmp_path):
    import datasets

    from pipetransformer.data.sources import describe_data
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    ds = datasets.Dataset.from_dict({"text": ["a dull plot", "a superb film", "great"], "label": [0, 1, 1]},
                                    features=features)
    ds.save_to_disk(str(tmp_path / "ds"))
    facts = describe_data(str(tmp_path / "ds"))
    assert facts.label_names == ["neg", "pos"] and facts.labels.tolist() == [0, 1, 1]
    ds.to_parquet(str(tmp_path / "ds.parquet"))  # datasets' Parquet carries the same metadata
    assert describe_data(str(tmp_path / "ds.parquet")).label_names == ["neg", "pos"]
