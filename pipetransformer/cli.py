"""`pipetransformer train | export`. Every config field is a flag; --config reads YAML first.

The launcher checks everything it can before any worker starts (config.validate), takes the
run folder's lock, then trains in this process or starts --nproc workers under torchrun's
elastic agent (restarts: --max-restarts). With --nnodes N the same command runs on each
machine with its --node-rank: the agents meet at --rdzv-endpoint (c10d, hosted by node 0)
and every machine gets the same checks, lock (one per machine), restarts and signals as a
single machine does. Exit codes: 0 done; 2 bad input or a refused
resume; 1 a failure during training; 129 / 130 / 143 stopped by SIGHUP / SIGINT / SIGTERM
(the line printed says how to resume). Nothing imports this module.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

from .commands import COMMANDS, Parser, add_commands, add_config_flags, command_parser, config_from_args, flag_values
from .commands import run as run_command
from .config import Config, ConfigError, apply_overrides, config_fields, read_yaml
from .stopping import STOP_SIGNALS, STOPPED_EXIT_CODES, restore_signals, stop_on_signals, stopping_signal

__all__ = ["main", "build_parser"]

RESUMABLE = {f.name for _, f in config_fields() if f.metadata["resumable"]}  # flags a resume may change
LOCK_HELD = "PIPETRANSFORMER_LOCK_HELD"  # set for workers: their launcher holds the lock
RESUMING = "PIPETRANSFORMER_RESUME"


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pipetransformer", allow_abbrev=False,
                                     description="Fine-tune Transformers faster: AutoFreeze + elastic pipelines.",
                                     epilog="pipetransformer <command> --help: that command's flags")
    sub = parser.add_subparsers(dest="command", required=True)
    train = command_parser(sub, "train", "fine-tune a model (or continue a stopped run)")
    train.add_argument("--run-dir", help="output folder: metrics.jsonl, metrics.png, checkpoints/, final/ "
                       "(default: runs/run-<date>-<time>); an existing run is never overwritten")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the stopped run in RUN_DIR from its "
                       f"newest checkpoint, with its own settings; only {', '.join(sorted(RESUMABLE))} "
                       "may change")
    add_config_flags(train)
    export = sub.add_parser("export", help="write RUN_DIR/final/ from the run's newest checkpoint",
                            allow_abbrev=False)
    export.add_argument("run_dir", metavar="RUN_DIR")
    add_commands(sub)
    return parser


def _config_from_args(args) -> Config:
    if args.resume:
        return _resume_config(args)
    return config_from_args(args, run_dir_default=time.strftime("runs/run-%Y%m%d-%H%M%S"))


def _resume_config(args) -> Config:
    """The stopped run's own config, with only the flags that keep its math."""
    run_dir = Path(args.resume)
    if args.config or args.run_dir:
        raise ConfigError("--resume takes the run's own config.yaml and folder; drop --config and --run-dir")
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise ConfigError(f"--resume={args.resume!r}: no config.yaml there, so it holds no run to "
                          f"continue; pass the folder of a run started with `pipetransformer train`")
    if (run_dir / "summary.json").is_file():
        raise ConfigError(f"--resume={args.resume!r}: that run finished (summary.json, final/); nothing is "
                          f"left to continue and nothing was changed: start a new run with another --run-dir")
    cfg = Config.from_dict(read_yaml(saved), source=str(saved))
    done = _epochs_done(run_dir)
    checkpoints = run_dir / "checkpoints"
    has_checkpoint = checkpoints.is_dir() and any(p.is_dir() for p in checkpoints.glob("step-*"))
    if done and not has_checkpoint:
        raise ConfigError(f"--resume={args.resume!r}: {checkpoints} holds no checkpoint, so the run would "
                          f"start over and overwrite its {done} finished epoch(s); start a new run with another "
                          f"--run-dir (or restore that folder)")
    given = {k: v for k, v in flag_values(args).items() if v is not None}
    for key, value in given.items():
        section = next(s for s, f in config_fields() if f.name == key)
        if key not in RESUMABLE and getattr(getattr(cfg, section), key) != value:
            flag = "--" + key.replace("_", "-")
            raise ConfigError(f"{flag}={value!r} would change the run's math (it has "
                              f"{getattr(getattr(cfg, section), key)!r}); a resume keeps the run's "
                              f"settings: drop {flag}, or start a new run")
    if given.get("keep_checkpoints", 1) == 0 and cfg.checkpoint.keep_checkpoints:
        raise ConfigError("--keep-checkpoints=0 is invalid on a resume: the run's older checkpoints would "
                          "stay, and a later stop or restart would go back to them; keep at least 1")
    p = cfg.parallel
    if p.batch_policy == "per-replica":  # the starting layout sets each replica's batch and the LR
        for key in ("nproc", "nnodes", "stages"):
            if key in given and given[key] != getattr(p, key):
                raise ConfigError(f"--{key}={given[key]}: this run keeps each replica's starting "
                                  f"batch (--batch-policy per-replica), so another layout changes its "
                                  f"math; resume with --{key} {getattr(p, key)}")
    elif (given.get("nproc", p.nproc) * given.get("nnodes", p.nnodes) != p.nproc * p.nnodes
          and "stages" not in given):
        given["stages"] = 0  # the new process count starts as one pipeline, as a new run would
    return apply_overrides(cfg, {**given, "run_dir": str(run_dir)})


