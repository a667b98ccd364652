"""Model loading: a name or a local Hugging Face folder -> StagedModel. Never touches a hub."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights come from disk only

import torch  # noqa: E402

from ..errors import ConfigError  # noqa: E402
from .base import StagedModel  # noqa: E402
from .catalog import VISION_FAMILIES, describe_model, resolve_model_path  # noqa: E402
from .text import wrap_text_model  # noqa: E402
from .vision import wrap_vision_model  # noqa: E402

__all__ = ["load_model", "wrap_model"]


def wrap_model(hf_model, processor=None) -> StagedModel:
    """Adapter for an already built Hugging Face classifier."""
    if hf_model.config.model_type in VISION_FAMILIES:
        return wrap_vision_model(hf_model, processor)
    return wrap_text_model(hf_model, processor)


def load_model(spec: str, num_labels: int, seed: int = 0, label_names: list[str] | None = None,
               task: str = "classify") -> StagedModel:
    """Load a pretrained encoder from disk and put a fresh, seeded head on it: a classifier, or
    for task "qa" a question-answering head (start/end logits; num_labels 2) unless the
    folder holds one already."""
    from transformers import AutoConfig
    from transformers import logging as hf_logging

    describe_model(spec)  # a clear error for an unsupported or broken folder
    path = resolve_model_path(spec)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    config.num_labels = num_labels
    if label_names:
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    torch.manual_seed(seed)  # the new head's initialisation is part of the run's seed
    hf_logging.disable_progress_bar()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized head" warnings are expected here
    try:
        return _load(path, config, task)
    except Exception as e:  # truncated or garbage weights, a broken tokenizer: the folder is at fault
        detail = " ".join(str(e).split())[:200]
        raise ConfigError(f"--model={spec!r}: {path} cannot be loaded ({type(e).__name__}: {detail}); "
                          f"save the model again with save_pretrained") from None
    finally:
        hf_logging.set_verbosity(verbosity)


def _load(path, config, task: str) -> StagedModel:
    """The Hugging Face model with a fresh head, and its tokenizer or image processor."""
    if config.model_type in VISION_FAMILIES:
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained(
            path, config=config, local_files_only=True, ignore_mismatched_sizes=True)
        try:
            processor = AutoImageProcessor.from_pretrained(path, local_files_only=True, use_fast=False)
        except OSError:
            processor = None
        return wrap_model(model, processor)
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification, AutoTokenizer
    auto = AutoModelForQuestionAnswering if task == "qa" else AutoModelForSequenceClassification
    model = auto.from_pretrained(path, config=config, local_files_only=True, ignore_mismatched_sizes=True)
    return wrap_model(model, AutoTokenizer.from_pretrained(path, local_files_only=True))
