"""Checkpoints: everything that continuing a run exactly needs, written so that it loads onto
any number of processes.

A checkpoint is a folder `RUN/checkpoints/step-<samples seen>/` written with
torch.distributed.checkpoint (DCP): each process saves the tensors it owns under stable
names, so another process count loads them by name:

  model.<hf name>                 every unit's weights (each from its owner, see TransitionPlan.owners)
  optim.<hf name>.<slot>          AdamW's exp_avg, exp_avg_sq, step of every active parameter
  meter.<hf name>                 what AutoFreeze kept of the interval so far (gradient sums or
                                  starting weights, freeze_stats.BlockMeter), each its share
  rng.<rank>, rng_cuda.<rank>     each process's CPU and CUDA RNG states (restored on the same
                                  process count; dropout reseeds from the position anyway,
                                  autodp.dropout_seed)

and `manifest.json` (rank 0) with the rest: where in training (epoch, step, samples seen),
the freeze state, the metrics so far, the partial epoch's losses, and fingerprints of the
model and the data that a resume checks. A checkpoint is written under a temporary name and
renamed when complete; the newest `keep` are kept. The cache is not saved: it refills.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from .errors import ConfigError

__all__ = ["Snapshot", "save", "latest", "read_manifest", "load_tensors", "fingerprint", "check_fingerprint",
           "owned_tensors", "restore",
           "FORMAT"]

FORMAT = 1
MANIFEST = "manifest.json"


@dataclass
class Snapshot:
    """The host-side state a checkpoint's manifest holds."""
    epoch: int                  # the epoch to run next (0-based)
    step: int                   # steps of that epoch already done
    samples_seen: int
    freeze: dict                # FreezeState.state_dict()
    records: list[dict]         # metrics.jsonl so far
    partial: dict               # the running epoch's step losses, seconds and cache hits so far
    world: int
    stages: int
    fingerprint: dict
    lr_ramp: tuple[float, int] = (1.0, 0)  # the LR scale a ramp started from, and at what samples seen


def fingerprint(cfg, label_names: list[str], num_blocks: int, task: str = "classify",
                data_cache: Path | None = None, model_config: dict | None = None, data_id: str | None = None) -> dict:
    """What a resume must find unchanged: the model's architecture and the data (and the task,
    which export needs to rebuild the head). A data file's digest is kept in `data_cache`.
    `model_config`: the Hugging Face config of a model given as an object (Trainer(model=...)),
    which --model does not name; `data_id` stands for data given as objects, which --data does
    not name."""
    from .data.sources import BUILTIN
    from .models.catalog import BUILTIN as BUILTIN_MODELS
    from .models.catalog import resolve_model_path
    data = cfg.data.data
    if model_config is not None:
        model = hashlib.sha256(json.dumps(model_config, sort_keys=True, default=str).encode()).hexdigest()
    elif cfg.model.model in BUILTIN_MODELS:
        model = cfg.model.model
    else:
        model = _sha(resolve_model_path(cfg.model.model) / "config.json")
    return {"model": model,
            "num_blocks": num_blocks, "labels": label_names, "task": task,
            "data": data_id or (data if data in BUILTIN else _data_digest(Path(data), data_cache))}


def _data_digest(path: Path, data_cache: Path | None) -> str:
    """sha256 of the data; for a file, computed once per run folder and version of the file
    and kept in `data_cache` (every process of every start and resume would otherwise read a
    file of many gigabytes whole); the version is the key the tokenised arrays use."""
    if path.is_dir() or data_cache is None:
        return _sha(path)
    import numpy as np

    from .data.store import cache_key, cached_arrays, file_stamp
    key = cache_key(sha256=str(path.resolve()), **file_stamp(path))

    def digest():
        yield {"sha256": np.frombuffer(bytes.fromhex(_sha(path)), np.uint8)[None]}
    return bytes(cached_arrays(data_cache, key, digest)["sha256"][0]).hex()