def _lock(run_dir: Path, node_rank: int = 0):
    """Hold RUN_DIR/.lock for this run's life (the OS drops it when the process dies, however).
    Each machine of a multi-node run holds its own (.lock-node<R> for node R > 0): the
    machines may share the folder, and two runs still cannot share one."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / (f".lock-node{node_rank}" if node_rank else ".lock"), "a+")
    except OSError as e:
        raise ConfigError(f"--run-dir={str(run_dir)!r} cannot be written ({e.strerror}); pass a "
                          f"folder you can write to") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        raise ConfigError(f"--run-dir={str(run_dir)!r} is in use by another run (pid "
                          f"{handle.read().strip() or '?'}); wait for it to end or pass another "
                          f"--run-dir") from None
    handle.truncate(0)
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _launch(cfg: Config, resuming: bool) -> int:
    """Start --nproc workers, each `train --config <resolved config>`, under torchrun's
    elastic agent; SIGINT / SIGTERM reach every worker, which stop within seconds. With
    --nnodes N the agent first meets the other machines' agents at --rdzv-endpoint."""
    import logging
    import tempfile
    import uuid

    import yaml
    # Several machines: when node 0's launcher (the store's host) ends first, the others' store
    # clients log a warning with a C++ stack before the error that our one line reports. Read
    # when torch loads: the agent's alone, the workers keep torch's warnings.
    quiet = cfg.parallel.nnodes > 1 and "TORCH_CPP_LOG_LEVEL" not in os.environ and "torch" not in sys.modules
    if quiet:
        os.environ["TORCH_CPP_LOG_LEVEL"] = "ERROR"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousClosedError, RendezvousError, RendezvousTimeoutError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    if quiet:
        del os.environ["TORCH_CPP_LOG_LEVEL"]

    for name in list(logging.root.manager.loggerDict):  # each sets its own level: we say what happened
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    p = cfg.parallel
    _use_our_agent(p.nnodes, p.node_rank)
    n = p.nproc
    from .costs import threads_per_process, usable_cores
    os.environ.setdefault("OMP_NUM_THREADS", str(threads_per_process(usable_cores(), n)))
    os.environ[LOCK_HELD] = "1"
    os.environ[RESUMING] = "1" if resuming else ""
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix=f"pipetransformer-{os.getpid()}-", delete=False) as f:
        yaml.safe_dump(cfg.to_dict(), f)
    if p.nnodes > 1:  # one rendezvous id on every machine; node 0 hosts it (and the workers' store)
        launch = LaunchConfig(min_nodes=p.nnodes, max_nodes=p.nnodes, nproc_per_node=n, run_id="pipetransformer",
                              rdzv_backend="c10d", rdzv_endpoint=p.rdzv_endpoint,
                              rdzv_configs={"is_host": p.node_rank == 0, "join_timeout": int(p.comm_timeout)},
                              max_restarts=p.max_restarts, monitor_interval=0.2, shutdown_timeout=5)
    else:
        launch = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=n, run_id=str(uuid.uuid4()),
                              rdzv_backend="c10d", rdzv_endpoint=p.rdzv_endpoint or "localhost:0",
                              max_restarts=p.max_restarts, monitor_interval=0.2, shutdown_timeout=5)
    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    try:
        elastic_launch(launch, sys.executable)("-u", "-m", "pipetransformer", "train", "--config", f.name)
        return 0
    except SignalException as e:
        for sig in handlers:  # the workers are stopped: a second signal must not cut the clean-up short
            signal.signal(sig, signal.SIG_IGN)
        print(_stopped(cfg), file=sys.stderr)
        return 128 + int(e.sigval)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        bad_input = sorted(r for r, f in e.failures.items() if f.exitcode == 2)
        if bad_input:  # the cause; a peer's "connection closed" may have been recorded first
            rank, failure = bad_input[0], e.failures[bad_input[0]]
        if failure.exitcode == 2:  # bad input met by a worker: its line, once
            print(_failure_line(cfg, rank, 2), file=sys.stderr)
            return 2
        if failure.exitcode in STOPPED_EXIT_CODES:  # a worker was signalled on its own
            print(_stopped(cfg), file=sys.stderr)
            return failure.exitcode
        print(_failure_line(cfg, rank, failure.exitcode), file=sys.stderr)
        return 1
    except ConfigError as e:  # the machines' --node-rank values do not fit together
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RendezvousTimeoutError:
        print(f"error: not all {p.nnodes} machines met at --rdzv-endpoint={p.rdzv_endpoint} within "
              f"--comm-timeout={p.comm_timeout:g} s; start the same command on every machine, each with its own "
              f"--node-rank, and check that node 0's port is reachable from each; {_resume_hint(cfg)}",
              file=sys.stderr)
        return 1
    except RendezvousError as e:  # multi-node: another machine's launcher ended (stopped or failed)
        how = "closed" if isinstance(e, RendezvousClosedError) else "went away with node 0's launcher"
        print(f"error: the run ended on another machine (the rendezvous at --rdzv-endpoint={p.rdzv_endpoint} "
              f"{how}); its launcher's line says why; {_resume_hint(cfg)}", file=sys.stderr)
        return 1
    finally:
        os.unlink(f.name)
        for key in (LOCK_HELD, RESUMING):
            os.environ.pop(key, None)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _use_our_agent(nnodes: int, node_rank: int) -> None:
    """torch's LocalElasticAgent with what a run needs changed:

    - torch stops the other workers after a failure with a fixed 30 s grace (its process
      context closes with the default timeout, and LocalElasticAgent._stop_workers ignores
      shutdown_timeout): a stopped (SIGSTOP) peer would hold the run 30 s past its error.
      The configured grace (shutdown_timeout) is used for both.
    - bad input (exit 2) or a stop ends the restarts: a restart would meet it again.
    - several machines: they are numbered by --node-rank (`_number_by_node_rank`); a restart
      that another machine caused counts here too (torch counts it only where a worker
      failed), so every worker of a round sees one TORCHELASTIC_RESTART_COUNT, which keys the
      workers' store (distributed._attempt_store) and says that they resume; a stopped
      launcher closes the rendezvous, so the other machines end instead of waiting to
      restart with it."""
    from torch.distributed.elastic.agent.server import local_elastic_agent
    from torch.distributed.elastic.agent.server.api import DEFAULT_ROLE, WorkerState
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher import api

    class Agent(local_elastic_agent.LocalElasticAgent):
        def _start_workers(self, worker_group):
            started = super()._start_workers(worker_group)
            context, grace = self._pcontext, self._shutdown_timeout
            assert context is not None
            close = context.close
            context.close = lambda death_sig=None, timeout=grace: close(death_sig, min(timeout, grace))  # type: ignore[method-assign]
            return started

        def _stop_workers(self, worker_group) -> None:
            self._shutdown(timeout=self._shutdown_timeout)

        def _shutdown(self, *args, **kwargs) -> None:
            # stopping the workers: a second signal must not cut that short (restored after it,
            # since a restart goes on)
            handlers = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
            try:
                super()._shutdown(*args, **kwargs)
            finally:
                for sig, handler in handlers.items():
                    signal.signal(sig, handler)

        def _monitor_workers(self, worker_group):
            result = super()._monitor_workers(worker_group)
            codes = [f.exitcode for f in (result.failures or {}).values()]
            # bad input or a stop: a restart would meet it again. A worker that died (a signal,
            # an error) makes torch stop its peers with SIGTERM, and their 143 is no stop
            if codes and 2 in codes or codes and all(c in STOPPED_EXIT_CODES for c in codes):
                self._remaining_restarts = 0
            return result

        def _rendezvous(self, worker_group) -> None:
            if nnodes > 1:
                _number_by_node_rank(worker_group.spec.rdzv_handler, node_rank, nnodes)
            super()._rendezvous(worker_group)

        def _restart_workers(self, worker_group) -> None:
            elsewhere = worker_group.state == WorkerState.HEALTHY  # another machine's failure
            if elsewhere and self._remaining_restarts > 0:
                self._remaining_restarts -= 1  # restarts the run: one round for all
            super()._restart_workers(worker_group)  # raises where the run ended meanwhile (a stop elsewhere)
            limit = worker_group.spec.max_restarts
            where = f"machine {node_rank}: " if nnodes > 1 else ""
            print(f"{where}restarted the workers (restart {limit - self._remaining_restarts} of {limit}): a "
                  f"worker {'on another machine' if elsewhere else 'here'} failed; they resume from the last "
                  f"checkpoint", file=sys.stderr, flush=True)

        def run(self, role: str = DEFAULT_ROLE):
            try:
                return super().run(role)
            except SignalException:
                if nnodes > 1:  # stopped: the other machines end too (torch keeps it open for rescaling)
                    try:
                        self._worker_group.spec.rdzv_handler.set_closed()
                    except Exception:  # noqa: BLE001 - node 0's store may be gone already: they end anyway
                        pass
                raise
    api.LocalElasticAgent = Agent  # type: ignore[misc]


