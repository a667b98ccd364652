"""The streaming input pipeline: a torch DataLoader whose item is one *step* (the rows the
sampler and autodp.replica_rows chose for this replica), fetched as a whole by the data set
in worker processes, pinned on CUDA and prefetched; finished (moved, converted) on the
device here, in the training process."""
from __future__ import annotations

import multiprocessing
from collections.abc import Generator, Sequence

import torch
from torch.utils.data import DataLoader

from ..costs import usable_cores
from ..errors import ConfigError
from .dataset import Dataset

__all__ = ["StepLoader", "loader_workers"]

# Workers by fork share the data set's memory maps; spawn or forkserver (Python 3.14's Linux
# default) would pickle the data set into every worker, copying mapped arrays whole.
_FORK = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def loader_workers(setting: int, modality: str, local_processes: int) -> int:
    """Worker processes per training process. Auto (-1): none for text, whose steps are cheap
    slices of memory-mapped token ids (a worker would only add a copy); for images, up to 4,
    sharing the machine's cores among its training processes."""
    if setting >= 0:
        return setting
    if modality == "text":
        return 0
    return min(4, usable_cores() // max(1, local_processes))


class _Steps(torch.utils.data.Dataset):
    def __init__(self, data: Dataset, steps: Sequence[torch.Tensor]):
        self.data, self.steps = data, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> dict:
        try:
            return self.data.fetch(self.steps[i])
        except ConfigError as e:  # one line in the training process, not a worker's traceback
            return {"error": str(e)}


class StepLoader:
    def __init__(self, workers: int, device: torch.device):
        self.workers, self.device = workers, device

    def __call__(self, data: Dataset, steps: Sequence[torch.Tensor]) -> Generator[tuple[torch.Tensor, dict]]:
        """(rows, batch) for each step's rows in order, the batch's inputs on the device."""
        workers = min(self.workers, len(steps))
        # a generator of its own: the DataLoader draws its workers' seed from it, not from the
        # global RNG, whose draws (dropout) must stay those of a run without a loader
        loader = DataLoader(_Steps(data, steps), batch_size=None, shuffle=False, num_workers=workers,
                            pin_memory=self.device.type == "cuda", prefetch_factor=2 if workers else None,
                            generator=torch.Generator(), multiprocessing_context=_FORK if workers else None)
        for rows, raw in zip(steps, loader):
            if "error" in raw:
                raise ConfigError(raw["error"])
            yield rows, data.finish(raw, self.device)
