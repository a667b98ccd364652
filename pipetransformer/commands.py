"""`pipetransformer profile | plan | bench`: measure a model here, plan a run on other
devices, and compare the paper's ablation side by side. cli.py's one parser takes these
commands' flags from `add_commands` and hands them to `run` here. Like cli.py, this module
imports no torch before a command needs it.

Config fields are flags as in `train` (`--config` reads YAML first); each command takes the
fields that matter to it.
"""
from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import time
from pathlib import Path

from .bench import PRESETS, VARIANTS, Targets, expand_rows, parse_row, row_variant
from .config import (
    Config,
    ConfigError,
    apply_overrides,
    config_fields,
    describe_run,
    parse_on_off,
    read_yaml,
    shown_default,
)
from .costs import Hardware
from .planner import format_prediction, predict
from .stopping import restore_signals, stop_on_signals, stopping_signal

__all__ = ["COMMANDS", "Parser", "add_commands", "run", "command_parser", "add_config_flags", "flag_values",
           "config_from_args"]

COMMANDS = ("profile", "plan", "bench")
_PROFILE_FIELDS = ("model", "data", "max_length", "image_size", "batch_size")
_PLAN_FIELDS = (*_PROFILE_FIELDS, "train_samples", "val_fraction", "val_data", "epochs", "freeze", "alpha",
                "freeze_rule",
                "stages", "elastic", "schedule", "micro_batches", "balance", "batch_policy", "cache",
                "cache_host_fraction", "cache_host_bytes", "cache_device_fraction")


class _StoreOnce(argparse._StoreAction):
    """argparse's store, refusing a flag given twice (argparse keeps the last value)."""

    def __call__(self, parser, namespace, values, option_string=None):
        given = namespace.__dict__.setdefault("_flags_given", {})
        if self.dest in given:
            first, then = (("on" if v else "off") if isinstance(v, bool) else v for v in (given[self.dest], values))
            parser.error(f"{option_string} is given twice ({first}, then {then}); give it once")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


class Parser(argparse.ArgumentParser):
    """argparse with one line for a flag error (argparse prints its usage first), exit 2, and
    a flag given twice refused."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register("action", None, _StoreOnce)
        self.register("action", "store", _StoreOnce)

    def error(self, message: str):
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def add_commands(sub) -> None:
    """profile, plan and bench, added to the command line's subparsers (cli.build_parser)."""
    profile = command_parser(sub, "profile", "time every unit of a model on this machine (forward, backward, "
                       "optimizer step; activation and parameter bytes) and write a profile file for `plan`")
    profile.add_argument("--out", default="profile.json", help="the profile file to write (default: profile.json)")
    profile.add_argument("--processes", type=int, default=1, help="time the units as one of N CPU processes "
                         "of this machine: N - 1 copies of the model train alongside, every process with "
                         "cores/N threads as the launcher gives them (default: 1)")
    profile.add_argument("--busy", action="store_true", help=argparse.SUPPRESS)  # a co-running copy
    add_config_flags(profile, _PROFILE_FIELDS)

    plan = command_parser(sub, "plan", "predict a run's frozen blocks, layouts, micro-batches, cache and epoch "
                    "times on N devices, and its speedups over a1 and a2")
    plan.add_argument("--profile", help="a profile file from `pipetransformer profile` (default: profile "
                      "--model here first)")
    plan.add_argument("--trace", help="frozen blocks per epoch, e.g. 0,2,4,5 (default: the freeze rule, "
                      "assuming its gradient term never binds below the alpha cap)")
    plan.add_argument("--choose-micro-batches", type=_on_off, default=True, metavar="{on,off}",
                      help="pick each layout's micro-batch count by the cost model (off: the trainer's "
                      "rule, --micro-batches or 2 x stages) (default: on)")
    plan.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    for f in dataclasses.fields(Hardware):
        _add_flag(plan, f, f"[hardware] {f.metadata['help']} (default: {f.default})")
    add_config_flags(plan, _PLAN_FIELDS)

    default = PRESETS["default"]
    bench = command_parser(sub, "bench", "run real train runs side by side over seeds: each freeze policy against "
                           "the fastest plain layout and data parallelism trained for fewer epochs (or the paper's "
                           "ablation a1, a2, b, c, d); table, JSON, markdown, plot with the Pareto frontier")
    bench.add_argument("--small", action="store_true", help="the smoke-test preset, a few minutes: the paper's "
                       f"ablation rows {','.join(PRESETS['small'].rows)} (default preset: about 15 minutes a seed "
                       "on 2 idle CPU cores); both set model, data, sample counts, max length, epochs, batch and "
                       "processes, which flags given here override")
    bench.add_argument("--seeds", type=int, help="seeds per configuration: --seed, --seed + 1, ... "
                       f"(default: {default.seeds}, or {PRESETS['small'].seeds} with --small)")
    bench.add_argument("--out", help="output folder (default: runs/bench-<date>-<time>); a finished bench "
                       "is never overwritten, an interrupted one continues")
    bench.add_argument("--configs", help=f"rows to run, of {', '.join(VARIANTS)}; NAME:SETTING=VALUE changes a setting "
                       "(e.g. d-auto:alpha=0.2, d-auto:freeze-every=8); NAME@E trains NAME for E epochs "
                       f"(default: {','.join(default.rows)})")
    bench.add_argument("--train-less", help="a plain row that also runs for 1..epochs-1 epochs, each with its own "
                       "learning-rate schedule: the 'train less' baseline that every freezing row is compared with "
                       f"at equal training time (none: skip; default: {default.train_less}, none with --small)")
    bench.add_argument("--target-row", default=Targets.row, help="the row whose targets are checked "
                       f"(default: {Targets.row}, the default train run)")
    bench.add_argument("--profile", help="a profile file for the planned epoch times (default: profile here)")
    add_config_flags(bench)