def _number_by_node_rank(handler, node_rank: int, nnodes: int) -> None:
    """c10d's rendezvous numbers the machines of a round by host name and process id; a run
    numbers them by --node-rank, so that node 0 (which hosts --rdzv-endpoint) also holds
    global rank 0, which writes the metrics and final/ into its run folder. Each machine
    posts its --node-rank in the round's store and takes it once all are there and they are
    0 to N-1, each once (else every machine stops with the same line)."""
    if getattr(handler, "_pipetransformer_ranked", False):
        return
    position_in_round = handler._get_world

    def world() -> tuple[int, int]:
        position, size = position_in_round()
        store = handler._get_store()  # this round's keys
        store.set(f"pipetransformer-node-rank-{position}", str(node_rank))
        ranks = sorted(int(store.get(f"pipetransformer-node-rank-{i}")) for i in range(size))
        if ranks != list(range(nnodes)):
            raise ConfigError(f"--node-rank={node_rank} (this machine's): the {size} machines that met gave "
                              f"--node-rank {ranks}; give each machine its own, from 0 to {nnodes - 1}")
        return node_rank, size
    handler._get_world = world
    handler._pipetransformer_ranked = True


def _check_endpoint(cfg: Config) -> None:
    """Before a multi-node start: HOST resolves, and on node 0 (which hosts the rendezvous)
    PORT is free."""
    import socket
    endpoint = cfg.parallel.rdzv_endpoint
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    try:
        socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
    except OSError as e:
        raise ConfigError(f"--rdzv-endpoint={endpoint!r}: the host {host!r} cannot be resolved "
                          f"({e.strerror or e}); pass node 0's name or address as every machine reaches it") from None
    if cfg.parallel.node_rank == 0:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("", int(port)))
            except OSError as e:
                raise ConfigError(f"--rdzv-endpoint={endpoint!r}: port {port} cannot be opened on this machine "
                                  f"({e.strerror or e}), and node 0 hosts the rendezvous there; pick a free "
                                  f"port and give the same endpoint to every machine") from None


