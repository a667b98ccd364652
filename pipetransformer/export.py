"""`pipetransformer export RUN_DIR`: final/ from the run's newest checkpoint (after a run
whose own save failed, or one that was stopped)."""
from __future__ import annotations

from pathlib import Path

from . import checkpoint
from .config import Config, ConfigError, read_yaml
from .models.loading import load_model
from .recorder import save_final

__all__ = ["export_final"]


def export_final(run_dir: Path) -> Path:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"export: {str(run_dir)!r} has no config.yaml, so it holds no run; pass a "
                          f"folder made by `pipetransformer train`")
    if (run_dir / "final").exists():
        raise ConfigError(f"export: {run_dir / 'final'} exists already; nothing was overwritten. Move "
                          f"it away to write it again")
    found = checkpoint.latest(run_dir)
    if found is None:
        raise ConfigError(f"export: {str(run_dir)!r} holds no complete checkpoint; resume the run "
                          f"first (pipetransformer train --resume {run_dir})")
    cfg = Config.from_dict(read_yaml(saved), source=str(saved))
    stored = checkpoint.read_manifest(found).fingerprint
    labels = stored["labels"]
    model = load_model(cfg.model.model, len(labels), cfg.train.seed, labels, stored.get("task", "classify"))
    checkpoint.load_tensors(found, {f"model.{n}": p.data for n, p in model.hf_model.named_parameters()})
    save_final(model, run_dir)
    return run_dir / "final"
