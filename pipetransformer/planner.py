"""The planner: what a run would do, and how long it would take, on devices you may not have.

`simulate(profile, hardware, config, samples)` replays a run epoch by epoch with the trainer's
own pure rules: AutoFreeze's `decide` (or a given trace of frozen blocks), AutoPipe's
`layouts.next_plan` for stages, bounds and replicas, AutoCache's policy for the cache,
and prices each epoch from a per-unit profile measured on one device (`costs.Profile`, written
by `pipetransformer profile`) and a description of the target devices (`costs.Hardware`). `predict`
adds the two baselines: a1, the run's starting pipeline kept fixed without freezing (GPipe),
and a2, plain data parallelism without freezing.

One training step of a layout with K stages x D replicas, replica batch b, M micro-batches
of b/M rows, is priced as

  prefix     the frozen blocks' forward on stage 0 (b rows, no grad), or reading their
             cached outputs
  pipeline   sum_s t_s + (M-1) max_s t_s, forward and backward phases apart, t_s = a stage's
             time for one micro-batch plus sending its output on (exact for identical
             micro-batches through K stages; the idle part is the bubble)
  all-reduce the active gradients of the slowest stage over its D replicas (ring)
  update     AdamW and the gradient bookkeeping of the slowest stage
  wait       CPU processes sharing too few cores (`Hardware.cores`): each part above is
             priced at the speed of a process alone, and slowed by how many processes
             compute at once (a stage idle in the bubble frees its core for the others)

The profile's times are first divided by the slowdown its own co-running processes caused
(`Profile.sharing`: `profile --processes N` on the machine's cores) to get a process alone.

and an epoch is samples // global batch such steps (evaluation is not included: the trainer's
`epoch_seconds` leaves it out too). Unit times are linear in the rows (a fixed part per call
and a part per row, fitted through the profiled batch sizes), divided by the devices' speed
relative to the profiled one, plus the target's own cost per call (kernel launches on a GPU).
The simulation is arithmetic on numbers and calls no torch (importing `transition` loads
it; `costs` holds the data without it).
"""
from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from .autocache.policy import host_budget, should_cache, tier_name, tier_rows
from .autofreeze import FreezePolicy, FreezeState, decide
from .autopipe import divisors
from .config import Config, RunFacts, apply_overrides
from .costs import GB, Hardware, Profile, UnitProfile
from .errors import ConfigError
from .layouts import PlanInputs, TransitionPlan, next_plan, plan

__all__ = ["EpochPlan", "Prediction", "assumed_trace", "start_stages", "micro_batch_rule", "simulate", "predict",
           "format_prediction"]


@dataclass(frozen=True)
class EpochPlan:
    """One epoch as the planner sees it. `seconds` is the training time of the epoch (the
    parts below add up to it); `transition_seconds` is the change of layout after it."""
    epoch: int
    frozen_layers: int
    stages: int
    replicas: int
    micro_batches: int
    cache: str                  # off, fill (the prefix runs and is stored) or read
    cache_tier: str             # off, device, host, host+disk, ...
    seconds: float
    compute_seconds: float      # the busiest stage's forward and backward
    bubble_seconds: float       # that stage idle while the pipeline fills and drains
    p2p_seconds: float          # activations and gradients between stages
    prefix_seconds: float       # frozen blocks, or reading their cached outputs
    allreduce_seconds: float
    update_seconds: float
    wait_seconds: float         # for a core shared with other processes (CPU, more processes than cores)
    transition_seconds: float
    peak_memory_gb: float       # the fullest device: weights, gradients, Adam state, activations
    fits: bool                  # within Hardware.memory_gb (always True when that is 0)