def _refuse_other_run(cfg: Config) -> None:
    """Node R > 0 does not claim its run folder as node 0 does (refuse_used_run_dir): the
    machines may share one, which node 0 writes to. It refuses a folder that holds a finished
    run, or a run whose config.yaml differs from its own (besides the folder's path and the
    node rank)."""
    run_dir = Path(cfg.run_dir)
    if (run_dir / "final").exists():
        raise ConfigError(f"--run-dir={str(run_dir)!r} already holds a finished run; nothing was "
                          f"overwritten. Pass a new --run-dir or move that folder away")
    saved = run_dir / "config.yaml"
    if saved.is_file():
        theirs, ours = Config.from_dict(read_yaml(saved), source=str(saved)).to_dict(), cfg.to_dict()
        for settings in (theirs, ours):
            settings.pop("run_dir")
            settings["parallel"].pop("node_rank")
        if theirs != ours:
            raise ConfigError(f"--run-dir={str(run_dir)!r} holds another run (its config.yaml has other "
                              f"settings); nothing was overwritten. Pass a new --run-dir, or continue that "
                              f"run with: {_resume_command(cfg)}")


def _check_run_folders(cfg: Config, rank: int) -> None:
    """A worker of a multi-node run, before anything else (collective): whether the machines
    share one run folder. Checkpoints need that: every process writes its own part of one
    (torch.distributed.checkpoint) and rank 0 the manifest that completes it, so in separate
    folders no machine would hold a whole checkpoint to resume or restart from. Separate
    folders work without checkpoints (--keep-checkpoints 0): node 0's gets the metrics, the
    log and final/, each machine's its own data-cache/, cache files and error logs."""
    import uuid

    import torch
    import torch.distributed as dist

    from . import distributed
    _, _, device = distributed.init(cfg.parallel.comm_timeout)
    run_dir, machines = Path(cfg.run_dir), int(os.environ.get("GROUP_WORLD_SIZE", 1))
    token = [uuid.uuid4().hex if rank == 0 else ""]
    failed = ""
    if rank == 0:
        try:  # under torchrun itself no launcher has made the folder
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / f".node-check-{token[0]}").write_text(token[0])
        except OSError as e:
            failed = e.strerror or str(e)
    dist.broadcast_object_list(token, src=0)  # after rank 0 wrote it
    mark = run_dir / f".node-check-{token[0]}"
    deadline = time.monotonic() + 1.0  # a network file system may show a new file a moment late
    while not mark.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    comm = device if device.type == "cuda" else torch.device("cpu")
    shared, written = distributed.min_over_world([int(mark.is_file()), 0 if failed else 1], comm)
    if rank == 0:
        mark.unlink(missing_ok=True)
    if not written:  # every process stops alike
        raise ConfigError(f"--run-dir={cfg.run_dir!r} cannot be written on node 0 ({failed or 'see its line'}); "
                          f"pass a folder you can write to")
    if not shared and cfg.checkpoint.keep_checkpoints:
        raise ConfigError(f"--run-dir={cfg.run_dir!r} is not one folder shared by the {machines} machines, and "
                          f"checkpoints need every machine's part in one folder; put --run-dir on storage that "
                          f"every machine mounts (the same folder for all), or pass --keep-checkpoints 0 (then a "
                          f"stopped run starts over, and --max-restarts needs 0 too)")
    if rank == 0:
        print(f"run folder: {cfg.run_dir}, shared by the {machines} machines" if shared else
              f"run folders: one per machine (not shared): node 0's {cfg.run_dir} gets the metrics, the log and "
              f"final/; each machine keeps its own data-cache/ and cache files; no checkpoints "
              f"(--keep-checkpoints 0), so a stopped run starts over", flush=True)


