"""`pipetransformer profile`: a model's units measured on this machine as a run would use it.

With `processes` > 1 on CPU, processes - 1 copies of the model train in the background while
the units are timed, every process with cores / processes threads as the launcher gives
them, so the profile includes what co-running processes cost each other (cores, memory
bandwidth, caches). The copies are started first and stopped once the timing is done.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tempfile

import torch
import yaml

from .config import Config
from .costs import Profile
from .data.sources import describe_data
from .distributed import device_for
from .models.base import StagedModel
from .models.loading import load_model
from .runtime import measure_profile, synthetic_inputs

__all__ = ["measure", "keep_busy"]


def _load(cfg: Config) -> tuple[StagedModel, list[int], int]:
    """The model, the batch sizes to time (a quarter of the batch and the batch: the sizes
    of micro-batches and of whole replica batches) and the rows' side (tokens or pixels)."""
    names = describe_data(cfg.data.data).label_names
    model = load_model(cfg.model.model, len(names), cfg.train.seed, names)
    batch = cfg.train.batch_size
    side = cfg.model.max_length if model.modality == "text" else cfg.data.image_size
    return model, sorted({max(1, batch // 4), batch}), side


def measure(cfg: Config, processes: int = 1) -> Profile:
    """A profile of cfg's model on this machine (its first GPU, else the CPU), with the
    machine's load average before it started."""
    load = os.getloadavg()[0]
    peers: list[subprocess.Popen] = []
    config_file = None
    if processes > 1 and not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 1) // processes)
        torch.set_num_threads(threads)
        with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="pipetransformer-", delete=False) as f:
            yaml.safe_dump(cfg.to_dict(), f)
        config_file = f.name
        peers = [subprocess.Popen([sys.executable, "-m", "pipetransformer", "profile", "--config", config_file,
                                   "--busy"], stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, "OMP_NUM_THREADS": str(threads)})
                 for _ in range(processes - 1)]
    try:
        model, sizes, side = _load(cfg)
        for peer in peers:  # time only once every copy trains
            if peer.stdout is None or peer.stdout.readline().strip() != "ready":
                raise RuntimeError("a co-running profile process failed to start")
        return dataclasses.replace(measure_profile(model, cfg.model.model, sizes, side, device_for(0)),
                                   load_average=load)
    finally:
        for peer in peers:
            peer.terminate()
            peer.wait()
        if config_file:
            os.unlink(config_file)


def keep_busy(cfg: Config) -> None:
    """A co-running copy: train the whole model on the largest batch until stopped."""
    model, sizes, side = _load(cfg)
    inputs = synthetic_inputs(model, sizes[-1], side)
    model.hf_model.train()
    print("ready", flush=True)
    while True:
        model.forward(*inputs).float().sum().backward()
