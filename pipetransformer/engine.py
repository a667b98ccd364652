"""The Trainer wires the four components; one epoch, on every process:

  read the layout -> load this replica's batch (or its cached frozen output) -> frozen prefix
  under no_grad (first stage) -> pipeline schedule over the active stages -> average active
  gradients over replicas -> accumulate gradients (AutoFreeze) -> clip -> optimizer step
  -> at the boundary: evaluate, decide (AutoFreeze), plan (AutoPipe, AutoDP), apply
  (migrate, rebuild, advance AutoCache), log.

A single process is the layout "1 stage x 1 replica" of the same code.
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from . import checkpoint, distributed, transition
from .autocache.cache import AutoCache
from .autodp import Layout, dropout_seed, lr_scale, ramped, replica_rows
from .autodp.groups import Topology, average_gradients
from .autofreeze import FreezeState, interval_alpha
from .autopipe import next_stage_count
from .config import AUTO, Config, RunFacts, apply_overrides
from .costs import local_hardware
from .data.augment import crop_flip
from .data.dataset import Dataset
from .data.load import load_data
from .data.loader import StepLoader, loader_workers
from .data.sampler import BatchSampler
from .data.sources import describe_data
from .freeze_stats import BlockMeter, decide_across_world
from .layouts import PlanInputs, TransitionPlan, next_plan, plan
from .models.base import StagedModel
from .models.loading import load_model
from .passes import Passes
from .planner import micro_batch_rule, start_stages
from .profiling import run_profile
from .recorder import Recorder
from .runtime import RuntimeEnv, build_runtime, clip_grad_norm, unit_costs
from .stopping import raise_if_stopping

__all__ = ["Trainer", "fine_tune", "freeze_to", "lr_factor"]


def lr_factor(progress: float, warmup_ratio: float) -> float:
    """Linear warm-up over the first `warmup_ratio` of training, then linear decay to 0."""
    if progress < warmup_ratio:
        return progress / warmup_ratio
    return max(0.0, (1 - progress) / (1 - warmup_ratio))


@dataclasses.dataclass
class LRSchedule:
    """The learning rate at a point of the run: lr_factor's warm-up and decay over every
    sample, times the batch policy's factor in the layout (autodp.lr_scale), reached over
    --lr-ramp-steps steps from where it stood at the last change (autodp.ramped)."""
    cfg: Config
    start: Layout
    total_samples: int
    ramp: tuple[float, int] = (1.0, 0)  # the scale a ramp starts from, and samples seen then

    def scale(self, plan: TransitionPlan, samples_seen: int) -> float:
        pc, layout = self.cfg.parallel, plan.layout
        target = lr_scale(layout, pc.batch_policy, self.start, pc.lr_scaling)
        start, since = self.ramp
        steps = (samples_seen - since) // (plan.replica_batch * layout.replicas)
        return ramped(start, target, steps, pc.lr_ramp_steps)

    def at(self, plan: TransitionPlan, samples_seen: int) -> float:
        t = self.cfg.train
        progress = samples_seen / max(1, self.total_samples)
        return t.lr * lr_factor(progress, t.warmup_ratio) * self.scale(plan, samples_seen)


class Trainer:
    """Fine-tunes a StagedModel with AutoFreeze, AutoPipe, AutoDP and AutoCache."""

    def __init__(self, config: Config, model: StagedModel | None = None,
                 data: tuple[Dataset, Dataset] | None = None,
                 progress: bool = True, resume: bool = False):
        """`resume`: continue the run in `config.run_dir` from its newest checkpoint (or from
        the start if it has none)."""
        cfg = self.cfg = config
        self.rank, self.world, self.device = distributed.init(cfg.parallel.comm_timeout)
        self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        torch.manual_seed(cfg.train.seed)
        model_config = None if model is None else model.hf_model.config.to_dict()  # not what --model names
        if model is None:
            described = describe_data(cfg.data.data)
            model = load_model(cfg.model.model, len(described.label_names), cfg.train.seed, described.label_names,
                               described.task)
        self.model = model
        if not cfg.train.dropout:
            _disable_dropout(model.hf_model)
        data_cache = Path(cfg.run_dir) / "data-cache"
        self.train_data, self.val_data = data or load_data(cfg.data, model, cfg.model.max_length, cfg.train.seed,
                                                           data_cache)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", self.world))
        self.loader = StepLoader(loader_workers(cfg.data.loader_workers, model.modality, local_processes),
                                 self.device)
        # the same checks the launcher made, now on the model and data actually loaded
        fixed_size = model.modality == "image" and model.hf_model.config.model_type != "dinov2"
        image_size = getattr(model.hf_model.config, "image_size", None) if fixed_size else None
        facts = RunFacts(model.modality, model.modality, len(model.units), len(self.train_data),
                          image_size=image_size, task=model.task)
        cfg.validate(self.world, facts)
        self.recorder = Recorder(cfg, self.rank, progress)
        self.policy = cfg.freeze.policy()
        self.freeze, self.meter = FreezeState(model.num_blocks), BlockMeter(model.num_blocks, self.policy.statistic)
        self.sampler = BatchSampler(len(self.train_data), cfg.train.seed)
        pc, t = cfg.parallel, cfg.train
        self.plans = _plan_inputs(cfg, model, self.world, facts, resume, self.device, self.recorder.log)
        self.env = RuntimeEnv(model, Topology(self.world, self.rank), self.device, self.comm_device,
                              t.lr, t.weight_decay, pc.schedule, t.dropout, pc.compile)
        self.cache = AutoCache(cfg.cache, cfg.data.augment, model, self.train_data, self.device,
                               self.recorder.run_dir, t.batch_size, self.recorder.log)
        self.passes = Passes(model, self.cache, self.device, self.comm_device, self.loader, t.dropout)
        self.samples_seen, self.records = 0, list[dict]()
        self.lr = LRSchedule(cfg, self.plans.start, t.epochs * self.sampler.steps(t.batch_size) * t.batch_size)
        given = None if data is None else f"in memory: {len(self.train_data)} train / {len(self.val_data)} val rows"
        self.fingerprint = checkpoint.fingerprint(cfg, self.train_data.label_names, model.num_blocks, model.task,
                                                  data_cache, model_config, given)
        self.epoch, self.first_step, self.partial = 0, 0, dict[str, Any]()
        self.resumed, found = resume, checkpoint.latest(self.recorder.run_dir) if resume else None
        if found is None:
            if resume:  # the launcher refused this if epochs were done: nothing is lost
                self.recorder.log(f"no checkpoint in {self.recorder.run_dir / 'checkpoints'} yet: starting "
                                  f"from the beginning")
            self.rt = build_runtime(plan(self.plans, 0, self.plans.start_stages), self.env, {})
        else:
            try:
                self._resume(found)
            except BaseException:  # the cache may have opened: its files go (no Trainer to close)
                self.cache.close()
                raise

    def _resume(self, path) -> None:
        """Continue from checkpoint `path`: freeze state, layout (re-planned for this number of
        processes), weights, Adam state, gradient sums, position, metrics; the cache refills."""
        snap = checkpoint.read_manifest(path)
        checkpoint.check_fingerprint(path, snap.fingerprint, self.fingerprint)
        self.freeze.load_state_dict(snap.freeze)
        frozen, p = self.freeze.frozen, self.plans
        stages = snap.stages if snap.world == self.world else next_stage_count(
            p.units, frozen, p.start_stages, self.world, p.budget, p.elastic)
        self.rt = build_runtime(plan(p, frozen, stages), self.env, {})
        checkpoint.restore(path, self.model, self.rt, self.meter, snap.world == self.world)
        self.samples_seen, self.records, self.lr.ramp = snap.samples_seen, snap.records, snap.lr_ramp
        self.epoch, self.first_step, self.partial = snap.epoch, snap.step, snap.partial
        self.cache.on_freeze(0, frozen, self.rt)
        self.recorder.log(f"resumed from {path} (epoch {snap.epoch + 1}, step {snap.step}) on "
                          f"{self.world} process(es), layout {self.rt.layout}")

    def _checkpoint(self, epoch: int, step: int, partial: dict | None = None) -> None:
        """Save where training stands: the next step to run is (epoch, step). Collective."""
        if not self.cfg.checkpoint.keep_checkpoints:
            return
        snap = checkpoint.Snapshot(epoch, step, self.samples_seen, self.freeze.state_dict(), self.records,
                                   partial or {}, self.world, self.rt.layout.stages, self.fingerprint,
                                   self.lr.ramp)
        tensors = checkpoint.owned_tensors(self.model, self.rt, self.meter)
        checkpoint.save(self.recorder.run_dir, tensors, snap, self.cfg.checkpoint.keep_checkpoints)

    # --- the run ---------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        cfg = self.cfg
        self.recorder.start(self.resumed, self.records, [_header(self), self.cache.warning()])
        fit_start = time.perf_counter()
        compile_seconds = self._warm_up()  # this epoch's record carries it
        for epoch in range(self.epoch, cfg.train.epochs):
            self.epoch = epoch
            rec: dict = {"epoch": epoch + 1, **self.train_epoch(epoch)}
            rec.update(self.evaluate())
            decided = list(rec.get("decisions_within", []))  # and the epoch end's: their seconds add up
            every = cfg.freeze.freeze_every
            if epoch + 1 < cfg.train.epochs and (not every or self._global_step() % every == 0):
                decided.append(self._decide(f"after epoch {epoch + 1}", every / rec["steps"] if every else 1.0))
                rec["decision"] = decided[-1]["decision"]
            for key in ("transition_seconds", "cache_seconds", "compile_seconds"):
                rec[key] = sum(d.get(key, 0.0) for d in decided)
            rec["compile_seconds"] += compile_seconds
            compile_seconds = 0.0
            rec["frozen_after"] = self.freeze.frozen
            self.records.append(rec)
            self.recorder.epoch(rec)
            self._checkpoint(epoch + 1, 0)
        transition.broadcast_weights(self.rt, self.env)  # every trained weight to every process; rank 0 saves
        self.recorder.finish(self.model, self.records, time.perf_counter() - fit_start, self.rt.layout)
        dist.barrier()
        return self.records

    def _global_step(self) -> int:
        return self.samples_seen // (self.rt.plan.replica_batch * self.rt.layout.replicas)

    def _decide(self, where: str, epochs: float) -> dict:
        """One AutoFreeze decision over the interval just ended (`epochs` long: its share of
        the alpha cap) and the transition it asks for; the decision and the transition's
        seconds. Collective."""
        fc, p = self.cfg.freeze, self.rt.plan
        frozen = decide_across_world(self.freeze, self.meter, interval_alpha(fc.alpha, epochs), fc.freeze,
                                     self.comm_device, self.policy)
        out: dict = {"decision": self.freeze.last}
        new = next_plan(self.plans, p, frozen)
        if (new.frozen, new.layout) != (p.frozen, p.layout):
            out.update(self._transition(new))
            self.recorder.transition(where, p, new, self.model.num_blocks, out["transition_seconds"])
        return out

    def _transition(self, new: TransitionPlan) -> dict[str, float]:
        """Carry `new` out on this process (collective), each phase timed: move the trained
        weights to their next owners, rebuild the stage, advance the cache, compile."""
        scale = self.lr.scale(self.rt.plan, self.samples_seen)
        start = time.perf_counter()
        opt_state = transition.migrate(self.rt, new.frozen, self.samples_seen > 0, self.env)
        old_frozen, self.rt = self.rt.frozen, build_runtime(new, self.env, opt_state)
        cache_start = time.perf_counter()
        self.cache.on_freeze(old_frozen, new.frozen, self.rt)
        dist.barrier()
        cache_end = time.perf_counter()
        if self.lr.scale(self.rt.plan, self.samples_seen) != scale:  # per-replica: ramp from where it stood
            self.lr.ramp = (scale, self.samples_seen)
        compiled = self._warm_up()
        return {"cache_seconds": cache_end - cache_start, "compile_seconds": compiled,
                "transition_seconds": cache_end - start + compiled}

    def _warm_up(self) -> float:
        """With --compile: compile the new runtime now (Passes.warm_up); seconds spent."""
        if not self.cfg.parallel.compile:
            return 0.0
        return self.passes.warm_up(self.rt, self.train_data, self.val_data, self.recorder.log)

    # --- one epoch -------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training data (from the resumed step on, if any) with the
        decisions --freeze-every puts inside it; the layout it started in, its measurements."""
        every, fe = self.cfg.checkpoint.checkpoint_every, self.cfg.freeze.freeze_every
        first, done = (self.first_step, self.partial) if epoch == self.epoch else (0, {})
        self.first_step, self.partial = 0, {}
        p = self.rt.plan
        head: dict = done.get("start") or {**_layout_fields(p), "total_layers": self.model.num_blocks}
        within: list[dict] = list(done.get("within", []))
        batch_size = p.replica_batch * p.layout.replicas  # an epoch's global batch (fixed: constant policy)
        steps, order = self.sampler.steps(batch_size), self.sampler.epoch_order(epoch)
        bar = self.recorder.bar(steps, f"epoch {epoch + 1}/{self.cfg.train.epochs}", first)
        self.cache.reset_counters()
        nxt = first
        try:
            while nxt < steps:  # one layout's run of steps; a transition inside the epoch starts the next
                rt, losses, start = self.rt, list[torch.Tensor](), time.perf_counter()
                prefetch = rt.is_first and self.cache.active(rt)
                step_rows = [replica_rows(order, s, batch_size, rt.replica, rt.layout.replicas) for s in range(steps)]
                batches = self.loader(self.train_data, step_rows[nxt:])
                for step, (rows, batch) in zip(range(nxt, steps), batches):
                    raise_if_stopping()
                    if prefetch and step + 1 < steps:  # read the next batch's entries during this step
                        self.cache.prefetch(step_rows[step + 1])
                    losses.append(self._train_step(_augment(batch, rows, epoch, self.cfg, len(self.train_data))))
                    self.samples_seen, nxt = self.samples_seen + batch_size, step + 1
                    if bar is not None:
                        bar.update(1)
                        if rt.is_last and (step % 10 == 0 or nxt == steps):  # reading the loss syncs
                            bar.set_postfix(loss=f"{float(losses[-1]):.4f}",
                                            lr=f"{self.lr.at(rt.plan, self.samples_seen):.2e}")
                    decide = fe and nxt < steps and self._global_step() % fe == 0
                    save = every and nxt % every == 0 and nxt < steps
                    if decide or save:  # the epoch so far into `done`
                        done = {**_epoch_stats(done, losses, start, rt.layout.replicas, self.cache,
                                               self.comm_device), "start": head}
                        losses = []
                        self.cache.reset_counters()
                        _refuse_non_finite(done["step_losses"], epoch, steps)  # never decide or save on NaN
                    if decide:  # before the checkpoint: a resume at `nxt` does not decide again
                        decided = self._decide(f"at epoch {epoch + 1}, step {nxt}", fe / steps)
                        within.append({"step": nxt, **decided, **_layout_fields(self.rt.plan)})
                    if save:
                        self._checkpoint(epoch, nxt, {**done, "within": within})
                    start = start if not (decide or save) else time.perf_counter()  # transitions, saves: not training
                    if self.rt is not rt:
                        break
                batches.close()  # its loader workers go now, not when collected
            if self.device.type == "cuda":
                torch.cuda.synchronize()
        finally:
            if bar is not None:
                bar.close()  # also on errors: their line starts on a clean line
        stats = _epoch_stats(done, losses, start, self.rt.layout.replicas, self.cache, self.comm_device)
        seconds, step_losses = stats["seconds"], stats["step_losses"]
        _refuse_non_finite(step_losses, epoch, steps)
        return {**head, "cache_hits": stats["cache_hits"], "cache_bytes": stats["cache_bytes"],
                "cache_tier": stats["cache_tier"],
                "train_loss": float(torch.tensor(step_losses, dtype=torch.float64).mean()),
                "step_losses": step_losses, "epoch_seconds": seconds,
                "samples_per_second": steps * batch_size / seconds, "steps": steps,
                **({"decisions_within": within} if fe else {})}

    def _train_step(self, batch: dict) -> torch.Tensor:
        """One optimizer step; the mean loss as a tensor (reading it would wait for the device)."""
        rt = self.rt
        if self.cfg.train.dropout:  # this process's own stream, replayed by a resume from the position
            torch.manual_seed(dropout_seed(self.cfg.train.seed, self.samples_seen, self.rank))
        _, losses = self.passes.run(rt, batch, train=True)
        average_gradients([p for _, p in rt.params], rt.layout, rt.replica_group)  # sync point
        lr = self.lr.at(rt.plan, self.samples_seen)
        if self.cfg.freeze.freeze == "adaptive":  # only the adaptive mode measures; before clipping
            self.meter.accumulate(rt.meter_params)
            if self.meter.statistic == "update":  # the interval's LRs and steps: the drift's scale
                history = self.freeze.history
                history["lr_sum"], history["steps"] = history.get("lr_sum", 0.0) + lr, history.get("steps", 0) + 1
        clip_grad_norm(rt, self.cfg.train.grad_clip, self.comm_device)
        if rt.optimizer is not None:
            for group in rt.optimizer.param_groups:
                group["lr"] = lr
            rt.optimizer.step()
            rt.optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses).detach().mean() if losses else torch.zeros(())

    def evaluate(self) -> dict:
        """Loss and accuracy (question answering: exact match and F1) over the whole validation
        set, in the current layout."""
        return self.passes.evaluate(self.rt, self.val_data)

    def close(self) -> None:
        self.cache.close()
        self.env.topo.destroy()


