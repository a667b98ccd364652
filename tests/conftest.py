"""Shared fixtures: a tiny BERT-family model folder, a small labelled CSV and a small
SQuAD-format question-answering file, made on the fly."""
from __future__ import annotations

import csv
import json
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


def make_tokenizer(folder: Path, words: list[str] | None = None):
    import transformers
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + (words or WORDS)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    return transformers.BertTokenizer(vocab_file=str(folder / "vocab.txt"))


def make_model_folder(folder: Path, family: str = "bert", layers: int = 8, seed: int = 0,
                      words: list[str] | None = None) -> Path:
    """Random-init encoder + tokenizer saved with save_pretrained (what a user would pass);
    `words`: the vocabulary (default: the review words of make_csv)."""
    import torch
    import transformers
    tok = make_tokenizer(folder, words)
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


# Templated facts about made-up countries: a question names a country and a relation, its
# paragraph states that relation for other countries too and other relations for the same
# country, so the answer needs both. Rivers have two gold answers ("Nile", "the Nile").
COUNTRIES = ["Freedonia", "Sylvania", "Latveria", "Genovia", "Ruritania", "Elbonia", "Zamunda", "Florin",
             "Panem", "Arstotzka", "Borduria", "Syldavia", "Krakozhia", "Molvania", "Grand Fenwick", "Qumar"]
RELATIONS = {  # name: (sentence, question, values)
    "capital": ("The capital of {c} is {v}.", "What is the capital of {c}?",
                ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Delhi", "Tokyo", "Quito", "Dakar", "Hanoi", "Accra",
                 "Sofia"]),
    "currency": ("The currency of {c} is the {v}.", "What is the currency of {c}?",
                 ["dollar", "euro", "peso", "rupee", "yen", "franc", "krona", "lira", "dinar", "rand", "won", "pound"]),
    "language": ("People in {c} speak {v}.", "What language do people in {c} speak?",
                 ["French", "Spanish", "German", "Italian", "Dutch", "Greek", "Polish", "Danish", "Swedish", "Czech"]),
    "river": ("The longest river in {c} is the {v}.", "What is the longest river in {c}?",
              ["Nile", "Amazon", "Danube", "Rhine", "Volga", "Seine", "Thames", "Tiber", "Indus", "Ganges"]),
    "founder": ("{c} was founded by {v}.", "Who founded {c}?",
                ["Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack"]),
}
SQUAD_WORDS = sorted({w.lower() for c in COUNTRIES for w in c.split()}
                     | {w.lower() for _, _, vs in RELATIONS.values() for w in vs}
                     | {w.lower() for s, q, _ in RELATIONS.values() for w in (s + " " + q).replace("{c}", " ")
                        .replace("{v}", " ").replace(".", " ").replace("?", " ").split()} | {".", "?"})


def make_squad(path: Path, paragraphs: int = 150, questions: int = 3, facts: tuple[int, int] = (3, 5),
               countries: tuple[int, int] = (2, 3), seed: int = 0) -> Path:
    """A SQuAD v1.1-format file: `paragraphs` paragraphs of `facts` (fewest, most) facts about
    `countries` (fewest, most) countries, up to `questions` questions each."""
    rng = random.Random(seed)
    data = []
    for p in range(paragraphs):
        pairs = [(c, rel) for c in rng.sample(COUNTRIES, rng.randint(*countries)) for rel in sorted(RELATIONS)]
        stated = [(c, rel, rng.choice(RELATIONS[rel][2])) for c, rel in rng.sample(pairs, rng.randint(*facts))]
        context, qas = "", []
        for i, (country, rel, value) in enumerate(stated):
            sentence = RELATIONS[rel][0].format(c=country, v=value)
            start = len(context) + sentence.rindex(value)  # the value ends every sentence
            if i < questions:
                answers = [{"text": value, "answer_start": start}]
                if rel == "river":  # "the Nile" is right too
                    answers.append({"text": f"the {value}", "answer_start": start - 4})
                qas.append({"id": f"q{p}-{i}", "question": RELATIONS[rel][1].format(c=country), "answers": answers})
            context += sentence + " "
        rng.shuffle(qas)
        data.append({"title": f"p{p}", "paragraphs": [{"context": context.strip(), "qas": qas}]})
    path.write_text(json.dumps({"version": "1.1", "data": data}))
    return path


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_model_folder(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory) -> Path:
    return make_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


def with_flags(base: list[str] | tuple[str, ...], *extra: str) -> list[str]:
    """`base` flags with those in `extra` replaced by extra's (a flag given twice is refused)."""
    def groups(tokens):
        out: list[list[str]] = []
        for t in tokens:
            if t.startswith("--") or not out:
                out.append([t])
            else:
                out[-1].append(t)
        return out
    given = {g[0].split("=", 1)[0] for g in groups(extra)}
    return [t for g in groups(base) if g[0].split("=", 1)[0] not in given for t in g] + list(extra)


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`pipetransformer ...` in a fresh interpreter, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "pipetransformer", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def run_command(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`pipetransformer ...` as run_cli, but a one-process command runs inside this test
    process: the same code path (arguments, checks, training, files, exit code, output)
    without a new interpreter, whose imports (torch, transformers) are 8-10 s of a tiny run's
    11 on 2 cores. One thread, as run_cli; Python warnings are printed into its stderr as
    the command's would be (text C++ writes to file descriptor 2 is not caught). More
    processes start workers: run_cli."""
    import contextlib
    import io
    import warnings

    import torch
    import yaml

    from pipetransformer.cli import main
    args = tuple(part for a in args for part in (a.split("=", 1) if a.startswith("--") and "=" in a else [a]))
    nproc = args[args.index("--nproc") + 1] if "--nproc" in args else "1"
    saved = Path(args[args.index("--resume") + 1]) / "config.yaml" if "--resume" in args else None
    if saved is not None and saved.is_file() and "--nproc" not in args:
        nproc = str(yaml.safe_load(saved.read_text())["parallel"]["nproc"])
    if nproc != "1" or "--config" in args or args[0] == "bench":
        return run_cli(*args, timeout=timeout)
    out, err, threads = io.StringIO(), io.StringIO(), torch.get_num_threads()
    torch.set_num_threads(1)
    def show(message, category, filename, lineno, file=None, line=None):
        err.write(warnings.formatwarning(message, category, filename, lineno, line))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("default")  # as a fresh interpreter: each warning once, these ignored
            for quiet in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
                warnings.simplefilter("ignore", quiet)
            warnings.showwarning = show
            try:
                code = main(list(args))
            except SystemExit as e:  # argparse's own errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(["pipetransformer", *args], code, out.getvalue(), err.getvalue())


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
