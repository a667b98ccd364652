"""pipetransformer: fine-tune Transformers faster with AutoFreeze and elastic pipelines.

    from pipetransformer import fine_tune
    fine_tune(model="minilm-l6", data="rotten-tomatoes", epochs=4, freeze="adaptive")

The names below that need torch load on first use, so the command line can check its
input before importing torch.
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

from .config import Config
from .errors import ConfigError

__all__ = ["Config", "ConfigError", "Trainer", "fine_tune", "StagedModel", "load_model", "wrap_model"]

_LAZY = {"Trainer": "engine", "fine_tune": "engine", "StagedModel": "models.base",
         "load_model": "models.loading", "wrap_model": "models.loading"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
