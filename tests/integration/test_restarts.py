"""Restarts that always happen: a worker killed with -9 at any moment of a 2-process run with
`--max-restarts 1` is restarted, and the run ends with the uninterrupted run's weights.

Three moments, each with either rank killed:
- during a checkpoint write: the run folder is watched until the temporary folder of the
  epoch-2 checkpoint (`checkpoints/.tmp-step-*`, renamed once every process wrote its part)
  appears, then the worker is killed;
- during a transition: a `sitecustomize` module put on the workers' PYTHONPATH by this test
  (no package code) holds the chosen rank of the first attempt inside `transition.apply`
  of the second transition (2 stages -> 2 replicas), after the weights and Adam state were
  broadcast and before the new runtime is built, and says so in a file; then it is killed;
- mid-epoch: shortly after epoch 2's first checkpoint (step 2 of 5) appears, while step 3 runs.
Each run must say where it resumed from, which checks that the kill landed where it aimed:
the checkpoint being written, or the transition, leave the run to resume from the
checkpoint before them. Cache files of the killed attempt must be gone at the end.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipetransformer.autocache.store import SHM_DIR

from conftest import assert_same_training, run_cli, with_flags

pytestmark = pytest.mark.integration

# 5 steps an epoch, a checkpoint every 2: samples 32, 64, 80 (epoch 1 ends), 112, 144, 160, ...;
# frozen 0, 4, 6 of 8 blocks: 2 stages x 1 replica, then 1 stage x 2 replicas in epoch 3
ARGS = ["--stages", "all",
        "--freeze", "schedule", "--alpha", "0.5", "--epochs", "3", "--batch-size", "16", "--train-samples", "0",
        "--max-length", "16", "--dropout", "off", "--seed", "3", "--lr", "3e-3", "--checkpoint-every", "2",
        "--nproc", "2", "--cache", "on"]

# pauses RANK of the first attempt in the second transition, after the migration; the file
# named by the variable says it is there
HOOK = textwrap.dedent('''
    import os
    _rank, _marker = os.environ.get("RESTART_TEST_PAUSE", ":").split(":", 1)
    if _rank == os.environ.get("RANK") and os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0":
        import sys
        import time
        import pipetransformer.transition as _transition
        _migrate, _calls = _transition.migrate, []

        def _paused_migrate(*args, **kwargs):
            state = _migrate(*args, **kwargs)
            if sys._getframe(1).f_code.co_name == "_transition":
                _calls.append(1)
                if len(_calls) == 2:
                    open(_marker, "w").write(str(os.getpid()))
                    time.sleep(300)
            return state
        _transition.migrate = _paused_migrate
''')


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_bert, tiny_csv):
    run = tmp_path_factory.mktemp("ref") / "run"
    out = run_cli("train", "--model", str(tiny_bert), "--data", str(tiny_csv), "--run-dir", str(run), *ARGS)
    assert out.returncode == 0, out.stderr[-3000:]
    records = _records(run)
    assert [r["frozen_layers"] for r in records] == [0, 4, 6]
    assert [(r["stages"], r["replicas"]) for r in records] == [(2, 1), (2, 1), (1, 2)]
    return records, load_file(run / "final" / "model.safetensors")


def _workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's workers."""
    from pipetransformer.stopping import descendants
    found = {}
    for pid in descendants(launcher):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
        if ranks and b"TORCHELASTIC_RUN_ID" in b"\0".join(env):
            found[ranks[0]] = pid
    return found


class _Pids(threading.Thread):
    """Every worker pid a launcher had while it ran (the restarted ones too)."""

    def __init__(self, proc: subprocess.Popen):
        super().__init__(daemon=True)
        self.proc, self.seen = proc, set[int]()
        self.start()

    def run(self) -> None:
        while self.proc.poll() is None:
            self.seen.update(_workers(self.proc.pid).values())
            time.sleep(0.1)


# moment -> (what the test waits for, the resume it implies: "(epoch E, step S)")
MOMENTS = {
    "checkpoint-write": (lambda run, marker: any((run / "checkpoints").glob(".tmp-step-000000000160")),
                         "(epoch 2, step 4)"),
    "transition": (lambda run, marker: marker.exists(), "(epoch 2, step 4)"),
    "mid-epoch": (lambda run, marker: (run / "checkpoints" / "step-000000000112" / "manifest.json").exists(),
                  "(epoch 2, step 2)"),
}


@pytest.mark.parametrize("rank", [1, 0])
@pytest.mark.parametrize("moment", list(MOMENTS))
def test_a_worker_killed_at_any_moment_is_restarted_with_the_same_result(tmp_path, tiny_bert, tiny_csv,
                                                                          uninterrupted, moment, rank):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(HOOK if moment == "transition" else "")
    run, marker = tmp_path / "run", tmp_path / "paused"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", RESTART_TEST_PAUSE=f"{rank}:{marker}",
               PYTHONPATH=os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.Popen([sys.executable, "-m", "pipetransformer", "train", "--model", str(tiny_bert), "--data",
                             str(tiny_csv), "--run-dir", str(run), *with_flags(ARGS, "--max-restarts", "1")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    pids = _Pids(proc)
    try:
        reached, resumed_at = MOMENTS[moment]
        deadline, workers = time.time() + 180, {}
        while len(workers) < 2:  # their pids first: the moment may be short
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            workers = _workers(proc.pid)
            time.sleep(0.05)
        while not reached(run, marker):
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.003)
        # mid-epoch: killed at once, within step 3 (a pause here let steps 3 and 4 and their
        # checkpoint pass on a fast machine)
        os.kill(workers[rank], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"killed rank {rank} ({moment}): exit {proc.returncode}\n{err[-3000:]}"
    resumes = re.findall(r"resumed from \S+ (\(epoch \d+, step \d+\))", out)
    assert resumes == [resumed_at], (moment, resumes)  # one restart, from the checkpoint before the moment
    records = _records(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert_same_training(uninterrupted, (records, load_file(run / "final" / "model.safetensors")), tol=1e-6)
    pids.join(5)  # the cache files' names start with their owner's pid (other runs may share the machine)
    left = [f.name for f in SHM_DIR.glob("pipetransformer-*") if int(f.name.split("-")[1]) in pids.seen]
    assert pids.seen >= set(workers.values()) and not left, f"cache files left in {SHM_DIR}: {left}"
    assert not list((run / "cache").glob("*"))
