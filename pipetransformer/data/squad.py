"""SQuAD v1.1-format files: read and check them (torch-free, for the launcher), split them by
question, and cut each question + context into token windows (features).

A file is ``{"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question",
"answers": [{"text", "answer_start"}]}]}]}]}``. One *example* is one question; a long context
gives it several overlapping windows of `max_length` tokens, `doc_stride` tokens apart in
overlap, as Hugging Face's run_qa.py cuts them. Features are built once per machine into a
memory-mapped store (data/store.py); the tensors are made in qa_dataset.py.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError

__all__ = ["QA_LABELS", "Example", "read_squad", "split_examples", "build_features"]

QA_LABELS = ["start", "end"]  # the two logits per token of a question-answering head
_CHUNK = 1000  # examples tokenised at a time: one chunk in memory while building


@dataclass(frozen=True)
class Example:
    id: str
    question: str
    context: str
    answers: tuple[str, ...]  # gold texts (the first one is the training target)
    answer_start: int         # character offset of answers[0] in context


def read_squad(path: str | Path, flag: str = "--data") -> list[Example]:
    """Every question of a SQuAD v1.1-format file, checked: one line naming the file, the
    question and the fix for anything malformed."""
    where = str(path)
    fix = 'a SQuAD v1.1 JSON file: {"data": [{"paragraphs": [{"context", "qas": [{"id", "question", "answers"}]}]}]}'
    try:
        raw = json.loads(Path(path).read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag}={where!r} is not UTF-8 text (byte {e.start}); save it as UTF-8 JSON") from None
    except ValueError as e:
        raise ConfigError(f"{flag}={where!r} is not valid JSON ({e}); pass {fix}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise ConfigError(f"{flag}={where!r} has no top-level \"data\" list; pass {fix}")
    examples, seen = [], set[str]()
    for a, article in enumerate(raw["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise ConfigError(f"{flag}={where!r}: data[{a}] has no \"paragraphs\" list; pass {fix}")
        for p, para in enumerate(paragraphs):
            at = f"data[{a}].paragraphs[{p}]"
            if not isinstance(para, dict) or not isinstance(para.get("context"), str) or not para["context"]:
                raise ConfigError(f"{flag}={where!r}: {at} has no \"context\" text; give every paragraph one")
            if not isinstance(para.get("qas"), list):
                raise ConfigError(f"{flag}={where!r}: {at} has no \"qas\" list; give every paragraph its questions")
            for qa in para["qas"]:
                examples.append(_example(qa, para["context"], at, where, flag, seen))
    if not examples:
        raise ConfigError(f"{flag}={where!r} holds no questions; pass {fix}")
    return examples


def _example(qa, context: str, at: str, where: str, flag: str, seen: set) -> Example:
    if not isinstance(qa, dict) or not isinstance(qa.get("id"), (str, int)) or not isinstance(qa.get("question"), str):
        raise ConfigError(f"{flag}={where!r}: a question in {at} lacks an \"id\" or \"question\"; give each both")
    qid = str(qa["id"])
    if qid in seen:
        raise ConfigError(f"{flag}={where!r}: question id {qid!r} appears twice; give every question its own id")
    seen.add(qid)
    answers = qa.get("answers")
    if qa.get("is_impossible") or not isinstance(answers, list) or not answers:
        raise ConfigError(f"{flag}={where!r}: question {qid!r} has no answers (SQuAD v2 unanswerable questions "
                          f"are not supported); give it at least one answer or remove it")
    for ans in answers:
        start = ans.get("answer_start") if isinstance(ans, dict) else None
        text = ans.get("text") if isinstance(ans, dict) else None
        if not isinstance(text, str) or not text or not isinstance(start, int) or isinstance(start, bool):
            raise ConfigError(f"{flag}={where!r}: question {qid!r} has an answer without \"text\" and an integer "
                              f"\"answer_start\"; give each answer both")
        if context[start:start + len(text)] != text:
            raise ConfigError(f"{flag}={where!r}: question {qid!r}: answer {text[:40]!r} is not at character "
                              f"{start} of its context; fix its answer_start")
    return Example(qid, qa["question"], context, tuple(a["text"] for a in answers), answers[0]["answer_start"])


def split_examples(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) example indices: a seeded permutation, the first ceil(fraction * n) to
    validation. By question, so one question's windows never straddle the two."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = int(np.ceil(val_fraction * n))
    return order[n_val:], order[:n_val]


def build_features(examples: list[Example], tokenizer, max_length: int, doc_stride: int,
                   offsets: bool) -> Iterator[dict[str, np.ndarray]]:
    """Chunks of features for `examples` (see the module docstring): `input_ids`,
    `token_type_ids`, `lengths`, `positions` (start, end token of answers[0]; (0, 0), the CLS
    token, when the window does not hold the whole answer), `example` (index into
    `examples`) and, with `offsets`, `offsets` (character span of each context token, -1
    elsewhere)."""
    id_dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    for first in range(0, len(examples), _CHUNK):
        chunk = examples[first:first + _CHUNK]
        _check_stride(chunk, tokenizer, max_length, doc_stride)
        enc = tokenizer([e.question.lstrip() for e in chunk], [e.context for e in chunk],
                        truncation="only_second", max_length=max_length, stride=doc_stride,
                        return_overflowing_tokens=True, return_offsets_mapping=True, padding="max_length",
                        return_token_type_ids=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        owner = np.asarray(enc["overflow_to_sample_mapping"], dtype=np.int64)
        out = {"input_ids": ids.astype(id_dtype),
               "token_type_ids": np.asarray(enc["token_type_ids"], dtype=np.uint8),
               "lengths": np.asarray(enc["attention_mask"], dtype=np.int64).sum(1).astype(np.int32),
               "example": (owner + first).astype(np.int32),
               "positions": np.zeros((len(ids), 2), dtype=np.int32)}
        spans = np.full((len(ids), max_length, 2), -1, dtype=np.int32)
        for f in range(len(ids)):
            context = np.asarray(enc.sequence_ids(f)) == 1
            spans[f][context] = np.asarray(enc["offset_mapping"][f], dtype=np.int32)[context]
            ex = chunk[owner[f]]
            out["positions"][f] = answer_tokens(spans[f], ex.answer_start, ex.answer_start + len(ex.answers[0]))
        if offsets:
            out["offsets"] = spans
        yield out


def answer_tokens(spans: np.ndarray, start_char: int, end_char: int) -> tuple[int, int]:
    """(first, last) token of a window whose context tokens cover [start_char, end_char);
    (0, 0), the CLS token, when the answer is not wholly inside the window."""
    context = np.flatnonzero(spans[:, 0] >= 0)
    if not len(context) or spans[context[0], 0] > start_char or spans[context[-1], 1] < end_char:
        return 0, 0
    first = context[np.searchsorted(spans[context, 1], start_char, side="right")]  # first token ending after it
    last = context[np.searchsorted(spans[context, 0], end_char, side="left") - 1]  # last token starting before
    return int(first), int(last)


def _check_stride(chunk: list[Example], tokenizer, max_length: int, doc_stride: int) -> None:
    """Each window holds the question, the special tokens of a pair (3 for BERT, 4 for
    RoBERTa) and more context tokens than the overlap; the tokenizer fails obscurely otherwise."""
    questions = tokenizer([e.question.lstrip() for e in chunk], add_special_tokens=False)["input_ids"]
    lengths = [len(ids) for ids in questions]
    longest = int(np.argmax(lengths))
    special = tokenizer.num_special_tokens_to_add(pair=True)
    room = max_length - lengths[longest] - special
    if doc_stride >= room:
        fix = (f"use --doc-stride {room - 1} or less, or a larger --max-length" if room > 1 else
               f"use --max-length {lengths[longest] + special + doc_stride + 1} or more, or shorten that question")
        raise ConfigError(f"--doc-stride={doc_stride} is invalid: question {chunk[longest].id!r} takes "
                          f"{lengths[longest]} of the {max_length} tokens, leaving {room} for context; {fix}")
