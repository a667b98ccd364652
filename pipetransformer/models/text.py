"""Adapters for Hugging Face BERT-family sequence classifiers and question-answering models
(BERT, MiniLM, RoBERTa, DistilBERT)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import StagedModel, SubBlock, Unit
from .catalog import BERT_LIKE, TEXT_FAMILIES


class _Embed(nn.Module):
    def __init__(self, embeddings: nn.Module, segments: bool):
        super().__init__()
        self.embeddings = embeddings
        self.segments = segments  # the model embeds segment (token type) ids; DistilBERT does not

    def forward(self, input_ids, mask):
        if input_ids.dim() == 3:  # (B, 2, T): token ids and segment ids (StagedModel.inputs)
            input_ids, types = input_ids.unbind(1)
            if self.segments:
                return self.embeddings(input_ids=input_ids, token_type_ids=types)
        return self.embeddings(input_ids=input_ids)


class _Head(nn.Module):
    """Classification head; `fn(self, hidden)` -> logits."""

    def __init__(self, fn, **children: nn.Module):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)
        self._fn = fn

    def forward(self, x, mask):
        return self._fn(self, x)


def _bert_attn(m, x, mask):
    return m.attention(x, mask)[0]


def _bert_mlp(m, x, mask):
    return m.output(m.intermediate(x), x)


def _distil_attn(m, x, mask):
    return m.sa_layer_norm(m.attention(x, attention_mask=mask)[0] + x)


def _distil_mlp(m, x, mask):
    return m.output_layer_norm(m.ffn(x) + x)


def _bert_head(m, x):
    return m.classifier(m.dropout(m.pooler(x)))


def _roberta_head(m, x):
    return m.classifier(x)


def _qa_head(m, x):
    """(B, T, 2): start and end logits of every token."""
    return m.qa_outputs(x)


def _distil_qa_head(m, x):
    return m.qa_outputs(m.dropout(x))


def _distil_head(m, x):
    pooled = torch.relu(m.pre_classifier(x[:, 0]))
    return m.classifier(m.dropout(pooled))


def wrap_text_model(hf_model: Any, tokenizer=None) -> StagedModel:
    kind = hf_model.config.model_type
    qa = getattr(hf_model, "qa_outputs", None) is not None  # a ...ForQuestionAnswering model
    if kind in BERT_LIKE:
        base = getattr(hf_model, hf_model.base_model_prefix)
        layers, embeddings = base.encoder.layer, base.embeddings
        attn, mlp = (["attention"], _bert_attn), (["intermediate", "output"], _bert_mlp)
        if qa:
            head = _Head(_qa_head, qa_outputs=hf_model.qa_outputs)
        elif getattr(hf_model, "classifier", None) is not None and hasattr(hf_model.classifier, "out_proj"):
            head = _Head(_roberta_head, classifier=hf_model.classifier)
        else:
            if base.pooler is None:
                raise ValueError(f"model type {kind!r} without a pooler is not supported")
            head = _Head(_bert_head, pooler=base.pooler, dropout=hf_model.dropout,
                         classifier=hf_model.classifier)
    elif kind == "distilbert":
        base = hf_model.distilbert
        layers, embeddings = base.transformer.layer, base.embeddings
        attn = (["attention", "sa_layer_norm"], _distil_attn)
        mlp = (["ffn", "output_layer_norm"], _distil_mlp)
        if qa:
            head = _Head(_distil_qa_head, dropout=hf_model.dropout, qa_outputs=hf_model.qa_outputs)
        else:
            head = _Head(_distil_head, pre_classifier=hf_model.pre_classifier,
                         dropout=hf_model.dropout, classifier=hf_model.classifier)
    else:
        raise ValueError(f"model type {kind!r} is not a supported text model; "
                         f"supported: {sorted(TEXT_FAMILIES)}")
    units = [Unit("embed", 0, _Embed(embeddings, segments=kind != "distilbert"))]
    for i, layer in enumerate(layers):
        units.append(Unit(f"block.{i}.attn", i, SubBlock(layer, *attn)))
        units.append(Unit(f"block.{i}.mlp", i, SubBlock(layer, *mlp)))
    units.append(Unit("head", len(layers), head))
    return StagedModel(hf_model, units, "text", tokenizer, "qa" if qa else "classify")