def _stopped(cfg: Config) -> str:
    """The line a stopped run ends with: where it stopped and how to go on."""
    if (Path(cfg.run_dir) / "config.yaml").is_file():
        done = _epochs_done(Path(cfg.run_dir))
        where = f"during epoch {done + 1}" if done < cfg.train.epochs else "while writing the final model"
    elif cfg.parallel.node_rank:
        where = "(this machine's run folder holds none of the run's state: node 0's does)"
    else:
        where = "before training started"
    return f"stopped {where}; resume with: {_resume_command(cfg)}"


def _resume_command(cfg: Config) -> str:
    """How to continue the run: with several machines, on each, with its own --node-rank (the
    run's config.yaml, written by node 0, says 0)."""
    command = f"pipetransformer train --resume {cfg.run_dir}"
    if cfg.parallel.nnodes > 1:
        command += f" --node-rank {cfg.parallel.node_rank} (on every machine, each with its own --node-rank)"
    return command


def _epochs_done(run_dir: Path) -> int:
    """Epochs a run folder's metrics.jsonl records (one line each)."""
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.is_file() else 0


def _resume_hint(cfg: Config) -> str:
    from .checkpoint import latest
    if not cfg.checkpoint.keep_checkpoints:
        return "checkpoints are off (--keep-checkpoints 0): run it again to start over"
    last = latest(Path(cfg.run_dir))
    where = f"the last checkpoint is {last}" if last else "no checkpoint was written yet"
    return f"{where}; resume with: {_resume_command(cfg)}"