@dataclass(frozen=True)
class Prediction:
    epochs: tuple[EpochPlan, ...]
    a1: tuple[EpochPlan, ...]   # the starting layout, fixed, no freezing, no cache
    a2: tuple[EpochPlan, ...]   # one stage, every device a replica, no freezing

    @staticmethod
    def total(epochs: Sequence[EpochPlan]) -> float:
        return sum(e.seconds + e.transition_seconds for e in epochs)

    @property
    def total_seconds(self) -> float:
        return self.total(self.epochs)

    @property
    def speedup_over_a1(self) -> float:
        return self.total(self.a1) / self.total_seconds

    @property
    def speedup_over_a2(self) -> float:
        return self.total(self.a2) / self.total_seconds

    def to_dict(self) -> dict:
        return {"epochs": [dataclasses.asdict(e) for e in self.epochs], "total_seconds": self.total_seconds,
                "a1_seconds": self.total(self.a1), "a2_seconds": self.total(self.a2),
                "speedup_over_a1": self.speedup_over_a1, "speedup_over_a2": self.speedup_over_a2,
                "a1_epochs": [dataclasses.asdict(e) for e in self.a1],
                "a2_epochs": [dataclasses.asdict(e) for e in self.a2]}


def _linear(batch_sizes: Sequence[int], seconds: Sequence[float], rows: float) -> float:
    """Seconds for `rows` rows: a line through the smallest and largest profiled batch, a
    fixed part per call plus a part per row, neither below zero (an embedding's backward, a
    dense table gradient, costs the same for any batch); proportional from a single batch."""
    if len(batch_sizes) == 1 or batch_sizes[-1] == batch_sizes[0]:
        return seconds[-1] * rows / batch_sizes[-1]
    per_row = max(0.0, (seconds[-1] - seconds[0]) / (batch_sizes[-1] - batch_sizes[0]))
    return max(0.0, seconds[0] - per_row * batch_sizes[0]) + per_row * rows


def assumed_trace(num_blocks: int, epochs: int, mode: str, alpha: float, rule: str) -> list[int]:
    """Frozen blocks during each epoch, by the trainer's rule, assuming the gradient term
    never binds below the cap (the top block has the smallest norm): the cap's pace."""
    state, trace = FreezeState(num_blocks), [0]
    norms = [float(num_blocks - i) for i in range(num_blocks)]
    for _ in range(epochs - 1):
        trace.append(decide(state, alpha, mode, norms if mode == "adaptive" else None, FreezePolicy(rule=rule)))
    return trace


