"""pipetransformer: fine-tune Transformers faster with AutoFreeze and elastic pipelines.

    from pipetransformer import fine_tune
    fine_tune(model="minilm-l6", data="rotten-tomatoes", epochs=4, freeze="adaptive")
"""
from .config import Config, ConfigError
from .engine import Trainer, fine_tune
from .models import StagedModel, load_model, wrap_model

__all__ = ["Config", "ConfigError", "Trainer", "fine_tune", "StagedModel", "load_model", "wrap_model"]
