"""Validation of a question-answering run over the whole validation set, in any layout.

Each last-stage replica reduces the logits of its windows to one best span each (score,
first and end character: three numbers per window, not T x 2 logits); the spans are summed
over the world, where every window has exactly one contributor; then each question takes
its best window's span, mapped back to its context, and is scored by SQuAD v1.1 exact match
and F1 (fractions in [0, 1], like val_accuracy).
"""
from __future__ import annotations

import numpy as np
import torch

from . import distributed
from .qa_metrics import best_answers, best_span, squad_scores
from .runtime import span_loss

__all__ = ["SpanScorer"]


class SpanScorer:
    def __init__(self, data):
        self.data = data  # a data.qa_dataset.QADataset with offsets
        self.spans = torch.zeros(len(data), 3, dtype=torch.float64)  # per window: score, first char, end char
        self.loss = torch.zeros(2, dtype=torch.float64)  # loss sum, windows

    def add(self, rows: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """The last stage's float logits (B, T, 2) of validation windows `rows`."""
        if not len(rows):
            return
        self.loss += torch.tensor([float(span_loss(logits, labels)) * len(rows), len(rows)], dtype=torch.float64)
        offsets, scores = self.data.arrays["offsets"][rows.numpy()], logits.numpy()
        for i, row in enumerate(rows.tolist()):
            self.spans[row] = torch.tensor(best_span(scores[i, :, 0], scores[i, :, 1], offsets[i]))

    def result(self, comm_device: torch.device) -> dict[str, float]:
        """val_loss, val_exact_match and val_f1 over every window and question. Collective."""
        total = distributed.sum_over_world(torch.cat([self.loss, self.spans.flatten()]), comm_device)
        spans = total[2:].view(-1, 3).numpy()
        examples = self.data.examples
        answers = best_answers(spans, np.asarray(self.data.arrays["example"]), [ex.context for ex in examples])
        em, f1 = squad_scores(answers, [ex.answers for ex in examples])
        return {"val_loss": float(total[0] / total[1]), "val_exact_match": em, "val_f1": f1}