class _Pricer:
    """Prices steps, epochs and transitions of one run on given devices."""

    def __init__(self, profile: Profile, hardware: Hardware, cfg: Config, samples: int):
        self.p, self.d, self.cfg, self.samples = profile, hardware, cfg, samples
        # activations as the target stores them: bf16 on a GPU (autocast, cache), else as profiled
        self.act_scale = 0.5 if hardware.gpu and profile.dtype == "float32" else 1.0
        self.sizes = profile.batch_sizes
        self.call = hardware.call_overhead_us * 1e-6
        self.speed = hardware.speed * profile.sharing  # a process alone, cores to itself

    def fwd(self, units: Sequence[UnitProfile], rows: float) -> float:
        return sum(_linear(self.sizes, u.forward_seconds, rows) / self.speed + self.call for u in units)

    def bwd(self, units: Sequence[UnitProfile], rows: float) -> float:
        return sum(_linear(self.sizes, u.backward_seconds, rows) / self.speed + self.call for u in units)

    def split(self, tp: TransitionPlan) -> tuple[list[UnitProfile], list[list[UnitProfile]]]:
        frozen = [u for u in self.p.units if u.freeze_index < tp.frozen]
        active = [u for u in self.p.units if u.freeze_index >= tp.frozen]
        return frozen, [active[a:b] for a, b in zip(tp.bounds, tp.bounds[1:])]

    def cache_row_bytes(self, frozen: Sequence[UnitProfile]) -> float:
        return frozen[-1].output_bytes * self.act_scale

    def step(self, tp: TransitionPlan, m: int, cache: str) -> dict[str, float]:
        """Seconds of one training step by part (see the module docstring)."""
        d, layout, b = self.d, tp.layout, tp.replica_batch
        k, reps = layout.stages, layout.replicas
        frozen, stages = self.split(tp)
        rows = b / m
        crosses = [any(d.node(layout.rank(r, s)) != d.node(layout.rank(r, s + 1)) for r in range(reps))
                   for s in range(k - 1)]
        hop = [d.message(st[-1].output_bytes * self.act_scale * rows, c) for st, c in zip(stages, crosses)]
        fwd = [self.fwd(st, rows) for st in stages]
        bwd = [self.bwd(st, rows) for st in stages]
        f_hop = [f + (hop[s] if s < k - 1 else 0.0) for s, f in enumerate(fwd)]
        b_hop = [x + (hop[s - 1] if s else 0.0) for s, x in enumerate(bwd)]

        def pipeline(f: list[float], g: list[float]) -> float:
            return sum(f) + (m - 1) * max(f) + sum(g) + (m - 1) * max(g)
        busy = m * max(f + g for f, g in zip(fwd, bwd))
        no_comm = pipeline(fwd, bwd)
        prefix = 0.0
        if frozen:
            moved = d.latency_us * 1e-6 + b * self.cache_row_bytes(frozen) / (d.host_gb_s * GB)
            prefix = {"read": moved, "fill": self.fwd(frozen, b) + moved}.get(cache, self.fwd(frozen, b))
        across_replicas = [len({d.node(layout.rank(r, s)) for r in range(reps)}) > 1 for s in range(k)]
        allreduce = max(d.all_reduce(sum(u.param_bytes for u in st), reps, a)
                        for st, a in zip(stages, across_replicas))
        update = max(sum(u.update_seconds for u in st) for st in stages) / self.speed
        # processes sharing cores: each phase slowed by how many of them compute at once on the
        # busiest machine (in a pipeline's slot j the stages s with 0 <= j - s < m, every
        # replica alike; the prefix on stage 0 alone; the update everywhere)
        def slowdown(stages_busy: Sequence[int]) -> float:
            per_node = Counter(d.node(layout.rank(r, s)) for r in range(reps) for s in stages_busy)
            return d.slowdown(max(per_node.values()))
        slots = [slowdown([s for s in range(k) if 0 <= j - s < m]) for j in range(m + k - 1)]
        wait = ((sum(slots) / len(slots) - 1) * pipeline(f_hop, b_hop) + (slowdown([0]) - 1) * prefix
                + (slowdown(range(k)) - 1) * update)
        return {"compute_seconds": busy, "bubble_seconds": no_comm - busy,
                "p2p_seconds": pipeline(f_hop, b_hop) - no_comm, "prefix_seconds": prefix,
                "allreduce_seconds": allreduce, "update_seconds": update, "wait_seconds": wait}

    def micro_batches(self, tp: TransitionPlan, cache: str, choose: bool) -> int:
        """--micro-batches when given; with `choose` (the trainer's auto) the M >= K dividing
        the replica batch whose step this model prices fastest (1 for one stage: splitting
        only shrinks kernels); else the plan's own (autopipe.choose_microbatches)."""
        if not choose or self.cfg.parallel.micro_batches:
            return tp.micro_batches
        b, k = tp.replica_batch, tp.layout.stages
        if k == 1:
            return 1
        candidates = [m for m in range(k, b + 1) if b % m == 0]
        return min(candidates, key=lambda m: (sum(self.step(tp, m, cache).values()), m))

    def peak_memory(self, tp: TransitionPlan, m: int, cache_bytes: float) -> float:
        frozen, stages = self.split(tp)
        rows_alive = tp.replica_batch if self.cfg.parallel.schedule == "gpipe" else \
            min(m, tp.layout.stages) * tp.replica_batch / m
        peaks = []
        for s, st in enumerate(stages):
            weights = 4 * sum(u.param_bytes for u in st)  # weights, gradients, two Adam moments
            acts = rows_alive * self.act_scale * sum(u.saved_bytes for u in st)
            extra = sum(u.param_bytes for u in frozen) + cache_bytes if s == 0 else 0.0
            peaks.append(weights + acts + extra)
        return max(peaks)

    def cache_plan(self, frozen_units: Sequence[UnitProfile]) -> tuple[bool, str, float]:
        """(keep the cache, its tier, bytes on the device) when it opens at this frozen
        prefix, by AutoCache's own rules (auto: reading a batch beats recomputing it)."""
        cc, d, t = self.cfg.cache, self.d, self.cfg.train
        row = self.cache_row_bytes(frozen_units)
        probe = min(self.samples, t.batch_size)
        device_budget = int(cc.cache_device_fraction * d.memory_gb * GB) if d.gpu and d.devices == 1 else 0
        host = host_budget(cc.cache_host_bytes, cc.cache_host_fraction, int(d.host_memory_gb * GB))
        tiers = tier_rows(self.samples, max(1, int(row)), device_budget, host)
        read = d.latency_us * 1e-6 + probe * row / (self.read_gb_s(tiers) * GB)
        keep = cc.cache == "on" or should_cache(self.fwd(frozen_units, probe), read)
        on_device = sum(stop - start for tier, start, stop in tiers if tier == "device") * row
        return keep, tier_name(tiers), on_device

    def read_gb_s(self, tiers: list[tuple[str, int, int]]) -> float:
        """Bandwidth of reading every row once, the slowest tier weighing most."""
        # device memory: taken as 100x host memory, no read from it is ever the slow part
        rate = {"device": 100 * self.d.host_gb_s, "host": self.d.host_gb_s, "disk": self.d.disk_gb_s}
        seconds = sum((stop - start) / rate[tier] for tier, start, stop in tiers)
        return self.samples / seconds

    def transition(self, old: TransitionPlan, new: TransitionPlan, cache_event: str) -> float:
        """Weights (with Adam moments where the unit stays active) broadcast from their
        owners, the rebuild, and the cache: probed when it opens, advanced through the newly
        frozen blocks (each process of a machine converts its share of the rows)."""
        d = self.d
        across = d.devices > d.node_size
        sent = [u.param_bytes * (3 if u.freeze_index >= new.frozen else 1)
                for u in self.p.units if u.freeze_index >= old.frozen]
        hops = math.ceil(math.log2(d.devices)) if d.devices > 1 else 0
        seconds = sum(hops * d.message(nb, across) for nb in sent) + d.rebuild_seconds
        probe = min(self.samples, self.cfg.train.batch_size)
        if cache_event == "open":
            frozen, _ = self.split(new)
            seconds += 5 * self.fwd(frozen, probe)  # one output, best of 3 timed, the probe rows filled
        elif cache_event == "advance":
            newly = [u for u in self.p.units if old.frozen <= u.freeze_index < new.frozen]
            rows = math.ceil(self.samples / min(d.devices, d.node_size))
            batches = math.ceil(rows / self.cfg.train.batch_size)
            moved = 2 * rows * newly[-1].output_bytes * self.act_scale / (d.host_gb_s * GB)  # read, write back
            # every process at once: at the shared speed where CPU processes outnumber the cores
            seconds += batches * self.fwd(newly, self.cfg.train.batch_size) * d.oversubscription + moved
        return seconds


