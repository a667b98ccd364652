"""`pipetransformer profile`: a model's units measured on this machine as a run would use it.

`measure_profile` times every unit with `runtime.profile_units` (the balance-by-time profile)
at each batch size, and adds what the planner needs besides: the bytes of each unit's
output and saved activations, its parameters, and their optimizer step. With `processes` >
1 on CPU, `measure` first starts processes - 1 copies of the model training in the
background, every process with cores / processes threads as the launcher gives them, so
the times include what co-running processes cost each other (cores, memory bandwidth,
caches); the copies stop once the timing is done.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn

from .config import Config
from .costs import Profile, UnitProfile, read_profile, threads_per_process, usable_cores, write_profile
from .data.sources import describe_data
from .distributed import device_for
from .errors import ConfigError
from .models.base import StagedModel, Unit
from .models.loading import load_model
from .recorder import refuse_used_run_dir
from .runtime import UnitSequence, profile_units
from .stopping import end_children
from .timing import best_seconds

__all__ = ["RUN_PROFILE", "measure", "measure_profile", "run_profile", "keep_busy", "synthetic_inputs"]

RUN_PROFILE = "profile.json"  # in a run folder: what its automatic choices were priced with

BUSY_PARENT = "PIPETRANSFORMER_PROFILE_PARENT"  # a co-running copy's profile process


def measure_profile(model: StagedModel, name: str, batch_sizes: Sequence[int], seq_len: int, device,
                    names: set[str] | None = None) -> Profile:
    """The planner's profile of `model` on `device`: every unit (of `names`, default all: a
    share of the units, for processes that time the rest) timed at each batch size on
    synthetic rows of `seq_len` tokens (or pixels a side), with dropout on as in training,
    its sizes, and its parameters' optimizer step. Changes no weight and no RNG state."""
    device = torch.device(device)
    mode = model.hf_model.training
    model.hf_model.train()
    try:
        seconds = [profile_units(model, synthetic_inputs(model, n, seq_len), device, names) for n in batch_sizes]
        nbytes = _unit_bytes(model, synthetic_inputs(model, batch_sizes[-1], seq_len), device, names)
    finally:
        model.hf_model.train(mode)
    rows = batch_sizes[-1]
    units = tuple(UnitProfile(
        u.name, u.freeze_index, u.cost(), sum(p.numel() * p.element_size() for p in u.module.parameters()),
        nbytes[u.name][0] / rows, nbytes[u.name][1] / rows,
        tuple(s[u.name][1] for s in seconds),
        tuple(max(0.0, s[u.name][0] - s[u.name][1]) for s in seconds),  # (forward + backward) - forward
        _update_seconds(u, device)) for u in model.units if names is None or u.name in names)
    cuda = device.type == "cuda"
    if cuda:
        props = torch.cuda.get_device_properties(device)
        device_name, memory = props.name, props.total_memory
    else:
        device_name, memory = f"{platform.processor() or platform.machine()} ({usable_cores()} cores)", 0
    return Profile(name, model.modality, units, tuple(batch_sizes), seq_len, device.type, device_name,
                   torch.get_num_threads(), "bfloat16" if cuda else "float32", time.strftime("%Y-%m-%d"),
                   memory / 1e9, torch.__version__)