def _sha(path: Path) -> str:
    """sha256 of a file, or of a folder's file names and sizes (image trees)."""
    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f"{f.relative_to(path)}:{f.stat().st_size}\n".encode())
    else:
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def save(run_dir: Path, tensors: dict[str, torch.Tensor], snapshot: Snapshot, keep: int) -> Path:
    """Write one checkpoint (collective: every process passes the tensors it owns) and keep
    the newest `keep`. Returns its folder."""
    root = run_dir / "checkpoints"
    final = root / f"step-{snapshot.samples_seen:012d}"
    tmp = root / f".tmp-{final.name}"
    if dist.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    dist.barrier()  # every rank's part is on disk
    if dist.get_rank() == 0:
        manifest = {"format": FORMAT, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **snapshot.__dict__}
        (tmp / MANIFEST).write_text(json.dumps(manifest))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: a checkpoint either has its manifest or does not exist
        for old in _complete(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _complete(root: Path) -> list[Path]:
    """Checkpoint folders with a manifest, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / MANIFEST).is_file())


def latest(run_dir: Path) -> Path | None:
    found = _complete(run_dir / "checkpoints")
    return found[-1] if found else None


def read_manifest(path: Path) -> Snapshot:
    """The manifest of checkpoint `path`, checked; ConfigError naming the file if unusable."""
    try:
        raw = json.loads((path / MANIFEST).read_text())
        if raw.pop("format") != FORMAT:
            raise ValueError("format")
        raw.pop("time", None)
        start, since = raw.pop("lr_ramp", (1.0, 0))  # JSON keeps a list; older checkpoints have none
        return Snapshot(**raw, lr_ramp=(float(start), int(since)))
    except (OSError, ValueError, TypeError, KeyError):
        raise ConfigError(f"checkpoint {path}: its {MANIFEST} is missing or unreadable; remove "
                          f"that folder to resume from the one before, or start a new run") from None


def load_tensors(path: Path, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load the tensors of `wanted` that the checkpoint holds, in place (every process may ask
    for any names). Returns the ones found."""
    try:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        found = {k: v for k, v in wanted.items() if k in stored}
        dcp.load(found, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (Exception, dcp.api.CheckpointException) as e:  # any unreadable checkpoint: one user error
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1][:200]  # DCP appends the root cause
        raise ConfigError(f"checkpoint {path} cannot be read ({last}); "
                          f"remove that folder to resume from the one before, or start a new run") from None
    return found


def check_fingerprint(path: Path, stored: dict[str, Any], current: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made for another model or data set."""
    for key in ("model", "num_blocks", "labels", "data"):
        if stored.get(key) != current.get(key):
            what = {"model": "--model", "num_blocks": "--model", "labels": "--data", "data": "--data"}[key]
            raise ConfigError(f"checkpoint {path} was made with another {what} ({key} differs: "
                              f"{str(stored.get(key))[:60]} vs {str(current.get(key))[:60]}); resume "
                              f"with the run's own model and data, or start a new run")


_ADAM_SLOTS = ("exp_avg", "exp_avg_sq", "step")


def owned_tensors(model, rt, meter) -> dict[str, torch.Tensor]:
    """What this process saves: the units it owns under `rt`'s plan, on replica 0 (the
    replicas hold copies) its active parameters' Adam state, and its share of the gradient
    sums."""
    rank = dist.get_rank()
    out: dict[str, torch.Tensor] = {}
    for unit in model.units:
        if rt.plan.owners[unit.name] == rank:
            out.update({f"model.{n}": p.detach() for n, p in model.named_parameters(unit)})
    if rt.replica == 0:
        if rt.optimizer is not None:
            names = {id(p): n for n, p in rt.params}
            for p, state in rt.optimizer.state.items():
                out.update({f"optim.{names[id(p)]}.{s}": state[s] for s in _ADAM_SLOTS})
    out.update({f"meter.{n}": g for n, g in meter.named_sums().items()})  # each replica its share
    out[f"rng.{rank}"] = torch.get_rng_state()
    if torch.cuda.is_initialized():
        out[f"rng_cuda.{rank}"] = torch.cuda.get_rng_state()
    return out


def restore(path: Path, model, rt, meter, same_world: bool) -> None:
    """Load a checkpoint into this process (collective): every weight, the Adam state of the
    parameters `rt` trains here, its share of the gradient sums, and (on the same
    number of processes) its RNG state."""
    wanted: dict[str, torch.Tensor] = {f"model.{n}": p.data for n, p in model.hf_model.named_parameters()}
    for n, p in rt.params:
        wanted.update({f"optim.{n}.exp_avg": torch.zeros_like(p, dtype=torch.float32),
                       f"optim.{n}.exp_avg_sq": torch.zeros_like(p, dtype=torch.float32),
                       f"optim.{n}.step": torch.zeros((), dtype=torch.float32, device=p.device)})
    wanted.update({f"meter.{n}": torch.zeros_like(p, dtype=torch.float32)
                   for params in rt.meter_params.values() for n, p in params})
    rng, rng_cuda = f"rng.{dist.get_rank()}", f"rng_cuda.{dist.get_rank()}"
    if same_world:
        wanted[rng] = torch.get_rng_state()
        if torch.cuda.is_initialized():
            wanted[rng_cuda] = torch.cuda.get_rng_state()
    found = load_tensors(path, wanted)
    for n, p in rt.params:
        if rt.optimizer is not None and all(f"optim.{n}.{s}" in found for s in _ADAM_SLOTS):
            rt.optimizer.state[p] = {s: found[f"optim.{n}.{s}"] for s in _ADAM_SLOTS}
    meter.restore(rt.meter_params, {k[len("meter."):]: v for k, v in found.items() if k.startswith("meter.")})
    if rng in found:
        torch.set_rng_state(found[rng])
    if rng_cuda in found:
        torch.cuda.set_rng_state(found[rng_cuda])
