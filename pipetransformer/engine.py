"""The training loop. One epoch, on every process:

  read the layout -> load this replica's batch -> frozen prefix under no_grad (first stage)
  -> pipeline schedule over the active stages -> all-reduce active gradients over replicas
  -> clip -> optimizer step -> accumulate gradient norms for AutoFreeze
  -> at the boundary: evaluate, decide, re-plan, transition, log.

A single process is the layout "1 stage x 1 replica" of the same code.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from . import distributed
from .config import Config, ConfigError
from .data import BatchSampler, Dataset, count_labels, crop_flip, load_data
from .cache import ActivationCache, available_host_bytes, best_seconds, should_cache
from .freeze import FreezeState, GradNormMeter, decide
from .models import StagedModel, load_model
from .partition import compress
from .topology import Layout, Topology, divisors
from .transition import (Runtime, UnitSequence, build_runtime, memory_costs, migrate, plan_layout,
                         profile_units, split_units)

__all__ = ["Trainer", "fine_tune"]


def _log(rank: int, *msg) -> None:
    if rank == 0:
        print(*msg, flush=True)


def _disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for attr in ("attention_dropout", "dropout_prob"):
            if isinstance(getattr(m, attr, None), float):
                setattr(m, attr, 0.0)


class Trainer:
    """Fine-tunes a StagedModel with AutoFreeze over an elastic pipeline (see module doc)."""

    def __init__(self, config: Config, model: StagedModel | None = None,
                 data: tuple[Dataset, Dataset] | None = None, progress: bool = True):
        self.cfg = config
        self.rank, self.world, self.device = distributed.init()
        torch.manual_seed(config.train.seed)
        if model is None:
            names = count_labels(config.data)
            model = load_model(config.model.model, num_labels=len(names) if names else 2,
                               seed=config.train.seed, label_names=names)
        self.model = model
        if not config.train.dropout:
            _disable_dropout(model.hf_model)
        self.train_data, self.val_data = data or load_data(
            config.data, model, config.model.max_length, config.train.seed)
        if config.data.augment != "off" and model.modality != "image":
            raise ConfigError(f"--augment={config.data.augment!r}: augmentation is for image models "
                              f"and {config.model.model!r} is a {model.modality} model; use --augment off")
        self.progress = progress and self.rank == 0
        self.topo = Topology(self.world, self.rank)
        pc = config.parallel
        start = Layout(self.world, pc.stages or self.world)
        self.start_layout = start
        self.freeze = FreezeState(model.num_blocks)
        self.meter = GradNormMeter(model.num_blocks)
        self.sampler = BatchSampler(len(self.train_data), config.train.seed)
        self.global_batch = config.train.batch_size
        most = self.world if pc.elastic else start.replicas  # replicas the run may reach
        if pc.batch_policy == "constant" and self.global_batch % most:
            raise ValueError(f"--batch-size={self.global_batch} must be divisible by every replica "
                             f"count the run may reach (up to {most}); use a multiple of {most}")
        if pc.batch_policy == "per-replica" and self.global_batch % start.replicas:
            raise ValueError(f"--batch-size={self.global_batch} must be divisible by the starting "
                             f"replicas ({start.replicas})")
        if self.sampler.steps(self.global_batch) < 1:
            raise ValueError(f"--batch-size={self.global_batch} is larger than the training set "
                             f"({len(self.train_data)} samples); lower it or use more --train-samples")
        self.model.unit_seconds = None  # a model reused by another Trainer keeps no old profile
        if pc.balance == "time":
            self._profile(start)
        # the compression budget: the largest stage's memory in the starting layout
        self.budget = plan_layout(model, 0, start.stages, by_memory=True)[2].max_cost
        self.samples_seen = 0
        self.total_samples = config.train.epochs * self.sampler.steps(self.global_batch) * self.global_batch
        self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.rt = self._build(0, start, {})
        self.cache: ActivationCache | None = None

    # --- layout --------------------------------------------------------------------------
    def _replica_batch(self, layout: Layout) -> int:
        if self.cfg.parallel.batch_policy == "per-replica":
            return self.global_batch // self.start_layout.replicas
        return self.global_batch // layout.replicas  # divisible: checked at start

    def _build(self, frozen: int, layout: Layout, opt_state: dict) -> Runtime:
        t = self.cfg.train
        return build_runtime(self.model, frozen, layout, self.topo, self.device,
                             self.cfg.parallel.micro_batches, self._replica_batch(layout),
                             self.cfg.parallel.schedule,
                             {"lr": t.lr, "weight_decay": t.weight_decay}, opt_state, t.dropout)

    def _profile(self, start: Layout) -> None:
        """Time every unit on one replica batch (rank 0); every rank balances by the result."""
        seconds = [None]
        if self.rank == 0:
            rows = torch.arange(min(len(self.train_data), self._replica_batch(start)))
            began = time.perf_counter()
            seconds = [profile_units(self.model, self.model.inputs(self.train_data.batch(rows)), self.device)]
            _log(0, f"balance by time: {len(seconds[0])} units profiled in "
                    f"{time.perf_counter() - began:.2f} s on {self.device.type}")
        dist.broadcast_object_list(seconds, src=0)
        self.model.unit_seconds = seconds[0]

    def _units_per_stage(self) -> str:
        bounds = self.rt.plan.bounds
        return "+".join(str(b - a) for a, b in zip(bounds, bounds[1:]))

    def _next_layout(self, frozen: int) -> Layout:
        layout = self.rt.layout
        frozen_units, active = split_units(self.model, frozen)
        if not self.cfg.parallel.elastic:
            # fixed layout, unless fewer units stay active than it has stages
            fits = [d for d in divisors(self.world) if d <= min(layout.stages, len(active))]
            return Layout(self.world, fits[0])
        k = compress(*memory_costs(frozen_units, active), layout.stages, self.world, self.budget)
        return Layout(self.world, k)

    def _transition(self, frozen: int, layout: Layout) -> tuple[float, float]:
        """Apply (frozen, layout): migrate weights and optimizer state, rebuild, bring the
        cache to the new frozen count. (Seconds taken, of which advancing the cache.)"""
        start = time.perf_counter()
        old_frozen = self.rt.frozen
        opt_state = migrate(self.model, self.rt, frozen, self.samples_seen > 0, self.comm_device)
        self.rt = self._build(frozen, layout, opt_state)
        cache_start = time.perf_counter()
        if frozen > old_frozen and self._cache_wanted():
            self._update_cache(old_frozen, frozen)
        dist.barrier()
        end = time.perf_counter()
        return end - start, end - cache_start

    def freeze_to(self, frozen: int) -> float:
        """Apply a freeze decision by hand (benchmarks, resuming): the same path AutoFreeze
        takes, layout compression included. Returns the transition's seconds."""
        if not self.rt.frozen <= frozen <= self.model.num_blocks:
            raise ValueError(f"frozen={frozen}: must lie in [{self.rt.frozen}, {self.model.num_blocks}] "
                             f"(frozen blocks never thaw)")
        self.freeze.frozen = frozen
        return self._transition(frozen, self._next_layout(frozen))[0]

    # --- AutoCache -----------------------------------------------------------------------
    def _cache_wanted(self) -> bool:
        """Random augmentation gives the frozen blocks a new input each epoch, so a cached
        output would replay the epoch that filled it: auto leaves the cache off then."""
        cc, augment = self.cfg.cache.cache, self.cfg.data.augment
        return cc == "on" or (cc == "auto" and augment == "off")

    def _cache_warning(self) -> str | None:
        augment = self.cfg.data.augment
        if augment == "off" or self.cfg.cache.cache == "off":
            return None
        if self.cfg.cache.cache == "auto":
            return (f"warning: cache off because --augment={augment} draws new inputs each epoch; "
                    f"--cache on would reuse each image's first augmentation instead")
        return (f"warning: --cache on with --augment={augment}: once its entry is cached, an image "
                f"keeps the augmentation of the epoch that filled it")

    def _update_cache(self, old_frozen: int, frozen: int) -> None:
        if self.cache is not None:  # incremental: entries at old_frozen go through the new blocks
            units = [u for u in self.model.units if old_frozen <= u.freeze_index < frozen]
            for u in units:  # every local rank converts rows; only first stages hold frozen units
                u.module.to(self.device)
            newly = UnitSequence(units, self.device).eval()

            @torch.no_grad()
            def run_blocks(hidden, rows):
                extras = [x.to(self.device) for x in self.model.inputs(self.train_data.batch(rows))[1:]]
                return newly(hidden.to(self.device, self.cache_out_dtype), *extras)[0]
            local_rank, local_world = _local_rank_world()
            mine = torch.arange(len(self.train_data))[local_rank::local_world]
            self.cache.advance(frozen, run_blocks, mine, self.global_batch)
            if not self.rt.is_first:
                for u in units:
                    u.module.to("cpu")
            return
        self._start_cache(frozen)

    def _start_cache(self, frozen: int) -> None:
        """Create the cache at the first frozen prefix; in auto mode keep it only if reading a
        batch's entries measures faster than recomputing them (probed on rank 0)."""
        cc = self.cfg.cache
        rows = torch.arange(min(len(self.train_data), self.global_batch))
        probe = [None]
        if self.rank == 0:  # rank 0 is the first stage of replica 0: it holds the prefix
            inputs = [x.to(self.device) for x in self.model.inputs(self.train_data.batch(rows))]
            with torch.no_grad():
                out = self.rt.prefix(*inputs)[0]
                seconds = best_seconds(lambda: self.rt.prefix(*inputs), self.device)
            probe = [(tuple(out.shape[1:]), out.dtype, seconds)]
        dist.broadcast_object_list(probe, src=0)
        row_shape, self.cache_out_dtype, prefix_seconds = probe[0]
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(
            cc.cache_dtype, torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        host = cc.cache_host_bytes or int(cc.cache_host_fraction * available_host_bytes())
        device_budget = 0
        if self.device.type == "cuda" and self.world == 1:
            device_budget = int(cc.cache_device_fraction * torch.cuda.mem_get_info(self.device)[0])
        run_id = [f"{os.getpid()}-{time.time_ns()}"]
        dist.broadcast_object_list(run_id, src=0)
        self.cache = ActivationCache(len(self.train_data), row_shape, dtype, run_id[0],
                                     Path(self.cfg.run_dir) / "cache", host, self.device, device_budget,
                                     _local_rank_world()[0], dist.barrier)
        self.cache.open_level(frozen)
        if cc.cache == "auto":
            verdict = [None]
            if self.rank == 0:
                self._cached_prefix(self.train_data.batch(rows))  # fill the probe rows
                read = self.cache.read_seconds(rows)
                verdict = [(should_cache(prefix_seconds, read), read)]
            dist.broadcast_object_list(verdict, src=0)
            keep, read = verdict[0]
            note = (f"{'on' if keep else 'off'}: prefix {1e3 * prefix_seconds:.1f} ms vs read "
                    f"{1e3 * read:.1f} ms per batch")
            self.cache.reset_counters()
            if not keep:
                _log(self.rank, f"cache {note}")
                self.cache.close()
                self.cache = None
                return
        else:
            note = "on"
        stats = self.cache.stats()
        _log(self.rank, f"cache {note}; tier {stats['cache_tier']}, {stats['cache_bytes'] / 2**20:.0f} MiB")

    def _cached_prefix(self, batch: dict) -> tuple:
        inputs = tuple(x.to(self.device) for x in self.model.inputs(batch))

        def compute(pos):
            with torch.no_grad():
                return self.rt.prefix(*(x[pos.to(x.device)] for x in inputs))[0]
        hidden = self.cache.fetch(batch["index"], compute, self.cache_out_dtype)
        return (hidden, *inputs[1:])

    def _cache_active(self) -> bool:
        return (self.cache is not None and self.cache.level is not None
                and self.cache.level.k == self.rt.frozen and self.rt.prefix is not None)

    # --- one step ------------------------------------------------------------------------
    def _lr(self) -> float:
        t = self.cfg.train
        progress = self.samples_seen / max(1, self.total_samples)
        factor = progress / t.warmup_ratio if progress < t.warmup_ratio else \
            max(0.0, (1 - progress) / (1 - t.warmup_ratio))
        scale = self.rt.layout.replicas / self.start_layout.replicas \
            if self.cfg.parallel.batch_policy == "per-replica" else 1.0
        return t.lr * factor * scale

    def _inputs(self, batch: dict, train: bool) -> tuple:
        """Stage-0 inputs: raw model inputs, or the frozen prefix's output (cached in training)."""
        if train and self._cache_active():
            return self._cached_prefix(batch)
        inputs = tuple(x.to(self.device) for x in self.model.inputs(batch))
        if self.rt.prefix is not None:
            with torch.no_grad():
                inputs = self.rt.prefix(*inputs)
        return inputs

    def _run_schedule(self, batch: dict, train: bool):
        rt, losses = self.rt, []
        args = self._inputs(batch, train) if rt.is_first else ()
        kwargs = {}
        if rt.is_last:  # the schedule computes the loss on the last stage, eval included
            kwargs = {"target": batch["labels"].to(self.device), "losses": losses}
        out = (rt.schedule.step if train else rt.schedule.eval)(*args, **kwargs)
        return out, losses

    def _train_step(self, batch: dict) -> float:
        rt = self.rt
        _, losses = self._run_schedule(batch, train=True)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for _, p in rt.params]
        if grads and rt.layout.replicas > 1:  # sync point: average over the stage's replicas
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=rt.replica_group)
            flat /= rt.layout.replicas
            for (_, p), g in zip(rt.params, flat.split([g.numel() for g in grads])):
                p.grad = g.view_as(p)
        self._clip([p for _, p in rt.params])
        if rt.replica == 0:
            self.meter.accumulate(rt.block_params)
        lr = self._lr()
        if rt.optimizer is not None:
            for group in rt.optimizer.param_groups:
                group["lr"] = lr
            rt.optimizer.step()
            rt.optimizer.zero_grad(set_to_none=True)
        # a tensor, not a float: reading it would wait for the device every step
        return torch.stack(losses).detach().mean() if losses else torch.zeros(())

    def _clip(self, params) -> None:
        """Clip by the global norm over every stage's active gradients. Computed on the
        device, so no host sync: the pipeline group's all-reduce is the only sync point."""
        max_norm = self.cfg.train.grad_clip
        if max_norm <= 0:
            return
        grads = [p.grad for p in params]
        sq = torch.zeros(1, dtype=torch.float64, device=self.comm_device)
        if grads:  # per-tensor norms in one multi-tensor kernel, summed in float64
            sq += torch.stack(torch._foreach_norm(grads)).double().pow(2).sum().to(self.comm_device)
        if self.rt.layout.stages > 1:
            dist.all_reduce(sq, group=self.rt.pipeline_group)
        if grads:
            coef = (max_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coef.to(grads[0].device, grads[0].dtype).squeeze())

    # --- epochs --------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training data in the current layout; its measurements."""
        rt = self.rt
        layout = rt.layout
        batch_size = self._replica_batch(layout) * layout.replicas
        steps = self.sampler.steps(batch_size)
        order = self.sampler.epoch_order(epoch)
        local = []
        bar = _bar(steps, f"epoch {epoch + 1}/{self.cfg.train.epochs}", self.progress)
        start = time.perf_counter()
        prefetch = rt.is_first and self._cache_active()
        if self.cache is not None:
            self.cache.reset_counters()
        for step in range(steps):
            rows = self.sampler.replica_rows(order, step, batch_size, rt.replica, layout.replicas)
            if prefetch and step + 1 < steps:  # read the next batch's entries during this step
                self.cache.prefetch(self.sampler.replica_rows(order, step + 1, batch_size, rt.replica,
                                                              layout.replicas))
            local.append(self._train_step(self._train_batch(rows, epoch)))
            self.samples_seen += batch_size
            if bar is not None:
                bar.update(1)
                if rt.is_last and (step % 10 == 0 or step + 1 == steps):  # reading the loss syncs
                    bar.set_postfix(loss=f"{float(local[-1]):.4f}", lr=f"{self._lr():.2e}")
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if bar is not None:
            bar.close()
        local = torch.stack([x.double().cpu() for x in local])
        local = self._sum_over_world(local)  # only last stages hold losses: a sum over replicas
        local /= layout.replicas
        stats = self.cache.stats() if self.cache is not None else \
            {"cache_hits": 0, "cache_bytes": 0, "cache_tier": "off"}
        stats["cache_hits"] = int(self._sum_over_world(torch.tensor([float(stats["cache_hits"])]))[0])
        return {**stats, "train_loss": float(local.mean()), "step_losses": local.tolist(), "epoch_seconds": seconds,
                "samples_per_second": steps * batch_size / seconds, "steps": steps}

    def _train_batch(self, rows: torch.Tensor, epoch: int) -> dict:
        batch = self.train_data.batch(rows)
        if self.cfg.data.augment == "crop-flip":
            batch["pixel_values"] = crop_flip(batch["pixel_values"], rows, len(self.train_data),
                                              epoch, self.cfg.train.seed)
        return batch

    @torch.no_grad()
    def evaluate(self) -> dict:
        rt = self.rt
        layout = rt.layout
        batch_size = self._replica_batch(layout) * layout.replicas
        n = len(self.val_data)
        steps = math.ceil(n / batch_size)
        order = torch.arange(steps * batch_size) % n  # pad the tail with repeats, ignored below
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, count
        rt.module.eval()
        try:
            for step in range(steps):
                rows = self.sampler.replica_rows(order, step, batch_size, rt.replica, layout.replicas)
                batch = self.val_data.batch(rows)
                out, _ = self._run_schedule(batch, train=False)
                if rt.is_last:
                    pos = step * batch_size + rt.replica * len(rows) + torch.arange(len(rows))
                    keep = pos < n
                    logits, labels = out.float().cpu()[keep], batch["labels"][keep]
                    totals += torch.tensor([
                        float(nn.functional.cross_entropy(logits, labels, reduction="sum")),
                        float((logits.argmax(-1) == labels).sum()), float(keep.sum())], dtype=torch.float64)
        finally:
            rt.module.train(self.cfg.train.dropout)
        totals = self._sum_over_world(totals)
        return {"val_loss": float(totals[0] / totals[2]), "val_accuracy": float(totals[1] / totals[2])}

    def _sum_over_world(self, t: torch.Tensor) -> torch.Tensor:
        """All-reduce a small host tensor (NCCL needs it on the GPU and back)."""
        x = t.to(self.comm_device)
        dist.all_reduce(x)
        return x.cpu()

    def _decide(self) -> int:
        """All-reduce the interval's gradient norms; rank 0's decision is everyone's."""
        sq = self.meter.squared_norms()
        sq = self._sum_over_world(sq)  # each block counted once: only replica 0 accumulates
        self.meter.reset()
        fc = self.cfg.freeze
        k = torch.tensor([decide(self.freeze, fc.alpha, fc.freeze, sq.sqrt().tolist())],
                         device=self.comm_device)
        dist.broadcast(k, src=0)
        self.freeze.frozen = int(k)
        return int(k)

    def fit(self) -> list[dict]:
        cfg, rank = self.cfg, self.rank
        run_dir = Path(cfg.run_dir)
        records = []
        if rank == 0:
            _prepare_run_dir(run_dir)
            (run_dir / "config.yaml").write_text(_yaml(cfg.to_dict()))
        _log(rank, f"pipetransformer: {len(self.train_data)} train / {len(self.val_data)} val samples, "
                   f"{self.model.num_blocks} blocks, {self.world} process(es), device {self.device.type}, "
                   f"layout {self.rt.layout} ({self._units_per_stage()} units per stage), "
                   f"freeze={cfg.freeze.freeze} alpha={cfg.freeze.alpha:.3g}")
        warning = self._cache_warning()
        if warning:
            _log(rank, warning)
        fit_start = time.perf_counter()
        for epoch in range(cfg.train.epochs):
            rt = self.rt
            rec = {"epoch": epoch + 1, "frozen_layers": rt.frozen, "total_layers": self.model.num_blocks,
                   "stages": rt.layout.stages, "replicas": rt.layout.replicas,
                   "micro_batches": rt.micro_batches}
            rec.update(self.train_epoch(epoch))
            rec.update(self.evaluate())
            rec["transition_seconds"] = rec["cache_seconds"] = 0.0
            if epoch + 1 < cfg.train.epochs:
                frozen = self._decide()
                layout = self._next_layout(frozen)
                if (frozen, layout) != (rt.frozen, rt.layout):
                    rec["transition_seconds"], rec["cache_seconds"] = self._transition(frozen, layout)
                    _log(rank, f"transition after epoch {epoch + 1}: frozen {rt.frozen} -> {frozen} "
                               f"of {self.model.num_blocks} blocks, layout {rt.layout} -> {layout}, "
                               f"{self._units_per_stage()} active units per stage "
                               f"({rec['transition_seconds']:.2f} s)")
            rec["frozen_after"] = self.freeze.frozen
            rec["open_fds"] = _open_fds()  # rank 0's; flat across transitions = no leaked groups
            records.append(rec)
            _log(rank, f"epoch {epoch + 1}: val_accuracy {rec['val_accuracy']:.4f} val_loss "
                       f"{rec['val_loss']:.4f} train_loss {rec['train_loss']:.4f} | frozen "
                       f"{rec['frozen_layers']}/{rec['total_layers']} | {rec['stages']} stage(s) x "
                       f"{rec['replicas']} replica(s), M={rec['micro_batches']} | "
                       f"{rec['samples_per_second']:.1f} samples/s, {rec['epoch_seconds']:.1f} s")
            if rank == 0:
                with open(run_dir / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(rec) + "\n")
        # bring every trained weight to rank 0, then save a standard Hugging Face folder
        migrate(self.model, self.rt, self.rt.frozen, False, self.comm_device)
        if rank == 0:
            self._save(run_dir, records, time.perf_counter() - fit_start)
        dist.barrier()
        return records

    def _save(self, run_dir: Path, records: list[dict], seconds: float) -> None:
        from .report import plot_metrics
        final = run_dir / "final"
        self.model.hf_model.to("cpu").save_pretrained(final)
        if self.model.processor is not None:
            self.model.processor.save_pretrained(final)
        plot_metrics(records, run_dir / "metrics.png")
        summary = {"val_accuracy": records[-1]["val_accuracy"], "total_seconds": seconds,
                   "epochs": len(records), "final_frozen_layers": records[-1]["frozen_after"],
                   "final_layout": f"{self.rt.layout}"}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _log(0, f"done in {seconds:.1f} s: val_accuracy {summary['val_accuracy']:.4f}; wrote "
                f"{run_dir}/metrics.jsonl, metrics.png and final/ (Hugging Face format)")

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None
        self.topo.destroy()


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return -1


def _local_rank_world() -> tuple[int, int]:
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def _prepare_run_dir(run_dir: Path) -> None:
    if (run_dir / "metrics.jsonl").exists() or (run_dir / "final").exists():
        raise FileExistsError(f"--run-dir={str(run_dir)!r} already holds a run; nothing was "
                              f"overwritten. Pass a new --run-dir or move that folder away")
    run_dir.mkdir(parents=True, exist_ok=True)


def _yaml(d: dict) -> str:
    import yaml
    return yaml.safe_dump(d, sort_keys=False)


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="step", dynamic_ncols=True, leave=False)


def fine_tune(config: Config | None = None, **overrides) -> list[dict]:
    """Fine-tune with AutoFreeze in this process group (or a one-process group).

    ``fine_tune(model="path/to/hf-folder", data="reviews.csv", epochs=3)``: keyword arguments
    name config fields of any section. Returns the per-epoch metrics.
    """
    from .cli import apply_overrides
    cfg = apply_overrides(config or Config(), overrides)
    trainer = Trainer(cfg)
    try:
        return trainer.fit()
    finally:
        trainer.close()