def run_profile(model: StagedModel, cfg: Config, rows: int, device, resumed: bool, log) -> Profile:
    """The profile a run's automatic choices (--stages auto, --micro-batches auto, --balance
    time) are priced with: the units timed at `rows` rows and a quarter of that
    (measure_profile), each process timing its share of them at once (as training runs them
    side by side), written by rank 0 to the run folder's profile.json. A resumed or restarted
    run reads that file back, so its choices stay the run's. Every rank gets the same. Collective."""
    rank, world = dist.get_rank(), dist.get_world_size()
    path = Path(cfg.run_dir) / RUN_PROFILE
    found: list = [None, None]
    if rank == 0:
        found[0] = resumed and path.is_file()
        try:
            if not resumed:  # what Recorder.start checks, before this writes into the folder
                refuse_used_run_dir(path.parent)
        except ConfigError as e:
            found[1] = str(e)
    dist.broadcast_object_list(found, src=0)
    if found[1]:  # every rank stops with it, none waits for rank 0 in a collective
        raise ConfigError(found[1])
    box: list[Profile | None] = [None]
    if found[0]:
        if rank == 0:
            box = [read_profile(path)]
            log(f"automatic choices priced with {path} (timed when the run started)")
    else:
        began = time.perf_counter()
        side = cfg.model.max_length if model.modality == "text" else cfg.data.image_size
        mine = {u.name for i, u in enumerate(model.units) if i % world == rank}
        placed = [next(u.module.parameters()).device for u in model.units]
        part = measure_profile(model, cfg.model.model, sorted({max(1, rows // 4), rows}), side, device, mine)
        for unit, where in zip(model.units, placed):  # timing moved every unit to this GPU: back they go
            unit.module.to(where)
        parts: list = [None] * world
        dist.all_gather_object(parts, part.units)
        timed = {u.name: u for units in parts for u in units}
        if rank == 0:
            local = int(os.environ.get("LOCAL_WORLD_SIZE", world))  # the processes sharing this machine's cores
            profile = dataclasses.replace(part, units=tuple(timed[u.name] for u in model.units), processes=local,
                                          cores=usable_cores())
            write_profile(profile, path)
            box = [profile]
            log(f"timed {len(model.units)} units on {world} process(es) in {time.perf_counter() - began:.1f} s "
                f"for the automatic choices: {path} (`pipetransformer plan --profile` reads it)")
    dist.broadcast_object_list(box, src=0)
    assert box[0] is not None
    return box[0]


def synthetic_inputs(model: StagedModel, rows: int, seq_len: int) -> tuple:
    """Model inputs of the right kind and shape: random tokens, every position attended (text
    is padded to the full length in training), or random pixels."""
    g = torch.Generator().manual_seed(0)
    if model.modality == "text":
        vocab = model.hf_model.config.vocab_size
        return model.inputs({"input_ids": torch.randint(min(5, vocab - 1), vocab, (rows, seq_len), generator=g),
                             "attention_mask": torch.ones(rows, seq_len, dtype=torch.long)})
    return model.inputs({"pixel_values": torch.randn(rows, 3, seq_len, seq_len, generator=g)})


def _unit_bytes(model: StagedModel, inputs: tuple, device: torch.device,
                names: set[str] | None = None) -> dict[str, tuple[int, int]]:
    """Per unit (of `names`, default all; the others only pass their output on), the bytes of
    its output and of the activations autograd keeps for its backward pass, for the whole
    batch (units run in order, as training runs them)."""
    out = {}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        x, *extras = [t.to(device) for t in inputs]
        for unit in model.units:
            seq = UnitSequence([unit], device)
            if names is not None and unit.name not in names:
                with torch.no_grad():
                    y = seq(x, *extras)
                x = (y if torch.is_tensor(y) else y[0]).detach()
                continue
            inp = x.detach().requires_grad_(x.is_floating_point())
            y, saved = _forward_saving(seq, (inp, *extras), {p.untyped_storage().data_ptr()
                                                              for p in unit.module.parameters()})
            out[unit.name] = (y.numel() * y.element_size(), saved)
            x = y.detach()
    return out


def _forward_saving(seq: UnitSequence, inputs: tuple, weights: set[int]) -> tuple[torch.Tensor, int]:
    """seq's output, and the bytes autograd keeps for its backward pass: activations only
    (tensors on the weights' storage left out), each stored tensor counted once."""
    saved: dict[tuple, int] = {}

    def keep(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage().data_ptr()
        if storage not in weights:
            saved[(storage, t.storage_offset(), tuple(t.shape))] = t.numel() * t.element_size()
        return t
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = seq(*inputs)
    return (y if torch.is_tensor(y) else y[0]), sum(saved.values())


def _update_seconds(unit: Unit, device: torch.device) -> float:
    """Seconds of one step's per-parameter work on a copy of the unit's parameters: fused AdamW,
    the clipping norm and the AutoFreeze gradient sum."""
    params = [nn.Parameter(p.detach().to(device).clone()) for p in unit.module.parameters()]
    if not params:
        return 0.0
    grads = [torch.full_like(p, 1e-3) for p in params]
    for p, g in zip(params, grads):
        p.grad = g
    sums = [torch.zeros_like(p) for p in params]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)

    def step():
        torch._foreach_norm(grads)
        torch._foreach_add_(sums, grads)
        opt.step()
    return best_seconds(step, device)


def _load(cfg: Config) -> tuple[StagedModel, list[int], int]:
    """The model, the batch sizes to time (a quarter of the batch and the batch: the sizes
    of micro-batches and of whole replica batches) and the rows' side (tokens or pixels)."""
    facts = describe_data(cfg.data.data)
    model = load_model(cfg.model.model, len(facts.label_names), cfg.train.seed, facts.label_names, facts.task)
    batch = cfg.train.batch_size
    side = cfg.model.max_length if model.modality == "text" else cfg.data.image_size
    return model, sorted({max(1, batch // 4), batch}), side


def measure(cfg: Config, processes: int = 1) -> Profile:
    """A profile of cfg's model on this machine (its first GPU, else the CPU), with the
    machine's load average before it started. Says on stderr when the timing starts."""
    load = os.getloadavg()[0]
    peers: list[subprocess.Popen] = []
    config_file = None
    try:
        if processes > 1 and not torch.cuda.is_available():
            threads = threads_per_process(usable_cores(), processes)
            torch.set_num_threads(threads)
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"pipetransformer-{os.getpid()}-",
                                             delete=False) as f:
                config_file = f.name
                yaml.safe_dump(cfg.to_dict(), f)
            env = {**os.environ, "OMP_NUM_THREADS": str(threads), BUSY_PARENT: str(os.getpid())}
            for _ in range(processes - 1):
                peers.append(subprocess.Popen([sys.executable, "-m", "pipetransformer", "profile", "--config",
                                               config_file, "--busy"], stdout=subprocess.PIPE, text=True, env=env))
        model, sizes, side = _load(cfg)
        for peer in peers:  # time only once every copy trains
            if peer.stdout is None or peer.stdout.readline().strip() != "ready":
                raise RuntimeError("a co-running profile process failed to start")
        if config_file:  # every copy has read it
            os.unlink(config_file)
            config_file = None
        print(f"timing {len(model.units)} units at batch sizes {', '.join(map(str, sizes))}"
              + (f" beside {len(peers)} busy copies" if peers else ""), file=sys.stderr, flush=True)
        profile = measure_profile(model, cfg.model.model, sizes, side, device_for(0))
    finally:
        try:
            end_children(peers, grace_seconds=10)
        finally:
            if config_file:
                os.unlink(config_file)
    return dataclasses.replace(profile, load_average=load, processes=processes, cores=usable_cores())


def keep_busy(cfg: Config) -> None:
    """A co-running copy: train the whole model on the largest batch until stopped, or until
    the profile that started it is gone (killed: nothing else would stop this copy)."""
    parent = int(os.environ.get(BUSY_PARENT, "0"))

    def orphaned() -> bool:
        return os.getppid() != parent
    if orphaned():
        return
    model, sizes, side = _load(cfg)
    inputs = synthetic_inputs(model, sizes[-1], side)
    model.hf_model.train()
    try:
        print("ready", flush=True)
    except BrokenPipeError:  # the parent died while this copy loaded
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the line still buffered goes nowhere
        return
    while not orphaned():
        model.forward(*inputs).float().sum().backward()
