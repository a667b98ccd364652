"""Typed configuration. Each component reads only its own section.

Every field is also a command-line flag (``--field-name``) and a YAML key under its section
(``train: {epochs: 3}``); the help text lives here, once, in each field's metadata.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .autofreeze import MODES, POLICIES, RULES, FreezePolicy
from .autopipe import divisors
from .data.sources import describe_data, describe_validation, run_sizes
from .errors import ConfigError
from .models.catalog import describe_model

LR_SCALINGS = ("sqrt", "linear")  # autodp.lr_scale

__all__ = ["AUTO", "ALL_STAGES", "Config", "ModelConfig", "DataConfig", "TrainConfig", "FreezeConfig",
           "ParallelConfig", "CacheConfig", "CheckpointConfig", "ConfigError", "RunFacts", "load_config",
           "config_fields", "apply_overrides", "parse_on_off", "read_yaml", "shown_default"]


AUTO, ALL_STAGES = 0, -1  # --stages auto / all, --micro-batches auto


def _f(default, help: str, choices=None, resumable: bool = False, words: dict[str, int] | None = None):
    """A config field: its flag's help, its choices (checked once, _check_choices), whether
    a resume may change it (it moves work between processes, never the math) and the words
    that stand for some of its numbers (a flag, YAML or keyword may give either)."""
    return field(default=default, metadata={"help": help, "choices": choices, "resumable": resumable,
                                            "words": words or {}})


def shown_default(f: dataclasses.Field) -> str:
    """A field's default as --help shows it."""
    return next((w for w, n in f.metadata["words"].items() if n == f.default), str(f.default))


def _bad(name: str, value, fix: str) -> ConfigError:
    return ConfigError(f"--{name.replace('_', '-')}={value!r} is invalid: {fix}")


def _check_choices(section) -> None:
    """Every field with choices in its metadata holds one of them (the one list of each)."""
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        value = getattr(section, f.name)
        if choices and value not in choices:
            listed = ", ".join(choices[:-1]) + f" or {choices[-1]}" if len(choices) > 1 else choices[0]
            raise _bad(f.name, value, f"choose {listed}")


@dataclass
class ModelConfig:
    model: str = _f("minilm-l6", "built-in model name (minilm-l6) or a local Hugging Face model folder")
    max_length: int = _f(48, "tokens per text sample; every batch is padded to exactly this length")

    def __post_init__(self):
        _check_choices(self)
        if not 8 <= self.max_length <= 8192:
            raise _bad("max_length", self.max_length, "use a length between 8 and 8192 tokens")