def _train(cfg: Config, resuming: bool) -> int:
    """Train in this process (one process, or one worker of many)."""
    from . import distributed
    from .autocache.store import remove_orphans
    from .engine import Trainer
    previous = stop_on_signals()
    rank = int(os.environ.get("RANK", 0))
    trainer: Trainer | None = None
    try:
        if int(os.environ.get("GROUP_WORLD_SIZE", 1)) > 1:
            _check_run_folders(cfg, rank)
        if distributed.local_rank_world()[0] == 0:  # every machine's own /dev/shm and cache folder
            remove_orphans(Path(cfg.run_dir))
        trainer = Trainer(cfg, resume=resuming)
        trainer.fit()
        return 0
    except BaseException as e:  # noqa: B036 - a signal may surface as any error (DCP wraps it)
        signum = stopping_signal()
        if signum is None and isinstance(e, ConfigError):
            # any rank may meet it (a step's rows); our launcher prints the first failing rank's line
            if not (os.environ.get(LOCK_HELD) and _leave_line(cfg, rank, f"error: {e}")):
                print(f"error: {e}", file=sys.stderr)
            return 2
        if signum is None and isinstance(e, KeyboardInterrupt):
            signum = 2
        if signum is not None:
            if rank == 0 and not os.environ.get(LOCK_HELD):  # under our launcher, it says it
                print(_stopped(cfg), file=sys.stderr)
            return 128 + signum
        # torch.distributed.checkpoint raises a peer's failure during a save (another machine's
        # stop, say) as a CheckpointException, which is a BaseException: a failure like any other
        if not isinstance(e, Exception) and type(e).__name__ != "CheckpointException":
            raise
        return _failed(cfg, rank, e)
    finally:
        if stopping_signal() is not None:  # exiting now: remove files, skip the teardown
            if trainer is not None:
                trainer.cache.close()  # the handler stays until then: a second signal is ignored
            restore_signals(previous)
        else:
            restore_signals(previous)
            if trainer is not None:
                trainer.close()
            distributed.shutdown()


