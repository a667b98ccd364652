"""Training with the cache equals training without it; a stopped run leaves no cache files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from pipetransformer.autocache.store import SHM_DIR

from conftest import assert_same_training, run_command, with_flags

pytestmark = pytest.mark.integration


ARGS = ["--stages", "all", "--freeze", "schedule", "--alpha", "0.5", "--epochs", "5", "--batch-size", "32",
        "--train-samples", "0", "--max-length", "16", "--dropout", "off", "--seed", "5", "--lr", "3e-3"]


def _left_behind() -> list:
    """Shared-memory cache files whose owner (the pid in the name) is gone: leaked. Files of
    live processes belong to runs still going (other tests running beside this one)."""
    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False
    return [f for f in SHM_DIR.glob("pipetransformer-*") if not alive(int(f.name.split("-")[1]))]


def _run(run_dir, model, data, *extra):
    out = run_command("train", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
                      *with_flags(ARGS, *extra))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert not (run_dir / "cache").exists() and not _left_behind()
    return records, load_file(run_dir / "final" / "model.safetensors")


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_cache_on_equals_cache_off_across_transitions_and_reshards(tmp_path, tiny_bert, tiny_csv, nproc):
    off = _run(tmp_path / "off", tiny_bert, tiny_csv, "--nproc", nproc, "--cache", "off")
    on = _run(tmp_path / "on", tiny_bert, tiny_csv, "--nproc", nproc, "--cache", "on")
    hits = [r["cache_hits"] for r in on[0]]
    assert hits[:2] == [0, 0] and sum(hits[2:]) > 0, hits  # filled at the first frozen level, read later
    assert {r["cache_tier"] for r in on[0][1:]} == {"host"} and all(r["cache_bytes"] > 0 for r in on[0][1:])
    if nproc == "2":
        assert [r["replicas"] for r in on[0]][0] == 1 and on[0][-1]["replicas"] == 2
    assert_same_training(off, on, tol=1e-6, key_biases=True)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_tiny_host_budget_spills_to_disk_with_the_same_result(tmp_path, tiny_bert, tiny_csv, nproc):
    """Two processes map the same files: their budgets bind and rows spill to disk."""
    off = _run(tmp_path / "off", tiny_bert, tiny_csv, "--nproc", nproc, "--cache", "off")
    disk = _run(tmp_path / "disk", tiny_bert, tiny_csv, "--nproc", nproc, "--cache", "on",
                "--cache-host-bytes", "20000")
    assert "disk" in disk[0][-1]["cache_tier"] and sum(r["cache_hits"] for r in disk[0]) > 0
    assert_same_training(off, disk, tol=1e-6, key_biases=True)


def test_a_stopped_run_leaves_no_shared_memory(tmp_path, tiny_bert, tiny_csv):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pipetransformer", "train", "--model", str(tiny_bert),
                             "--data", str(tiny_csv), "--run-dir", str(tmp_path / "run"), *with_flags(ARGS,
                             "--epochs", "400", "--cache", "on", "--cache-host-bytes", "20000")],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mine = f"pipetransformer-{proc.pid}-*"  # a one-process run names its cache by its pid

    def built():
        return list(SHM_DIR.glob(mine)) and list((tmp_path / "run" / "cache").glob("*"))
    try:
        deadline = time.time() + 120
        while not built() and time.time() < deadline:
            assert proc.poll() is None, "the run ended before it built its cache"
            time.sleep(0.2)
        assert built(), "no cache in /dev/shm and on disk after 120 s"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) != 0
    finally:
        proc.kill()
    assert not list(SHM_DIR.glob(mine))
    assert not list((tmp_path / "run" / "cache").glob("*"))
