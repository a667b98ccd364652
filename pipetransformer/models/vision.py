"""Adapters for Hugging Face ViT-family image classifiers (ViT, DeiT, DINOv2)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .base import StagedModel, SubBlock, Unit
from .catalog import VISION_FAMILIES


class _Embed(nn.Module):
    def __init__(self, embeddings: nn.Module):
        super().__init__()
        self.embeddings = embeddings

    def forward(self, pixel_values):
        return self.embeddings(pixel_values)


class _Head(nn.Module):
    """Final norm + classifier: on the class token, or class token + mean patch (DINOv2)."""

    def __init__(self, layernorm: nn.Module, classifier: nn.Module, mean_patch: bool):
        super().__init__()
        self.layernorm, self.classifier, self.mean_patch = layernorm, classifier, mean_patch

    def forward(self, x):
        x = self.layernorm(x)
        feats = torch.cat([x[:, 0], x[:, 1:].mean(dim=1)], dim=1) if self.mean_patch else x[:, 0]
        return self.classifier(feats)


def _vit_attn(m, x):
    return x + m.dropout(m.attention(m.layernorm_before(x))[0])


def _vit_mlp(m, x):
    return x + m.dropout(m.mlp(m.layernorm_after(x)))


def _dino_attn(m, x):
    return x + m.drop_path(m.layer_scale1(m.attention(m.norm1(x))[0]))


def _dino_mlp(m, x):
    return x + m.drop_path(m.layer_scale2(m.mlp(m.norm2(x))))


def wrap_vision_model(hf_model: Any, image_processor=None) -> StagedModel:
    kind = hf_model.config.model_type
    if kind not in VISION_FAMILIES:
        raise ValueError(f"model type {kind!r} is not a supported image model; "
                         f"supported: {sorted(VISION_FAMILIES)}")
    if kind == "deit" and not hasattr(hf_model, "classifier"):
        raise ValueError("DeiT with distillation head is not supported: use DeiTForImageClassification")
    base = getattr(hf_model, hf_model.base_model_prefix)
    if kind == "dinov2":
        attn = (["norm1", "attention", "layer_scale1", "drop_path"], _dino_attn)
        mlp = (["norm2", "mlp", "layer_scale2", "drop_path"], _dino_mlp)
    else:
        attn = (["layernorm_before", "attention", "dropout"], _vit_attn)
        mlp = (["layernorm_after", "mlp", "dropout"], _vit_mlp)
    layers = base.encoder.layer if hasattr(base, "encoder") else base.layers  # ViT/DeiT in transformers 5
    units = [Unit("embed", 0, _Embed(base.embeddings))]
    for i, layer in enumerate(layers):
        units.append(Unit(f"block.{i}.attn", i, SubBlock(layer, *attn)))
        units.append(Unit(f"block.{i}.mlp", i, SubBlock(layer, *mlp)))
    units.append(Unit("head", len(layers), _Head(base.layernorm, hf_model.classifier, kind == "dinov2")))
    return StagedModel(hf_model, units, "image", image_processor)
