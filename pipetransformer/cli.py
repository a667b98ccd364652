"""`pipetransformer train`: every config field is a flag; --config reads YAML first.

The launcher checks everything it can before any worker starts (config.validate), then runs
one process itself or re-runs under torchrun with --nproc local processes. Nothing imports
this module.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from .config import Config, ConfigError, apply_overrides, config_fields, parse_on_off, read_yaml

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipetransformer", allow_abbrev=False,
                                     description="Fine-tune Transformers faster: AutoFreeze + elastic pipelines.",
                                     epilog="also: profile, plan, bench (pipetransformer <command> --help)")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model", allow_abbrev=False)
    train.add_argument("--config", help="YAML file with sections model, data, train, freeze, "
                       "parallel, cache; flags given here override it")
    train.add_argument("--run-dir", help="output folder: metrics.jsonl, metrics.png, final/ "
                       "(default: runs/run-<date>-<time>); an existing run is never overwritten")
    for section, f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f"[{section}] {f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            train.add_argument(flag, type=_on_off, metavar="{on,off}", help=help_text)
        else:
            train.add_argument(flag, type={"int": int, "float": float, "str": str}[str(f.type)],
                               choices=f.metadata.get("choices"), help=help_text)
    return parser


def _on_off(value: str) -> bool:
    try:
        return parse_on_off(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _config_from_args(args) -> Config:
    raw = read_yaml(args.config) if args.config else {}
    cfg = Config.from_dict(raw, source=args.config or "config")
    values = {f.name: getattr(args, f.name) for _, f in config_fields()}
    values["run_dir"] = args.run_dir
    cfg = apply_overrides(cfg, values)
    if not args.run_dir and "run_dir" not in raw:
        cfg.run_dir = time.strftime("runs/run-%Y%m%d-%H%M%S")
    return cfg


def _launch(cfg: Config) -> int:
    """Re-run as `train --config <resolved config>` under torchrun with --nproc local processes.

    The resolved config travels as a file: torchrun would otherwise claim flags such as
    --nproc that prefix its own.
    """
    import tempfile

    import yaml

    n = cfg.parallel.nproc
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="pipetransformer-", delete=False) as f:
        yaml.safe_dump(cfg.to_dict(), f)
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "pipetransformer", "train", "--config", f.name]
        return subprocess.call(cmd, env=env)
    finally:
        os.unlink(f.name)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .commands import COMMANDS  # profile, plan, bench: no torch either
    from .commands import main as run_command
    if argv and argv[0] in COMMANDS:
        return run_command(argv)
    args = build_parser().parse_args(argv)
    under_torchrun = "LOCAL_WORLD_SIZE" in os.environ
    try:
        cfg = _config_from_args(args)
        if under_torchrun and int(os.environ["LOCAL_WORLD_SIZE"]) != cfg.parallel.nproc:
            raise ConfigError(f"--nproc={cfg.parallel.nproc} but torchrun started "
                              f"{os.environ['LOCAL_WORLD_SIZE']} local processes; make them agree")
        if not under_torchrun:  # the launcher checks; workers check again on what they load
            cfg.validate(cfg.parallel.nproc)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.parallel.nproc > 1 and not under_torchrun:
        return _launch(cfg)
    from . import distributed
    from .engine import Trainer
    distributed.raise_on_sigterm()  # torchrun stops peers with SIGTERM: clean up on the way out
    try:
        trainer = Trainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