def _failed(cfg: Config, rank: int, e: BaseException) -> int:
    """One line for a failure during training; it heads RUN/error-rank<R>.log, above the
    traceback. Under our launcher the launcher prints the line of the first rank that failed
    (a failure often hits every rank at once), else this process does."""
    import traceback
    text = str(e).splitlines()[0][:1000] if str(e) else ""
    if "timed out" in str(e).lower() or "timeout" in str(e).lower():
        text = (f"a peer process did not answer within --comm-timeout={cfg.parallel.comm_timeout:g} s "
                f"(stopped or dead): {text}")
    log = _error_file(cfg, rank)
    line = f"error (rank {rank}): {type(e).__name__}: {text}; traceback in {log}; {_resume_hint(cfg)}"
    try:
        log.write_text(line + "\n\n" + "".join(traceback.format_exception(e)))
    except OSError:
        line = line.replace(f"; traceback in {log}", "")
    if not os.environ.get(LOCK_HELD):
        print(line, file=sys.stderr)
    return 1


def _error_file(cfg: Config, rank: int) -> Path:
    return Path(cfg.run_dir) / f"error-rank{rank}.log"


def _leave_line(cfg: Config, rank: int, line: str) -> bool:
    """Write a worker's one-line error where the launcher looks; whether it could."""
    try:
        _error_file(cfg, rank).write_text(line + "\n")
        return True
    except OSError:
        return False


def _failure_line(cfg: Config, rank: int, exitcode: int) -> str:
    """What the launcher prints for worker `rank` that ended with `exitcode`."""
    log = _error_file(cfg, rank)
    if exitcode in (1, 2) and log.is_file():
        return log.read_text().split("\n", 1)[0]
    cause = f"died of signal {-exitcode}" if exitcode < 0 else f"ended with exit code {exitcode}"
    return f"error: worker rank {rank} {cause}; {_resume_hint(cfg)}"


def _export(run_dir: Path) -> int:
    from .export import export_final
    lock = _lock(run_dir)  # not while a run (a resume) prunes its checkpoints
    try:
        print(f"wrote {export_final(run_dir)} (Hugging Face format)")
    except OSError as e:
        print(f"error: writing {run_dir / 'final'} failed ({e.strerror or e}); free space or fix "
              f"permissions and run the export again", file=sys.stderr)
        return 1
    finally:
        lock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command in COMMANDS:
        return run_command(args, argv)
    worker = "LOCAL_WORLD_SIZE" in os.environ and "TORCHELASTIC_RUN_ID" in os.environ
    try:
        if args.command == "export":
            return _export(Path(args.run_dir))
        cfg = _config_from_args(args)
        if worker:  # under torchrun: the launcher checked and holds the lock
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
            return _train(cfg, resuming=bool(os.environ.get(RESUMING)) or restarted)
        p = cfg.parallel
        cfg.validate(p.nproc * p.nnodes)
        if p.nnodes > 1:
            _check_endpoint(cfg)
        lock = None if os.environ.get(LOCK_HELD) else _lock(Path(cfg.run_dir), p.node_rank)
        if not args.resume:
            from .recorder import refuse_used_run_dir
            if p.node_rank:
                _refuse_other_run(cfg)
            else:
                refuse_used_run_dir(Path(cfg.run_dir))
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if p.nproc > 1 or p.nnodes > 1:
            return _launch(cfg, resuming=bool(args.resume))
        return _train(cfg, resuming=bool(args.resume))
    finally:
        if lock is not None:
            lock.close()


def entry() -> None:
    """The `pipetransformer` command: main(), then out without the interpreter's teardown,
    which takes 1.3 s once torch and transformers are loaded (every process of a run pays it,
    the launcher after its workers). By then every file is closed and every worker joined."""
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