@dataclass
class DataConfig:
    data: str = _f("rotten-tomatoes", "rotten-tomatoes, imdb, a .csv, .jsonl or .parquet file with text "
                   "(or sentence) and label columns, a Hugging Face datasets folder (save_to_disk), a SQuAD "
                   "v1.1-format .json file (extractive question answering), an image folder (one sub-folder "
                   "per class), a .parquet file with image and label columns, or an .npz file with arrays x and y")
    val_data: str = _f("", "a separate validation file or folder, of the same kind and labels as --data; "
                       "then all of --data trains (no split) and --val-fraction is unused")
    train_samples: int = _f(1536, "use the first N of the shuffled training split (0: all of it); "
                            "for question answering N counts questions, each one or more windows")
    eval_samples: int = _f(0, "use the first N of the validation split (0: all of it); for question "
                           "answering N counts questions")
    val_fraction: float = _f(0.1, "fraction of each class held out for validation (stratified, seeded); "
                             "for question answering, of the questions (seeded)")
    doc_stride: int = _f(-1, "question answering: tokens that consecutive windows of a long context "
                         "share, at most half of --max-length (-1: a third of --max-length, at most 128, "
                         "as the SQuAD recipes' 128 of 384)")
    image_size: int = _f(224, "image side in pixels for image data (resized to a square)")
    augment: str = _f("off", "random augmentation of training images, drawn anew each epoch: "
                      "crop-flip takes a random square crop covering 64 to 100 percent of the "
                      "image and flips half the images; it keeps the cache off in auto mode",
                      choices=("off", "crop-flip"))
    loader_workers: int = _f(-1, "data loader worker processes per training process (-1: auto, none for "
                             "text, up to 4 for images; 0: read in the training process)", resumable=True)

    def __post_init__(self):
        _check_choices(self)
        if not -1 <= self.loader_workers <= 64:
            raise _bad("loader_workers", self.loader_workers, "use -1 (auto), 0 or a count up to 64")
        if self.image_size < 1:
            raise _bad("image_size", self.image_size, "use a positive side in pixels, e.g. 224")
        if self.train_samples < 0:
            raise _bad("train_samples", self.train_samples, "use 0 (all) or a positive count")
        if self.eval_samples < 0:
            raise _bad("eval_samples", self.eval_samples, "use 0 (all) or a positive count")
        if self.doc_stride < -1:
            raise _bad("doc_stride", self.doc_stride, "use -1 (auto), 0 or a positive token count, e.g. 128")
        if not 0.0 < self.val_fraction < 0.5:
            raise _bad("val_fraction", self.val_fraction, "use a fraction between 0 and 0.5, e.g. 0.1")

    def window_stride(self, max_length: int) -> int:
        """--doc-stride, or for -1 the default that fits windows of `max_length` tokens."""
        return self.doc_stride if self.doc_stride >= 0 else min(128, max_length // 3)


@dataclass
class TrainConfig:
    epochs: int = _f(4, "number of passes over the training data")
    batch_size: int = _f(32, "global batch size (all replicas together), constant through training")
    lr: float = _f(1e-4, "peak learning rate of AdamW")
    weight_decay: float = _f(0.01, "AdamW weight decay (applied to active parameters only)")
    warmup_ratio: float = _f(0.1, "fraction of all steps spent warming the learning rate up linearly")
    grad_clip: float = _f(1.0, "clip the global gradient norm of the active parameters to this (0: off)")
    dropout: bool = _f(True, "keep the model's dropout (off makes runs comparable bit for bit)")
    seed: int = _f(0, "seed for the split, the head's initialisation, shuffling and dropout")

    def __post_init__(self):
        _check_choices(self)
        if self.epochs < 1:
            raise _bad("epochs", self.epochs, "train for at least 1 epoch")
        if self.batch_size < 1:
            raise _bad("batch_size", self.batch_size, "use a positive batch size")
        if not 0 < self.lr < 1:
            raise _bad("lr", self.lr, "use a learning rate between 0 and 1, e.g. 1e-4")
        if self.weight_decay < 0:
            raise _bad("weight_decay", self.weight_decay, "use 0 or a positive decay")
        if not 0 <= self.warmup_ratio < 1:
            raise _bad("warmup_ratio", self.warmup_ratio, "use a fraction in [0, 1)")
        if self.grad_clip < 0:
            raise _bad("grad_clip", self.grad_clip, "use 0 (off) or a positive norm")
        if not 0 <= self.seed < 2**32:
            raise _bad("seed", self.seed, "use a whole number between 0 and 2**32 - 1")


@dataclass
class FreezeConfig:
    freeze: str = _f("adaptive", "off: never freeze; schedule: the alpha cap alone "
                     "(k_T = ceil(L(1-(1-alpha)^T))); adaptive: the paper's rule, cap and "
                     "gradient-norm term", MODES)
    alpha: float = _f(1 / 3, "freeze ratio: at most this share of the still active blocks "
                      "freezes per epoch (at each decision when they come once an epoch)")
    freeze_every: int = _f(0, "optimizer steps between freeze decisions, counted over the whole run, "
                           "with the transition they ask for inside the epoch; the alpha cap is shared "
                           "out so that an epoch's decisions together allow alpha (0: one decision at "
                           "each epoch's end, the paper's interval)")
    freeze_rule: str = _f("through-min", "adaptive only: through-min freezes up to and including "
                          "the active block with the smallest gradient norm (at least one block per "
                          "decision); below-min is the paper's formula as printed, freezing only the "
                          "blocks below it (none when the lowest active block has the smallest norm)",
                          RULES)
    freeze_policy: str = _f("paper", "adaptive only: how a block is judged converged; paper: the "
                            "smallest accumulated gradient norm (read by --freeze-rule); autofreeze: "
                            "its gradient norm's rate of change falls below --freeze-percentile of the "
                            "active blocks' (Liu et al. 2021); update-ratio: its weights' drift "
                            "falls below --freeze-threshold", POLICIES)
    freeze_percentile: float = _f(50.0, "autofreeze policy: the percentile (0-100) of the active "
                                  "blocks' rates below which a block counts as converged")
    freeze_threshold: float = _f(1.0, "update-ratio policy: the drift (a block's per-weight move over "
                                 "the interval, in units of a random walk of its steps: up to "
                                 "sqrt(steps) while it learns, about 1 once its gradient is noise) "
                                 "below which a block counts as converged")

    def __post_init__(self):
        _check_choices(self)
        if not 0 < self.alpha < 1:
            raise _bad("alpha", self.alpha, "use a ratio between 0 and 1, e.g. 0.333")
        if not 0 <= self.freeze_percentile <= 100:
            raise _bad("freeze_percentile", self.freeze_percentile, "use a percentile between 0 and 100")
        if not self.freeze_threshold > 0:
            raise _bad("freeze_threshold", self.freeze_threshold, "use a positive drift, e.g. 1.0")
        if self.freeze_every < 0:
            raise _bad("freeze_every", self.freeze_every, "use 0 (at each epoch's end) or a positive step count")

    def policy(self) -> FreezePolicy:
        return FreezePolicy(self.freeze_policy, self.freeze_rule, self.freeze_percentile, self.freeze_threshold)


@dataclass
class ParallelConfig:
    nproc: int = _f(1, "local processes to launch (one per GPU, or CPU processes with gloo)", resumable=True)
    nnodes: int = _f(1, "machines the run spans, each running the same command with its own "
                     "--node-rank and --nproc processes", resumable=True)
    node_rank: int = _f(0, "this machine's rank, 0 to --nnodes - 1; node 0 hosts --rdzv-endpoint, "
                        "and its run folder gets the metrics and final/", resumable=True)
    rdzv_endpoint: str = _f("", "with --nnodes 2 or more: HOST:PORT where the machines meet, node 0's "
                            "name or address and a free port there that every machine can reach", resumable=True)
    stages: int = _f(0, "pipeline stages at the start (a divisor of the world size; the paper starts "
                     "with one pipeline over every process); auto: the starting layout that the cost "
                     "model (as `plan`) prices fastest per sample among those that fit device memory, "
                     "from the units timed at the start (run folder's profile.json); all: one "
                     "pipeline over every process", resumable=True, words={"auto": AUTO, "all": ALL_STAGES})
    elastic: bool = _f(True, "re-partition onto fewer stages and add replicas as layers freeze "
                       "(off: keep the starting layout, the 'freeze only' ablation)")
    schedule: str = _f("gpipe", "pipeline schedule", ("gpipe", "1f1b"), resumable=True)
    micro_batches: int = _f(0, "micro-batches per pipeline step; auto: for each layout the count the "
                            "cost model prices fastest (bubble against the cost per call; 1 for a single "
                            "stage), from the units timed at the start", words={"auto": AUTO})
    balance: str = _f("params", "what the stages balance: params (each unit's matrix parameters, "
                      "the paper's rule) or time (each unit's forward+backward time, profiled on "
                      "one batch at the start by rank 0 and shared)", ("params", "time"))
    batch_policy: str = _f("constant", "constant: global batch fixed, split over replicas (same "
                           "math as one process); per-replica: each replica keeps the starting "
                           "batch, so the global batch and the LR (--lr-scaling) grow with replicas",
                           ("constant", "per-replica"))
    lr_scaling: str = _f("sqrt", "per-replica only: how the LR follows a global batch grown r-fold: "
                         "sqrt (x sqrt(r), the rule for AdamW) or linear (x r, the rule for SGD)",
                         LR_SCALINGS)
    lr_ramp_steps: int = _f(100, "per-replica only: optimizer steps over which the LR moves to its "
                            "new scale after a transition (0: at once)")
    max_restarts: int = _f(0, "with --nproc 2 or more: restart every worker this many times after "
                           "a worker fails; each restart resumes from the last checkpoint", resumable=True)
    comm_timeout: float = _f(300.0, "seconds a process waits on a stopped or dead peer before "
                             "the run ends with an error", resumable=True)
    compile: bool = _f(False, "torch.compile each process's active stage and its frozen prefix; "
                       "compiled again after every transition (the compile time counts in the "
                       "transition's time); pays off on GPUs for long runs", resumable=True)

    def __post_init__(self):
        _check_choices(self)
        if self.max_restarts < 0:
            raise _bad("max_restarts", self.max_restarts, "use 0 (no restarts) or a positive count")
        if not 1 <= self.comm_timeout <= 86400:
            raise _bad("comm_timeout", self.comm_timeout, "use between 1 and 86400 seconds")
        if self.nproc < 1:
            raise _bad("nproc", self.nproc, "use at least 1 process")
        if self.nnodes < 1:
            raise _bad("nnodes", self.nnodes, "use at least 1 machine")
        if not 0 <= self.node_rank < self.nnodes:
            raise _bad("node_rank", self.node_rank, f"with --nnodes {self.nnodes} the machines are numbered "
                       f"0 to {self.nnodes - 1}; give each machine its own")
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if self.rdzv_endpoint and not (host.strip("[]") and port.isdigit() and 0 < int(port) < 65536):
            raise _bad("rdzv_endpoint", self.rdzv_endpoint, "give HOST:PORT, e.g. node0.example.com:29500 "
                       "(a port from 1 to 65535)")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise _bad("rdzv_endpoint", self.rdzv_endpoint, f"the {self.nnodes} machines meet there: pass "
                       f"node 0's name or address and a free port, e.g. --rdzv-endpoint node0.example.com:29500")
        if self.stages < ALL_STAGES:
            raise _bad("stages", self.stages, "use auto, all or a positive divisor of --nproc")
        if self.micro_batches < 0:
            raise _bad("micro_batches", self.micro_batches, "use auto or a positive count")
        if self.lr_ramp_steps < 0:
            raise _bad("lr_ramp_steps", self.lr_ramp_steps, "use 0 (at once) or a positive step count")


@dataclass
class CacheConfig:
    cache: str = _f("auto", "store the frozen layers' outputs so later epochs skip them; auto: "
                    "on when reading a batch's entries measures faster than recomputing them",
                    ("auto", "on", "off"))
    cache_dtype: str = _f("auto", "storage dtype of cached activations; auto: the frozen prefix's "
                          "output dtype (a cached read equals what the prefix computed); bfloat16 "
                          "halves the bytes but rounds every read and every advance",
                          ("auto", "float32", "bfloat16"))
    cache_host_fraction: float = _f(0.25, "host-memory budget of the cache, as a fraction of the "
                                    "memory available at start; rows beyond it go to disk")
    cache_host_bytes: int = _f(0, "host-memory budget in bytes (overrides the fraction; 0: use it)")
    cache_device_fraction: float = _f(0.2, "GPU-memory budget of the cache (single-process runs), "
                                      "as a fraction of free GPU memory")

    def __post_init__(self):
        _check_choices(self)
        if not 0 <= self.cache_host_fraction <= 0.9:
            raise _bad("cache_host_fraction", self.cache_host_fraction, "use a fraction in [0, 0.9]")
        if self.cache_host_bytes < 0:
            raise _bad("cache_host_bytes", self.cache_host_bytes, "use 0 or a positive byte count")
        if not 0 <= self.cache_device_fraction <= 0.9:
            raise _bad("cache_device_fraction", self.cache_device_fraction, "use a fraction in [0, 0.9]")


@dataclass
class CheckpointConfig:
    checkpoint_every: int = _f(0, "also checkpoint every N training steps (0: at epoch ends only)", resumable=True)
    keep_checkpoints: int = _f(2, "how many of the newest checkpoints to keep (0: write none; a stopped "
                               "run then starts over)", resumable=True)

    def __post_init__(self):
        _check_choices(self)
        if self.checkpoint_every < 0:
            raise _bad("checkpoint_every", self.checkpoint_every, "use 0 (epoch ends only) or a step count")
        if self.keep_checkpoints < 0:
            raise _bad("keep_checkpoints", self.keep_checkpoints, "use 0 (no checkpoints) or a count to keep")
        if self.checkpoint_every and not self.keep_checkpoints:
            raise _bad("checkpoint_every", self.checkpoint_every, "checkpoints are off (--keep-checkpoints 0): "
                       "drop --checkpoint-every or keep at least 1")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    freeze: FreezeConfig = field(default_factory=FreezeConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str = "runs/latest"

    SECTIONS = ("model", "data", "train", "freeze", "parallel", "cache", "checkpoint")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, world: int, facts: RunFacts | None = None) -> None:
        """Every check that needs more than one field: raises ConfigError naming the field,
        the value and the fix. `facts` default to what the model folder and data file say
        (read without torch, in well under a second), so the launcher runs this before any
        worker starts; the Trainer runs it again on what it loaded."""
        facts = facts or describe_run(self)
        self.check_fit(facts)
        t, p = self.train, self.parallel
        if p.max_restarts and not self.checkpoint.keep_checkpoints:
            raise _bad("max_restarts", p.max_restarts, "a restart continues from the last checkpoint and "
                       "checkpoints are off (--keep-checkpoints 0); keep at least 1 or use --max-restarts 0")
        self.start_stage_choices(world, facts)
        if self.freeze.freeze_every and p.batch_policy == "per-replica":
            raise _bad("freeze_every", self.freeze.freeze_every, "with --batch-policy per-replica a transition "
                       "changes the global batch, so decisions come only at epoch ends; use --freeze-every 0 "
                       "or --batch-policy constant")
        if facts.train_rows < t.batch_size:
            raise _bad("batch_size", t.batch_size, f"it is larger than the training set "
                       f"({facts.train_rows} samples); lower it or use more --train-samples")

    def start_stage_choices(self, world: int, facts: RunFacts) -> list[int]:
        """The stage counts the run may start with: --stages K (checked), or with auto every
        divisor of the world with units enough whose every reachable layout splits the batch;
        raises naming the fix when none can."""
        p = self.parallel
        if p.stages == ALL_STAGES:
            if world > facts.num_units:
                fits = sorted(k for k in divisors(world) if k <= facts.num_units)
                raise _bad("stages", "all", f"one pipeline of {world} stages and {self.model.model!r} has "
                           f"{facts.num_units} units to place; use one of {fits} or auto")
            p = dataclasses.replace(p, stages=world)
        if not p.stages:
            choices = sorted(k for k in divisors(world)
                             if k <= facts.num_units and self._layout_problem(k, world) is None)
            if not choices:
                raise self._layout_problem(1, world) or AssertionError("one stage always has units")
            return choices
        if world % p.stages:
            raise _bad("stages", p.stages, f"it must divide the number of processes ({world}); "
                       f"valid: {divisors(world)}")
        if p.stages > facts.num_units:
            fits = sorted(k for k in divisors(world) if k <= facts.num_units)
            raise _bad("stages", p.stages, f"{self.model.model!r} has {facts.num_units} units to place on "
                       f"{p.stages} stages; use one of {fits} or auto")
        problem = self._layout_problem(p.stages, world)
        if problem:
            raise problem
        return [p.stages]

    def _layout_problem(self, stages: int, world: int) -> ConfigError | None:
        """What stops a run that starts with `stages` stages: a layout it may reach (every
        stage count up to it) whose replicas cannot split the batch or its micro-batches."""
        t, p = self.train, self.parallel
        start_replicas = world // stages
        for k in [k for k in divisors(world) if k <= stages]:
            replicas = world // k
            split = start_replicas if p.batch_policy == "per-replica" else replicas  # the batch is cut in
            if t.batch_size % split:
                return _bad("batch_size", t.batch_size, f"it must be divisible by every replica count "
                            f"the run may reach (up to {split}); use a multiple of {split}")
            batch = t.batch_size // split
            if p.micro_batches and batch % p.micro_batches:
                return _bad("micro_batches", p.micro_batches, f"it must divide the per-replica batch "
                            f"({batch} with {k} stage(s) x {replicas} replica(s)); pick a divisor of "
                            f"it or auto")
            if not p.micro_batches and batch < k:
                return _bad("batch_size", t.batch_size, f"{k} stages need at least {k} "
                            f"micro-batches per replica batch ({batch}); use a larger "
                            f"--batch-size or fewer --stages")
        return None

    def check_fit(self, facts: RunFacts) -> None:
        """The checks of the model against the data and the input sizes alone (what `profile`
        needs; `validate` runs them first)."""
        m, d = self.model, self.data
        if facts.data_modality != facts.model_modality:
            raise _bad("data", d.data, f"this is {facts.data_modality} data but --model={m.model!r} "
                       f"is a {facts.model_modality} model; pass data of its kind")
        if d.augment != "off" and facts.model_modality != "image":
            raise _bad("augment", d.augment, f"augmentation is for image models and {m.model!r} is a "
                       f"{facts.model_modality} model; use --augment off")
        if facts.task == "qa" and d.window_stride(m.max_length) > m.max_length // 2:
            raise _bad("doc_stride", d.doc_stride, f"windows of --max-length={m.max_length} tokens need room "
                       f"for the question besides the shared context; use at most {m.max_length // 2}")
        if facts.max_positions is not None and m.max_length > facts.max_positions:
            raise _bad("max_length", m.max_length, f"{m.model!r} has {facts.max_positions} positions; "
                       f"use at most {facts.max_positions}")
        if facts.image_size is not None and d.image_size != facts.image_size:
            raise _bad("image_size", d.image_size, f"{m.model!r} takes {facts.image_size} x "
                       f"{facts.image_size} images; use --image-size {facts.image_size}")

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> Config:
        raw = dict(raw or {})
        kwargs = {}
        for name in cls.SECTIONS:
            section_cls = type(getattr(cls(), name))
            values = raw.pop(name, None) or {}
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section {name!r} must be a mapping, got {values!r}")
            known = {f.name for f in dataclasses.fields(section_cls)}
            unknown = set(values) - known
            if unknown:
                raise ConfigError(f"{source}: unknown key(s) {sorted(unknown)} in section {name!r}; "
                                  f"known keys: {sorted(known)}")
            kwargs[name] = section_cls(**{k: _coerce(section_cls, k, v) for k, v in values.items()})
        if "run_dir" in raw:
            kwargs["run_dir"] = str(raw.pop("run_dir"))
        if raw:
            raise ConfigError(f"{source}: unknown top-level key(s) {sorted(raw)}; known: "
                              f"{list(cls.SECTIONS) + ['run_dir']}")
        return cls(**kwargs)


@dataclass(frozen=True)
class RunFacts:
    """What the cross-field checks need to know of the model and the data."""
    model_modality: str  # "text" or "image"
    data_modality: str
    num_units: int       # places the partitioner can cut between (models.base)
    train_rows: int
    max_positions: int | None = None  # text: the most tokens the model takes
    image_size: int | None = None     # image: the side its position embeddings are made for
    task: str = "classify"            # or "qa" (data/squad.py)


def describe_run(cfg: Config) -> RunFacts:
    """RunFacts from the model's config.json and the data file, without loading either."""
    model = describe_model(cfg.model.model)
    d = cfg.data
    data = describe_data(d.data)
    val = describe_validation(data, d.val_data) if d.val_data else None
    train_rows = run_sizes(data, val, d.val_fraction, d.train_samples, d.eval_samples)[0]
    return RunFacts(model.modality, data.modality, model.num_units, train_rows, model.max_positions,
                    model.image_size, data.task)


def config_fields() -> Iterator[tuple[str, dataclasses.Field]]:
    """(section, field) for every configurable field, in help order."""
    for section in Config.SECTIONS:
        yield from ((section, f) for f in dataclasses.fields(type(getattr(Config(), section))))


def apply_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A new Config with field=value overrides (flat field names), validated again."""
    raw = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "run_dir":
            raw["run_dir"] = value
            continue
        section = next((s for s, f in config_fields() if f.name == key), None)
        if section is None:
            raise ConfigError(f"unknown setting {key!r}; see `pipetransformer train --help`")
        raw[section][key] = value
    return Config.from_dict(raw)


def _coerce(section_cls, name: str, value):
    """Convert a YAML or keyword value to the field's type as strictly as the flag parser
    would: 1.7 is no int, 2 is no bool; strings such as "1e-4" are parsed."""
    f = {f.name: f for f in dataclasses.fields(section_cls)}[name]
    typ = str(f.type)
    if value in f.metadata["words"]:
        return f.metadata["words"][value]
    try:
        if typ == "bool":
            if isinstance(value, str):
                return parse_on_off(value)
            if isinstance(value, bool) or value in (0, 1):
                return bool(value)
            raise ValueError
        if typ == "str":  # YAML 1.1 reads a bare off / on as a bool
            return ("on" if value else "off") if isinstance(value, bool) else str(value)
        if isinstance(value, bool) or (typ == "int" and isinstance(value, float)):
            raise ValueError
        number = {"int": int, "float": float}[typ](value)
    except (ValueError, TypeError):
        expected = " or ".join([typ, *f.metadata["words"]])
        raise _bad(name, value, f"expected a value of type {expected}") from None
    if not math.isfinite(number):  # nan slips through every range check below and trains to garbage
        raise _bad(name, value, "use a finite number")
    return number


def parse_on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"expected on or off, got {value!r}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error, not the last value."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice; keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> dict:
    """The mapping a YAML config file holds (empty for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config={str(path)!r}: no such file; pass a YAML file path")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config={str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
    if raw is not None and not isinstance(raw, dict):
        raise ConfigError(f"--config={str(path)!r}: the top level must be a mapping of sections")
    return raw or {}


def load_config(path: str | Path) -> Config:
    return Config.from_dict(read_yaml(path), source=str(path))
