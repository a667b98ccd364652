"""`pipetransformer train | plan`: every config field is a flag; --config reads YAML first."""
from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time

from .config import Config, ConfigError, load_config

__all__ = ["main", "apply_overrides", "build_parser"]


def _fields():
    """(section or None, field) for every configurable field, in help order."""
    for section in Config.SECTIONS:
        for f in dataclasses.fields(type(getattr(Config(), section))):
            yield section, f


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipetransformer",
                                     description="Fine-tune Transformers faster: AutoFreeze + elastic pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="fine-tune a model",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    train.add_argument("--config", help="YAML file with sections model, data, train, freeze, "
                       "parallel, cache; flags given here override it")
    train.add_argument("--run-dir", help="output folder: metrics.jsonl, metrics.png, final/ "
                       "(default: runs/run-<date>-<time>); an existing run is never overwritten")
    for section, f in _fields():
        flag = "--" + f.name.replace("_", "-")
        help_text = f"[{section}] {f.metadata['help']} (default: {f.default})"
        if f.type == "bool":
            train.add_argument(flag, type=_on_off, metavar="{on,off}", help=help_text)
        else:
            train.add_argument(flag, type={"int": int, "float": float, "str": str}[f.type],
                               choices=f.metadata.get("choices"), help=help_text)
    return parser


def _on_off(value: str) -> bool:
    if value.lower() in ("on", "true", "yes", "1"):
        return True
    if value.lower() in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {value!r}")


def apply_overrides(cfg: Config, overrides: dict) -> Config:
    """A new Config with field=value overrides (flat field names), validated again."""
    raw = cfg.to_dict()
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "run_dir":
            raw["run_dir"] = value
            continue
        section = next((s for s, f in _fields() if f.name == key), None)
        if section is None:
            raise ConfigError(f"unknown setting {key!r}; see `pipetransformer train --help`")
        raw[section][key] = value
    return Config.from_dict(raw)


def _config_from_args(args) -> Config:
    cfg = load_config(args.config) if args.config else Config()
    values = {f.name: getattr(args, f.name) for _, f in _fields()}
    values["run_dir"] = args.run_dir
    cfg = apply_overrides(cfg, values)
    if not args.run_dir and not (args.config and "run_dir" in (open(args.config).read())):
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
    args = build_parser().parse_args(argv)
    try:
        cfg = _config_from_args(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    under_torchrun = "LOCAL_WORLD_SIZE" in os.environ
    if cfg.parallel.nproc > 1 and not under_torchrun:
        return _launch(cfg)
    if cfg.parallel.nproc > 1 and int(os.environ["LOCAL_WORLD_SIZE"]) != cfg.parallel.nproc:
        print(f"error: --nproc={cfg.parallel.nproc} but torchrun started "
              f"{os.environ['LOCAL_WORLD_SIZE']} local processes; make them agree", file=sys.stderr)
        return 2
    from . import distributed
    from .engine import Trainer
    distributed.raise_on_sigterm()  # torchrun stops peers with SIGTERM: clean up on the way out
    try:
        trainer = Trainer(cfg)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except (ConfigError, ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