def command_parser(sub, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand that takes a YAML --config (train's too: cli.py builds it here)."""
    command = sub.add_parser(name, help=help_text, description=help_text, allow_abbrev=False)
    command.add_argument("--config", help="YAML file with sections model, data, train, freeze, parallel, "
                         "cache, checkpoint; flags given here override it")
    return command


def add_config_flags(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None) -> None:
    for section, f in config_fields():
        if names is None or f.name in names:
            _add_flag(parser, f, f"[{section}] {f.metadata['help']} (default: {shown_default(f)})")


def _add_flag(parser: argparse.ArgumentParser, f: dataclasses.Field, help_text: str) -> None:
    flag = "--" + f.name.replace("_", "-")
    if f.type == "bool":
        # a bare `--compile` means on
        parser.add_argument(flag, type=_on_off, nargs="?", const=True, metavar="{on,off}", help=help_text)
    elif f.metadata.get("words"):
        words = f.metadata["words"]
        parser.add_argument(flag, type=lambda value: _count_or_word(value, words), metavar=f"{{{','.join(words)},N}}",
                            help=help_text)
    else:
        parser.add_argument(flag, type={"int": int, "float": float, "str": str}[str(f.type)],
                            choices=f.metadata.get("choices"), help=help_text)


def _count_or_word(value: str, words: dict[str, int]) -> int:
    if value in words:
        return words[value]
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {', '.join(words)} or a whole number, got {value!r}") from None


def _on_off(value: str) -> bool:
    try:
        return parse_on_off(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def flag_values(args) -> dict:
    """The config fields given as flags (None: not given)."""
    return {f.name: getattr(args, f.name, None) for _, f in config_fields()}


def config_from_args(args, preset: dict | None = None, run_dir_default: str | None = None) -> Config:
    """Config defaults, then a preset's fields, then the --config file, then the flags; the run
    folder is `run_dir_default` unless a flag or the file names one."""
    raw = read_yaml(args.config) if args.config else {}
    merged = apply_overrides(Config(), preset or {}).to_dict()
    for key, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **values}
        elif values is not None:
            merged[key] = values
    cfg = Config.from_dict(merged, source=args.config or "config")
    cfg = apply_overrides(cfg, {**flag_values(args), "run_dir": getattr(args, "run_dir", None)})
    if run_dir_default and not getattr(args, "run_dir", None) and "run_dir" not in raw:
        cfg.run_dir = run_dir_default
    return cfg


def _profile(args) -> int:
    from .costs import format_profile, write_profile
    if args.processes < 1:
        raise ConfigError(f"--processes={args.processes} is invalid: use 1 or more")
    from .profiling import keep_busy, measure
    cfg = config_from_args(args)
    if args.busy:
        keep_busy(cfg)
        return 0
    if Path(args.out).exists():  # checked before minutes of timing, which would replace it
        raise ConfigError(f"--out={args.out!r} exists already; nothing was overwritten: pass another --out "
                          f"or move that file away")
    cfg.check_fit(describe_run(cfg))  # the model's own limits (the rows it times are synthetic)
    profile = measure(cfg, args.processes)
    write_profile(profile, args.out)
    print(format_profile(profile))
    print(f"wrote {args.out}")
    return 0


def _plan(args) -> int:
    import json

    from .config import RunFacts
    from .costs import read_profile
    from .data.sources import describe_data, describe_validation, run_sizes
    cfg = config_from_args(args)
    hardware = Hardware(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Hardware)
                           if getattr(args, f.name) is not None})
    try:
        trace = [int(k) for k in args.trace.split(",")] if args.trace else None
    except ValueError:
        raise ConfigError(f"--trace={args.trace!r} is invalid: give frozen blocks per epoch, e.g. 0,2,4,5") from None
    d = cfg.data
    facts = describe_data(d.data)
    val = describe_validation(facts, d.val_data) if d.val_data else None
    samples = run_sizes(facts, val, d.val_fraction, d.train_samples, 0)[0]
    if args.profile:
        profile = read_profile(args.profile)
    else:
        from .profiling import measure
        cfg.validate(hardware.devices)  # before profiling: the model folder's own limits
        profile = measure(cfg)
    cfg.validate(hardware.devices, RunFacts(profile.modality, profile.modality, len(profile.units), samples))
    prediction = predict(profile, hardware, cfg, samples, trace, args.choose_micro_batches)
    if args.json:
        print(json.dumps(prediction.to_dict()))
    else:
        nodes = f", {hardware.devices // hardware.node_size} machines" if hardware.devices > hardware.node_size else ""
        print(format_prediction(prediction, f"{profile.model} ({profile.device_name} profile), {samples} samples, "
                                f"batch {cfg.train.batch_size}, {hardware.devices} devices{nodes} at speed "
                                f"{hardware.speed:g}, freeze {cfg.freeze.freeze} alpha {cfg.freeze.alpha:.3g}"))
    return 0


