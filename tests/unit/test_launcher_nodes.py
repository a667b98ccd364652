"""Multi-node launcher rules that need no processes: one lock per machine, what node R > 0
accepts as its run folder, what a resume may change, and cache files named per machine.
(The runs themselves: tests/integration/test_multinode.py.)"""
from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from pipetransformer.autocache.store import SHM_DIR, ActivationCache, remove_orphans
from pipetransformer.cli import _lock, _refuse_other_run, _resume_command, _resume_config, build_parser
from pipetransformer.config import Config, ConfigError, apply_overrides


def _cfg(run: Path, **overrides) -> Config:
    return apply_overrides(Config(), {"run_dir": str(run), "nnodes": 2, "rdzv_endpoint": "node0:29500", **overrides})


def test_each_machine_holds_its_own_lock_and_two_runs_still_exclude_each_other(tmp_path):
    node0, node1 = _lock(tmp_path, 0), _lock(tmp_path, 1)  # two machines sharing the folder
    try:
        for rank in (0, 1):  # another run's machine of either rank is refused
            with pytest.raises(ConfigError, match="is in use by another run"):
                _lock(tmp_path, rank)
    finally:
        node0.close()
        node1.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", ".lock-node1"]


def test_node_r_takes_a_folder_node_0_already_writes_but_not_another_run(tmp_path):
    ours = _cfg(tmp_path / "run", node_rank=1)
    _refuse_other_run(ours)  # empty or absent: fine
    (tmp_path / "run").mkdir()
    # node 0 wrote its config (node rank 0; the same share mounted elsewhere: another path)
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(_cfg("/mnt/elsewhere/run").to_dict()))
    _refuse_other_run(ours)
    with pytest.raises(ConfigError, match="holds another run"):
        _refuse_other_run(_cfg(tmp_path / "run", node_rank=1, lr=0.5))
    (tmp_path / "run" / "final").mkdir()
    with pytest.raises(ConfigError, match="already holds a finished run"):
        _refuse_other_run(ours)


def test_a_resume_may_change_the_machines_and_says_how_to_resume_on_each(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(_cfg(run, nproc=2).to_dict()))
    args = build_parser().parse_args(["train", "--resume", str(run), "--node-rank", "1",
                                      "--rdzv-endpoint", "other:1234"])
    cfg = _resume_config(args)
    assert (cfg.parallel.node_rank, cfg.parallel.rdzv_endpoint) == (1, "other:1234")
    assert cfg.parallel.stages == 0
    assert _resume_command(cfg) == (f"pipetransformer train --resume {run} --node-rank 1 (on every machine, "
                                    f"each with its own --node-rank)")
    one = _resume_config(build_parser().parse_args(["train", "--resume", str(run), "--nnodes", "1",
                                                    "--stages", "2"]))
    assert one.parallel.nnodes == 1 and _resume_command(one) == f"pipetransformer train --resume {run}"


def test_cache_files_carry_the_machine_and_only_this_hosts_dead_ones_go(tmp_path, monkeypatch):
    """Two "machines" of one run on one host (the integration test's set-up) name their files
    apart; orphan clean-up reads process ids only in files of this host."""
    names = []
    for node in (0, 1):
        monkeypatch.setenv("GROUP_RANK", str(node))
        monkeypatch.setenv("GROUP_WORLD_SIZE", "2")
        cache = ActivationCache(4, (2,), torch.float32, "run-1", tmp_path / "cache", 10**6, torch.device("cpu"), 0,
                                0, lambda: None)
        cache.open_level(1)
        names.append(sorted(p.name for p in SHM_DIR.glob(cache.prefix + "*")))
        cache.close()
    assert names[0] and names[1] and not set(names[0]) & set(names[1])
    assert all(f"-{socket.gethostname()}-node{n}-" in name for n in (0, 1) for name in names[n])
    dead = subprocess.Popen(["true"])
    dead.wait()
    here = SHM_DIR / f"pipetransformer-{dead.pid}-run-2-{socket.gethostname()}-node1-host.bin"
    there = SHM_DIR / f"pipetransformer-{dead.pid}-run-2-another-host-node0-host.bin"
    for path in (here, there):
        path.write_bytes(b"\0")
    try:
        assert remove_orphans(tmp_path) == [here] and there.exists()
    finally:
        here.unlink(missing_ok=True)
        there.unlink(missing_ok=True)
