"""Passes over the current runtime: one schedule step (training or evaluation), the whole
validation pass, and --compile's warm-up. `Passes` holds what every layout shares (model,
cache, devices, loader); the runtime is an argument, since each transition replaces it."""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from . import distributed
from .autocache.cache import AutoCache
from .autodp import replica_rows
from .data.dataset import Dataset
from .data.loader import StepLoader
from .models.base import StagedModel
from .qa_eval import SpanScorer
from .runtime import Runtime
from .stopping import raise_if_stopping

__all__ = ["Passes"]


class Passes:
    def __init__(self, model: StagedModel, cache: AutoCache, device: torch.device, comm_device: torch.device,
                 loader: StepLoader, dropout: bool):
        self.model, self.cache, self.loader, self.dropout = model, cache, loader, dropout
        self.device, self.comm_device = device, comm_device

    def run(self, rt: Runtime, batch: dict, train: bool) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """One schedule step on `batch`: the last stage's output and its micro-batches' losses."""
        losses = list[torch.Tensor]()
        args = self._stage_inputs(rt, batch, train) if rt.is_first else ()
        kwargs = {}
        if rt.is_last:  # the schedule computes the loss on the last stage, eval included
            kwargs = {"target": batch["labels"].to(self.device, non_blocking=True), "losses": losses}
        out = (rt.schedule.step if train else rt.schedule.eval)(*args, **kwargs)
        return out, losses

    def _stage_inputs(self, rt: Runtime, batch: dict, train: bool) -> tuple:
        """Stage-0 inputs: raw model inputs, or the frozen prefix's output (cached in training)."""
        if train and self.cache.active(rt):
            return self.cache.inputs(batch, rt)
        inputs = tuple(x.to(self.device, non_blocking=True) for x in self.model.inputs(batch))
        if rt.prefix is not None:
            with torch.no_grad():
                inputs = rt.prefix(*inputs)
        return inputs

    @torch.no_grad()
    def evaluate(self, rt: Runtime, val_data: Dataset) -> dict:
        """Loss and accuracy (question answering: exact match and F1) over the whole validation
        set, in `rt`'s layout. Collective."""
        layout = rt.layout
        batch_size = rt.plan.replica_batch * layout.replicas
        n = len(val_data)
        steps = math.ceil(n / batch_size)
        order = torch.arange(steps * batch_size) % n  # pad the tail with repeats, ignored below
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        spans = SpanScorer(val_data) if self.model.task == "qa" else None
        rt.module.eval()
        step_rows = [replica_rows(order, step, batch_size, rt.replica, layout.replicas) for step in range(steps)]
        try:
            for step, (rows, batch) in enumerate(self.loader(val_data, step_rows)):
                raise_if_stopping()
                out, _ = self.run(rt, batch, train=False)
                if rt.is_last:
                    assert out is not None
                    pos = step * batch_size + rt.replica * len(rows) + torch.arange(len(rows))
                    keep = pos < n
                    if spans is not None:
                        spans.add(rows[keep], out.float().cpu()[keep], batch["labels"][keep])
                        continue
                    logits, labels = out.float().cpu()[keep], batch["labels"][keep]
                    totals += torch.tensor([
                        float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
                        float((logits.argmax(-1) == labels).sum()), float(keep.sum())], dtype=torch.float64)
        finally:
            rt.module.train(self.dropout)
        if spans is not None:
            return spans.result(self.comm_device)
        totals = distributed.sum_over_world(totals, self.comm_device)
        return {"val_loss": float(totals[0] / totals[2]), "val_accuracy": float(totals[1] / totals[2])}

    def warm_up(self, rt: Runtime, train_data: Dataset, val_data: Dataset, log: Callable[[str], None]) -> float:
        """Compile `rt` now, by one training and one evaluation pass on real rows whose results
        are thrown away (RNG restored, gradients cleared), so the compile time is measured
        here and not hidden in the next epoch. Seconds spent."""
        start = time.perf_counter()
        rows = replica_rows(torch.arange(len(train_data)), 0, rt.plan.replica_batch * rt.layout.replicas,
                            rt.replica, rt.layout.replicas)
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            self.run(rt, train_data.batch(rows, self.device), train=True)
            for _, p in rt.params:
                p.grad = None
            rt.module.eval()
            with torch.no_grad():
                self.run(rt, val_data.batch(rows % len(val_data), self.device), train=False)
            rt.module.train(self.dropout)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        log(f"compiled layout {rt.layout} with {rt.frozen} frozen blocks in {seconds:.1f} s")
        return seconds
