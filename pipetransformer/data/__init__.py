"""Data: sources.py reads files (no torch, for checks before workers start), dataset.py makes
tensors, sampler.py orders rows into steps, augment.py draws image augmentations."""
