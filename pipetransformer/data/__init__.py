"""Data: sources.py reads files (no torch, for checks before workers start), load.py picks
the task's loader, dataset.py makes classification tensors, qa_dataset.py question-answering
windows, sampler.py orders rows into steps, augment.py draws image augmentations."""