def _plain_variant(row: str) -> bool:
    try:
        return parse_row(row)[1] is None and row_variant(row)[0].plain
    except ValueError:
        return False


def _bench(args) -> int:
    from .bench import run_bench
    preset = PRESETS["small" if args.small else "default"]
    cfg = config_from_args(args, preset.config)
    if cfg.parallel.nnodes > 1:
        raise ConfigError(f"--nnodes={cfg.parallel.nnodes} is invalid for bench: its runs start on this machine; "
                          f"drop --nnodes (time a multi-node run with `pipetransformer train --nnodes` on each)")
    configs = ",".join(preset.rows) if args.configs is None else args.configs
    rows = [r.strip() for r in configs.split(",") if r.strip()]
    try:
        for row in rows:
            parse_row(row)
    except ValueError:
        raise ConfigError(f"--configs={configs!r} is invalid: choose from {', '.join(VARIANTS)}, each optionally "
                          f"with :SETTING=VALUE and @EPOCHS (e.g. a2@2, d-auto:alpha=0.2)") from None
    if not rows:
        raise ConfigError("--configs='' is invalid: name at least one row, e.g. a2,d-auto")
    train_less = preset.train_less if args.train_less is None else "" if args.train_less == "none" else args.train_less
    if train_less and not _plain_variant(train_less):
        raise ConfigError(f"--train-less={args.train_less!r} is invalid: name a row without freezing "
                          f"({', '.join(n for n, v in VARIANTS.items() if v.plain)}) or none")
    rows = expand_rows(rows, train_less, cfg.train.epochs)
    seeds = preset.seeds if args.seeds is None else args.seeds
    if seeds < 1:
        raise ConfigError(f"--seeds={seeds} is invalid: run at least 1 seed")
    args.out = args.out or time.strftime("runs/bench-%Y%m%d-%H%M%S")  # the stop line names it
    out = Path(args.out)
    try:
        run_bench(cfg, rows, seeds, out, args.profile, args.command_line, targets=Targets(row=args.target_row),
                  train_less=train_less)
    except RuntimeError as e:  # a train run failed: its log says why
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run(args, argv: list[str]) -> int:
    """Run the command `args` parsed from `argv` (one of COMMANDS): exit 2 with one line on bad
    input."""
    args.command_line = "pipetransformer " + " ".join(argv)
    previous = stop_on_signals()
    try:
        return {"profile": _profile, "plan": _plan, "bench": _bench}[args.command](args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit:
        signum = stopping_signal()
        if signum is None:
            raise
        if not getattr(args, "busy", False):  # a co-running profile copy: its parent says it
            print(_stopped(args, signal.Signals(signum).name), file=sys.stderr)
        return 128 + signum
    finally:
        restore_signals(previous)


def _stopped(args, name: str) -> str:
    """The one line a command stopped by a signal ends with (its child processes have ended)."""
    if args.command == "bench":
        return (f"bench stopped by {name}; its finished runs are in {args.out}: run it again with "
                f"--out {args.out} to go on from them")
    if args.command == "profile":
        return f"profile stopped by {name} before it finished; run it again"
    return f"plan stopped by {name}: run it again"