def _inputs(profile: Profile, hardware: Hardware, cfg: Config, stages: int) -> PlanInputs:
    pc = cfg.parallel
    return PlanInputs(profile.unit_costs(pc.balance == "time"), hardware.devices, stages, pc.elastic,
                      cfg.train.batch_size, pc.batch_policy, pc.micro_batches)


def start_stages(profile: Profile, hardware: Hardware, cfg: Config, samples: int) -> tuple[int, str]:
    """The stages a run starts with, and why: --stages K; or (auto) of the starting layouts the
    config allows, the one whose first step this model prices fastest per sample (its own
    auto micro-batches) among those whose fullest device fits `hardware.memory_gb`; when none
    fits, the one that needs the least memory."""
    facts = RunFacts(profile.modality, profile.modality, len(profile.units), samples)
    choices = cfg.start_stage_choices(hardware.devices, facts)
    if cfg.parallel.stages:  # a number, or all
        return choices[0], "--stages"
    pricer = _Pricer(profile, hardware, cfg, samples)
    priced = []
    for k in choices:
        tp = plan(_inputs(profile, hardware, cfg, k), 0, k)
        m = pricer.micro_batches(tp, "off", True)
        per_sample = sum(pricer.step(tp, m, "off").values()) / (tp.replica_batch * tp.layout.replicas)
        priced.append((k, tp.layout.replicas, per_sample, pricer.peak_memory(tp, m, 0.0)))
    limit = hardware.memory_gb * GB
    fits = [p for p in priced if not limit or p[3] <= limit]
    prices = ", ".join(f"{k}x{r} {1e3 * t:.3g} ms" for k, r, t, _ in priced)
    if not fits:
        k, r, _, memory = min(priced, key=lambda p: p[3])
        return k, (f"no layout fits {hardware.memory_gb:g} GB a device; {k}x{r} needs the least "
                   f"({memory / GB:.2f} GB)")
    k = min(fits, key=lambda p: (p[2], p[0]))[0]
    left_out = "" if len(fits) == len(priced) else f"; {len(priced) - len(fits)} over {hardware.memory_gb:g} GB"
    return k, f"fastest priced per sample ({prices}{left_out})"


