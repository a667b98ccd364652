"""The one error type for bad user input (flags, config, model folders, data files)."""
from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """Bad user input: the message names the field or file, the value and the fix."""
