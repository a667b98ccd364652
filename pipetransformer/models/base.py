"""The adapter protocol: a classifier (or question-answering model) seen as
embed -> blocks[0..L-1] -> head.

A model is a list of *units*, each a small module that can be placed on any pipeline stage.
Every unit maps ``(x, *extras) -> x``: the embedding unit takes the raw input, block units
take hidden states, the head returns logits. ``extras`` are per-sample tensors that travel
unchanged alongside the hidden states (the additive attention mask for text, nothing for
images). Units share parameters with the wrapped Hugging Face model, so the Hugging Face
names are the stable names used by partitioning, migration and checkpoints.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass
class Unit:
    name: str          # stable: "embed", "block.3.attn", "block.3.mlp", "head"
    freeze_index: int  # frozen once k > freeze_index: embed 0, block l -> l, head L (never)
    module: nn.Module

    def cost(self) -> int:
        """Partitioning weight: parameters that do matrix work per token.

        Embedding tables are left out: a lookup costs no FLOPs, yet counting them (the paper's
        parameter-size rule) puts a small BERT's whole vocabulary on stage 0 and nearly all of
        its compute on stage 1.
        """
        tables = {id(m.weight) for m in self.module.modules() if isinstance(m, nn.Embedding)}
        return sum(p.numel() for p in self.module.parameters() if id(p) not in tables)


class SubBlock(nn.Module):
    """Part of a Hugging Face layer: owns the named children it uses, runs `fn` on them.

    Cuts are only made between residual sections, so a unit's output is the complete
    hidden state and no residual tensor has to cross a stage boundary.
    """

    def __init__(self, layer: nn.Module, children: list[str], fn: Callable):
        super().__init__()
        for child in children:
            self.add_module(child, getattr(layer, child))
        self._fn = fn

    def forward(self, x, *extras):
        return self._fn(self, x, *extras)


class StagedModel:
    """A Hugging Face classifier split into units. Holds no training machinery."""

    def __init__(self, hf_model: Any, units: list[Unit], modality: str, processor=None, task: str = "classify"):
        self.hf_model = hf_model
        self.units = units
        self.modality = modality          # "text" or "image"
        self.task = task                  # "classify" (head: class logits) or "qa" (start/end logits per token)
        self.processor = processor        # tokenizer or image processor, saved with the model
        self.num_blocks = max(u.freeze_index for u in units if u.name != "head") + 1
        self._names = {id(p): n for n, p in hf_model.named_parameters()}
        assert units[0].name == "embed" and units[-1].name == "head"

    @property
    def num_labels(self) -> int:
        return self.hf_model.config.num_labels

    def named_parameters(self, unit: Unit):
        """(stable Hugging Face name, parameter) pairs of one unit."""
        return [(self._names[id(p)], p) for p in unit.module.parameters()]

    def inputs(self, batch: dict) -> tuple:
        """Model inputs for the embedding unit: (input_ids, additive_mask) or (pixels,). With
        segments (question answering: question vs context), ids and segment ids travel as one
        (B, 2, T) tensor, so the extras between units stay (mask,)."""
        if self.modality == "text":
            ids = batch["input_ids"]
            if "token_type_ids" in batch:
                ids = torch.stack([ids, batch["token_type_ids"]], dim=1)
            return ids, additive_mask(batch["attention_mask"])
        return (batch["pixel_values"],)

    def forward(self, *inputs):
        """The whole model, unit by unit (reference path; the engine runs stages instead)."""
        x, *extras = inputs
        for u in self.units:
            x = u.module(x, *extras)
        return x


def additive_mask(attention_mask: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B, 1, 1, T) additive mask, accepted by eager and SDPA attention."""
    m = attention_mask[:, None, None, :].to(dtype)
    return (1.0 - m) * torch.finfo(dtype).min
