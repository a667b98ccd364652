"""Which rows form each step: a seeded permutation per epoch, cut into global batches."""
from __future__ import annotations

import torch

__all__ = ["BatchSampler"]


class BatchSampler:
    """Global batches of a seeded per-epoch permutation.

    Replicas slice each global batch (autodp.replica_rows), so re-sharding changes who reads
    a row, never which rows form a step. The tail that does not fill a batch is dropped
    (fixed shapes keep the pipeline's receive buffers valid).
    """

    def __init__(self, num_rows: int, seed: int):
        self.num_rows, self.seed = num_rows, seed

    def steps(self, global_batch: int) -> int:
        return self.num_rows // global_batch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_rows, generator=g)