def _plan_inputs(cfg: Config, model: StagedModel, world: int, facts: RunFacts, resumed: bool, device,
                 log) -> PlanInputs:
    """The run's fixed planning facts: --stages and --micro-batches as given, or (auto) what the
    planner's cost model prices fastest (planner.start_stages, planner.micro_batch_rule) on the
    units timed here at the start (profiling.run_profile), which --balance time also reads."""
    pc, t = cfg.parallel, cfg.train
    choices = cfg.start_stage_choices(world, facts)
    auto_micro_batches = not pc.micro_batches and max(choices) > 1
    inputs = PlanInputs(unit_costs(model), world, choices[0], pc.elastic, t.batch_size, pc.batch_policy,
                        pc.micro_batches)
    if len(choices) == 1 and not auto_micro_batches and pc.balance != "time":
        return inputs
    rows = t.batch_size * max(choices) // world  # the largest replica batch a starting layout has
    profile = run_profile(model, cfg, rows, device, resumed, log)
    hardware = local_hardware(profile, world)
    if pc.nnodes > 1:
        hardware = dataclasses.replace(hardware, per_node=int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    stages, why = start_stages(profile, hardware, cfg, facts.train_rows)
    if pc.stages == AUTO:
        log(f"--stages auto: {stages} stage(s) x {world // stages} replica(s), {why}")
    rule = micro_batch_rule(profile, hardware, cfg, facts.train_rows) if auto_micro_batches else None
    return dataclasses.replace(inputs, units=profile.unit_costs(pc.balance == "time"), start_stages=stages,
                               choose_micro_batches=rule)


def _header(t: Trainer) -> str:
    return (f"pipetransformer: {len(t.train_data)} train / {len(t.val_data)} val samples, {t.model.num_blocks} "
            f"blocks, {t.world} process(es), device {t.device.type}, layout {t.rt.layout} "
            f"({t.rt.plan.units_per_stage()} units per stage), freeze={t.cfg.freeze.freeze} "
            f"alpha={t.cfg.freeze.alpha:.3g}" + (f", decisions every {t.cfg.freeze.freeze_every} steps"
                                                 if t.cfg.freeze.freeze_every else ""))


def freeze_to(trainer: Trainer, frozen: int) -> float:
    """Freeze by hand (benchmarks) along AutoFreeze's path; the transition's seconds."""
    if not trainer.rt.frozen <= frozen <= trainer.model.num_blocks:
        raise ValueError(f"frozen={frozen}: must lie in [{trainer.rt.frozen}, {trainer.model.num_blocks}] "
                         f"(frozen blocks never thaw)")
    trainer.freeze.frozen = frozen
    trainer.meter.reset()  # the interval ends here, as at a decision: sums follow the old layout's shares
    return trainer._transition(next_plan(trainer.plans, trainer.rt.plan, frozen))["transition_seconds"]


def _layout_fields(p: TransitionPlan) -> dict:
    return {"frozen_layers": p.frozen, "stages": p.layout.stages, "replicas": p.layout.replicas,
            "micro_batches": p.micro_batches}


def _epoch_stats(done: dict, losses: list[torch.Tensor], start: float, replicas: int, cache: AutoCache,
                 comm_device: torch.device) -> dict:
    """The epoch so far, over every process (collective): per-step losses (averaged over the
    global batch; only last stages hold losses, so a sum over the world is one over replicas),
    seconds and cache hits, added to what the epoch had `done` before (a resume, a layout)."""
    local = torch.stack(losses).double().cpu() if losses else torch.zeros(0, dtype=torch.float64)
    step_losses = distributed.sum_over_world(local, comm_device) / replicas  # one copy from the device
    stats = cache.stats()
    hits = distributed.sum_over_world(torch.tensor([float(stats["cache_hits"])]), comm_device)
    return {**stats, "step_losses": done.get("step_losses", []) + step_losses.tolist(),
            "seconds": done.get("seconds", 0.0) + time.perf_counter() - start,
            "cache_hits": done.get("cache_hits", 0) + int(hits[0])}


def _augment(batch: dict, rows: torch.Tensor, epoch: int, cfg: Config, samples: int) -> dict:
    if cfg.data.augment == "crop-flip":  # on the device, drawn by (seed, epoch, row)
        batch["pixel_values"] = crop_flip(batch["pixel_values"], rows, samples, epoch, cfg.train.seed)
    return batch


def _refuse_non_finite(step_losses: list[float], epoch: int, steps: int) -> None:
    """End the run at a non-finite training loss (what a bad setting, model or data file
    gives): every later step would train on NaN weights. The losses are the epoch's, summed
    over processes already (one reduction per epoch or checkpoint, no sync per step), so
    every process raises together."""
    bad = next((i for i, loss in enumerate(step_losses) if not math.isfinite(loss)), None)
    if bad is not None:
        raise FloatingPointError(f"the training loss is {step_losses[bad]} at epoch {epoch + 1}, step {bad + 1} "
                                 f"of {steps}; check the data and the model's weights, or lower --lr")


def _disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


def fine_tune(config: Config | None = None, **overrides) -> list[dict]:
    """Fine-tune in this process group (or a one-process group).

    ``fine_tune(model="path/to/hf-folder", data="reviews.csv", epochs=3)``: keyword arguments
    name config fields of any section. Returns the per-epoch metrics.
    """
    cfg = apply_overrides(config or Config(), overrides)
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