def micro_batch_rule(profile: Profile, hardware: Hardware, cfg: Config, samples: int):
    """The trainer's --micro-batches auto: a plan's M as `simulate` chooses it."""
    pricer = _Pricer(profile, hardware, cfg, samples)
    return lambda tp: pricer.micro_batches(tp, "off", True)


def simulate(profile: Profile, hardware: Hardware, cfg: Config, samples: int, trace: Sequence[int] | None = None,
             choose_micro_batches: bool = True) -> tuple[EpochPlan, ...]:
    """The run `cfg` on `hardware`, epoch by epoch (see the module docstring). `trace` gives
    the frozen blocks of each epoch (else `assumed_trace`); with `choose_micro_batches` the
    planner picks each layout's M, else it takes the trainer's."""
    t, fc = cfg.train, cfg.freeze
    trace = list(trace) if trace is not None else assumed_trace(profile.num_blocks, t.epochs, fc.freeze,
                                                                fc.alpha, fc.freeze_rule)
    if len(trace) != t.epochs or any(b < a for a, b in zip(trace, trace[1:])) or \
            not 0 <= trace[0] <= trace[-1] <= profile.num_blocks:
        raise ConfigError(f"--trace={','.join(map(str, trace))!r} is invalid: give {t.epochs} frozen "
                          f"counts (one per epoch, 0 to {profile.num_blocks}) that never decrease")
    pricer = _Pricer(profile, hardware, cfg, samples)
    inputs = _inputs(profile, hardware, cfg, start_stages(profile, hardware, cfg, samples)[0])
    current = plan(inputs, trace[0], inputs.start_stages)
    cache, tier, cache_on_device = "off", "off", 0.0  # cache: off, fill or read during the epoch
    epochs = []
    for epoch in range(len(trace)):
        m = pricer.micro_batches(current, cache, choose_micro_batches)
        parts = {name: samples // (current.replica_batch * current.layout.replicas) * value
                 for name, value in pricer.step(current, m, cache).items()}
        memory = pricer.peak_memory(current, m, cache_on_device)
        after, next_cache, transition = current, "read" if cache == "fill" else cache, 0.0
        if epoch + 1 < len(trace):
            after = next_plan(inputs, current, trace[epoch + 1])
        if (after.frozen, after.layout) != (current.frozen, current.layout):  # as Trainer.fit
            event = ""
            if after.frozen > current.frozen and cfg.cache.cache != "off":
                if cache == "off":  # AutoCache opens (auto: probes) at each freeze until kept
                    keep, tier, cache_on_device = pricer.cache_plan(pricer.split(after)[0])
                    event, next_cache = "open", "fill" if keep else "off"
                else:
                    event, next_cache = "advance", "read"
            transition = pricer.transition(current, after, event)
        epochs.append(EpochPlan(epoch + 1, current.frozen, current.layout.stages, current.layout.replicas, m,
                                cache, tier if cache != "off" else "off", sum(parts.values()),
                                transition_seconds=transition, peak_memory_gb=memory / GB,
                                fits=not hardware.memory_gb or memory <= hardware.memory_gb * GB, **parts))
        current, cache = after, next_cache
    return tuple(epochs)


def predict(profile: Profile, hardware: Hardware, cfg: Config, samples: int, trace: Sequence[int] | None = None,
            choose_micro_batches: bool = True) -> Prediction:
    """The run, and the baselines a1 (the paper's: one pipeline over every device, fixed,
    nothing frozen) and a2
    (one stage, every device a replica, nothing frozen) with the same data and batch."""
    def run(overrides: dict, trace: Sequence[int] | None) -> tuple[EpochPlan, ...]:
        return simulate(profile, hardware, apply_overrides(cfg, overrides), samples, trace, choose_micro_batches)
    off = {"freeze": "off", "cache": "off"}
    paper_start = max(k for k in divisors(hardware.devices) if k <= len(profile.units))  # one pipeline over all
    return Prediction(run({}, trace), run({**off, "elastic": False, "stages": paper_start}, None),
                      run({**off, "stages": 1}, None))


def format_prediction(pred: Prediction, title: str) -> str:
    """The table `pipetransformer plan` prints for people."""
    lines = [title, f"{'epoch':>5} {'frozen':>6} {'layout':>7} {'M':>3} {'cache':>11} {'seconds':>9} "
             f"{'compute':>8} {'bubble':>7} {'p2p':>6} {'prefix':>7} {'allred':>7} {'update':>7} {'wait':>6} "
             f"{'trans':>6} {'mem GB':>7}"]
    for e in pred.epochs:
        cache = e.cache if e.cache == "off" else f"{e.cache}/{e.cache_tier}"
        lines.append(f"{e.epoch:>5} {e.frozen_layers:>6} {f'{e.stages}x{e.replicas}':>7} {e.micro_batches:>3} "
                     f"{cache:>11} {e.seconds:>9.2f} {e.compute_seconds:>8.2f} {e.bubble_seconds:>7.2f} "
                     f"{e.p2p_seconds:>6.2f} {e.prefix_seconds:>7.2f} {e.allreduce_seconds:>7.2f} "
                     f"{e.update_seconds:>7.2f} {e.wait_seconds:>6.2f} {e.transition_seconds:>6.2f} "
                     f"{e.peak_memory_gb:>6.2f}{'' if e.fits else '!'}")
    a1, a2 = pred.a1[0], pred.a2[0]
    lines.append(f"total {pred.total_seconds:.1f} s; a1 ({a1.stages}x{a1.replicas} fixed, no freezing) "
                 f"{Prediction.total(pred.a1):.1f} s -> {pred.speedup_over_a1:.2f}x; a2 ({a2.stages}x{a2.replicas} "
                 f"data parallel, no freezing) {Prediction.total(pred.a2):.1f} s -> {pred.speedup_over_a2:.2f}x")
    if not all(e.fits for e in (*pred.epochs, *pred.a1, *pred.a2)):
        lines.append("! a device's memory is exceeded in some epoch (see the JSON's peak_memory_gb)")
    return "\n".join(lines)
