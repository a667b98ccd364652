"""Faults and signals: a signal stops every process within seconds with one line (and the run
resumes; a profile's co-running copies and a bench's runs stop too), a killed worker is
restarted from the last checkpoint with the same result, a stopped peer ends the run within
--comm-timeout, one run folder serves one run at a time, and cache files of dead runs are
removed."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pipetransformer.autocache.store import SHM_DIR
from pipetransformer.stopping import descendants

from conftest import assert_same_training, make_vit_folder, run_cli, with_flags

pytestmark = pytest.mark.integration

COMMON = ["--stages", "all", "--freeze", "schedule", "--alpha", "0.2", "--batch-size", "16", "--train-samples", "0",
          "--max-length", "16", "--dropout", "off", "--seed", "3", "--lr", "3e-3", "--checkpoint-every", "2"]


def _spawn(*args: str, new_session: bool = False) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "pipetransformer", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session)


def _start(run_dir, model, data, *extra) -> subprocess.Popen:
    return _spawn("train", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
                      *with_flags(COMMON, *extra))


def _wait_for(condition, proc, seconds=120, output=None):
    """Until `condition()`; fails if `proc` ends first (with its stderr, or `output()` where
    another reader holds it)."""
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, output() if output else proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out waiting"
        time.sleep(0.1)


def _checkpoints(run_dir):
    return sorted((run_dir / "checkpoints").glob("step-*"))


def _samples_saved(run_dir) -> int:
    """Samples seen at the newest checkpoint (0: none yet); older ones are pruned."""
    found = _checkpoints(run_dir)
    return int(found[-1].name.split("-")[1]) if found else 0


def _children(pid):
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _command_line(pid):
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _environ(pid) -> list[str]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:  # gone meanwhile
        return []


def _worker(launcher_pid, rank):
    for pid in _children(launcher_pid):
        if f"RANK={rank}" in _environ(pid):
            return pid
    raise AssertionError(f"no worker of rank {rank} under {launcher_pid}")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


PROGRESS_BAR = re.compile(r"\| *\d+/\d+ \[")  # tqdm's "| 1/5 [00:01<00:04, 1.10s/step]", at any speed


def _lines(text):
    return [line for line in text.replace("\r", "\n").splitlines() if line.strip() and not PROGRESS_BAR.search(line)]


@pytest.mark.parametrize("nproc, sig", [("2", signal.SIGTERM), ("1", signal.SIGINT)])
def test_a_signal_stops_every_process_with_one_line_and_the_run_resumes(tmp_path, tiny_bert, tiny_csv, nproc, sig):
    run = tmp_path / "run"
    proc = _start(run, tiny_bert, tiny_csv, "--epochs", "400", "--nproc", nproc, "--cache", "on")
    _wait_for(lambda: len(_checkpoints(run)) >= 2, proc)
    workers = _children(proc.pid)
    sent = time.time()
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    seconds = time.time() - sent
    assert proc.returncode == 128 + sig, err[-3000:]
    assert seconds < 5, f"took {seconds:.1f} s to stop"
    lines = _lines(err)
    assert len(lines) == 1 and lines[0].startswith("stopped during epoch "), lines
    assert f"resume with: pipetransformer train --resume {run}" in lines[0]
    time.sleep(0.5)
    assert not any(_alive(p) for p in workers)
    ours = {f"pipetransformer-{pid}-" for pid in [*workers, proc.pid]}  # cache files are named by rank 0's pid
    assert not [f for f in SHM_DIR.glob("pipetransformer-*") if any(f.name.startswith(o) for o in ours)]
    assert not list((run / "cache").glob("*"))
    assert not list(Path(tempfile.gettempdir()).glob(f"pipetransformer-{proc.pid}-*.yaml"))  # the launcher's config
    # the stopped run continues from its last checkpoint (its settings: 400 epochs; end it early)
    out = run_cli("train", "--resume", str(run), "--epochs", "2")
    assert out.returncode == 2 and "--epochs=2 would change the run's math" in out.stderr


class _Stderr(threading.Thread):
    """A process's stderr, read line by line as it comes (the pipe may stay open in children
    after the process ends, so it is read here rather than by communicate())."""

    def __init__(self, proc: subprocess.Popen):
        super().__init__(daemon=True)
        self.stream, self.lines = proc.stderr, list[str]()
        self.start()

    def run(self) -> None:
        assert self.stream is not None
        for line in self.stream:
            self.lines.append(line)

    def wait_for(self, prefix: str, proc: subprocess.Popen, seconds: float = 120) -> None:
        _wait_for(lambda: any(line.startswith(prefix) for line in self.lines), proc, seconds,
                  lambda: "".join(self.lines)[-3000:])

    def text(self, seconds: float = 30) -> str:
        self.join(seconds)
        return "".join(self.lines)


def _start_profile(tmp_path, model, data) -> tuple[subprocess.Popen, _Stderr, list[int]]:
    """A 2-process profile (about 20 s on 2 cores), once its co-running copy trains and the
    parent times the units."""
    proc = _spawn("profile", "--processes", "2", "--model", str(model), "--data", str(data), "--batch-size", "512",
                  "--max-length", "40", "--out", str(tmp_path / "profile.json"))
    err = _Stderr(proc)
    err.wait_for("timing ", proc)  # the line says the copies are ready and the timing starts
    copies = _children(proc.pid)
    assert copies and all(_alive(p) for p in copies) and proc.poll() is None, err.text()
    return proc, err, copies


def test_a_signal_stops_a_profile_and_its_co_running_copies(tmp_path, tiny_bert, tiny_csv):
    proc, err, copies = _start_profile(tmp_path, tiny_bert, tiny_csv)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143, err.text()
    lines = _lines(err.text())
    assert len(lines) == 2 and lines[0].startswith("timing "), lines
    assert lines[1] == "profile stopped by SIGTERM before it finished; run it again"
    assert not any(_alive(p) for p in copies) and not (tmp_path / "profile.json").exists()
    assert not list(Path(tempfile.gettempdir()).glob(f"pipetransformer-{proc.pid}-*.yaml"))


def test_a_co_running_profile_copy_ends_when_its_parent_is_killed(tmp_path, tiny_bert, tiny_csv):
    proc, err, copies = _start_profile(tmp_path, tiny_bert, tiny_csv)
    proc.kill()  # no handler runs: the copy must notice by itself
    proc.wait()
    deadline = time.time() + 30
    while any(_alive(p) for p in copies):
        assert time.time() < deadline, "a profile copy outlived its killed parent"
        time.sleep(0.2)
    assert "Traceback" not in err.text()
    assert not list(Path(tempfile.gettempdir()).glob(f"pipetransformer-{proc.pid}-*.yaml"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_signal_stops_a_bench_and_every_process_of_its_run(tmp_path, tiny_bert, tiny_csv, sig):
    """SIGTERM: bench stops its run and says so; SIGKILL: bench is gone at once, and its run
    (in a session of its own) is stopped by the death of its parent."""
    out = tmp_path / "bench"
    proc = _spawn("bench", "--small", "--model", str(tiny_bert), "--data", str(tiny_csv), "--max-length", "16",
                  "--train-samples", "0", "--eval-samples", "0", "--configs", "a2", "--epochs", "400",
                  "--out", str(out))
    err = _Stderr(proc)
    _wait_for(lambda: list(out.glob("runs/a2-seed*/config.yaml"))  # training has begun
              and any("RANK=1" in _environ(p) for p in descendants(proc.pid)), proc, 180, err.text)
    processes = descendants(proc.pid)
    sent = time.time()
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == (143 if sig == signal.SIGTERM else -9), err.text()
    deadline = sent + 15
    while any(_alive(p) for p in processes):
        assert time.time() < deadline, "a process of the bench's run outlived it"
        time.sleep(0.2)
    [log] = (out / "logs").glob("a2-seed*.log")
    assert "stopped during epoch" in log.read_text()
    if sig == signal.SIGTERM:
        assert time.time() - sent < 10
        assert _lines(err.text()) == [f"bench stopped by SIGTERM; its finished runs are in {out}: run it again "
                                      f"with --out {out} to go on from them"]


def test_a_killed_worker_restarts_from_the_last_checkpoint_with_the_same_result(tmp_path, tiny_bert, tiny_csv):
    args = ["--epochs", "6", "--nproc", "2", "--cache", "off"]
    ref = run_cli("train", "--model", str(tiny_bert), "--data", str(tiny_csv), "--run-dir", str(tmp_path / "ref"),
                  *with_flags(COMMON, *args))
    assert ref.returncode == 0, ref.stderr[-3000:]
    run = tmp_path / "run"
    proc = _start(run, tiny_bert, tiny_csv, *args, "--max-restarts", "1")
    _wait_for(lambda: _samples_saved(run) >= 48, proc)  # three checkpoints in (of 16 rows each)
    os.kill(_worker(proc.pid, 1), signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "resumed from" in out
    assert "restarted the workers (restart 1 of 1): a worker here failed; they resume from the last checkpoint" in err
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, 7))
    ref_records = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    assert_same_training((ref_records, load_file(tmp_path / "ref" / "final" / "model.safetensors")),
                         (records, load_file(run / "final" / "model.safetensors")), tol=1e-6)


def test_a_stopped_peer_ends_the_run_within_the_comm_timeout(tmp_path, tiny_bert, tiny_csv):
    run = tmp_path / "run"
    proc = _start(run, tiny_bert, tiny_csv, "--epochs", "400", "--nproc", "2", "--comm-timeout", "5")
    _wait_for(lambda: len(_checkpoints(run)) >= 1, proc)
    peer = _worker(proc.pid, 1)
    os.kill(peer, signal.SIGSTOP)
    stopped = time.time()
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if _alive(peer):
            os.kill(peer, signal.SIGKILL)
    assert proc.returncode == 1
    assert time.time() - stopped < 5 + 15  # the timeout, then at most the workers' 5 s grace and start-up noise
    lines = _lines(err)
    assert len(lines) == 1 and "did not answer within --comm-timeout=5 s" in lines[0], lines
    assert f"resume with: pipetransformer train --resume {run}" in lines[0]


def test_one_run_folder_serves_one_run_at_a_time(tmp_path, tiny_bert, tiny_csv):
    run = tmp_path / "run"
    first = _start(run, tiny_bert, tiny_csv, "--epochs", "400")
    try:
        _wait_for(lambda: (run / "config.yaml").exists(), first)
        start = time.time()
        second = run_cli("train", "--resume", str(run))
        assert second.returncode == 2 and "is in use by another run" in second.stderr
        assert time.time() - start < 10
    finally:
        first.kill()
        first.wait()


def test_cache_files_of_dead_runs_are_removed_at_start(tmp_path, tiny_bert, tiny_csv):
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is gone
    orphan = SHM_DIR / f"pipetransformer-{dead.pid}-1-{socket.gethostname()}-host.bin"
    orphan.write_bytes(b"\0" * 64)
    alive = SHM_DIR / f"pipetransformer-{os.getpid()}-1-{socket.gethostname()}-host.bin"
    alive.write_bytes(b"\0" * 64)
    try:
        out = run_cli("train", "--model", str(tiny_bert), "--data", str(tiny_csv), "--run-dir", str(tmp_path / "r"),
                      *with_flags(COMMON, "--epochs", "1"))
        assert out.returncode == 0, out.stderr[-3000:]
        assert not orphan.exists() and alive.exists()
    finally:
        orphan.unlink(missing_ok=True)
        alive.unlink(missing_ok=True)


def test_bad_input_found_by_the_workers_is_printed_once(tmp_path, tiny_bert):
    """A broken image only shows when the workers decode it: both fail, one line, exit 2."""
    import numpy as np
    from PIL import Image
    vit = make_vit_folder(tmp_path / "vit")
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    (tmp_path / "imgs" / "b" / "4.png").write_bytes(b"not an image")
    out = run_cli("train", "--model", str(vit), "--data", str(tmp_path / "imgs"), "--image-size", "16",
                  "--batch-size", "4", "--nproc", "2", "--run-dir", str(tmp_path / "run"))
    lines = _lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert "4.png cannot be read" in lines[0] and "Traceback" not in out.stderr


def _random_images(folder: Path, per_class: int) -> str:
    """An image folder of two classes of random 16 x 16 grey PNGs."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (16, 16), np.uint8)).save(folder / c / f"{i}.png")
    return str(folder)


def test_bad_input_met_by_one_rank_alone_is_printed_once(tmp_path):
    """A truncated image that only replica 1 reads (in its first step): rank 0 never sees it,
    yet its line reaches the user, once, exit 2."""
    from pipetransformer.autodp import replica_rows
    from pipetransformer.data.sampler import BatchSampler
    from pipetransformer.data.sources import describe_data, image_files, stratified_split
    vit = make_vit_folder(tmp_path / "vit")
    data = _random_images(tmp_path / "imgs", per_class=16)
    train_rows = stratified_split(describe_data(data).labels, 0.1, 0)[0]  # the run's split (seed 0)
    order = BatchSampler(len(train_rows), 0).epoch_order(0)
    victim = image_files(tmp_path / "imgs")[0][train_rows[int(replica_rows(order, 0, 4, 1, 2)[0])]]
    victim.write_bytes(victim.read_bytes()[:60])  # the header opens; the pixels are cut off
    out = run_cli("train", "--model", str(vit), "--data", data, "--image-size", "16", "--batch-size", "4",
                  "--nproc", "2", "--stages", "1", "--epochs", "1", "--run-dir", str(tmp_path / "run"))
    lines = _lines(out.stderr)
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-3000:]
    assert f"{victim.name} cannot be read" in lines[0] and "Traceback" not in out.stderr


def test_a_stop_sent_to_the_whole_group_ends_an_image_run_with_its_line_alone(tmp_path):
    """torchrun's agent stops a worker by signalling its process group: the worker's image
    loader processes die with it. That is no loader failure, and a stop that lands inside a
    finalizer (where Python swallows the SystemExit) still stops the run: exit 143, one line,
    each time (before: tracebacks in about half the tries, or a run that went on)."""
    vit, data = make_vit_folder(tmp_path / "vit"), _random_images(tmp_path / "imgs", per_class=32)
    for attempt in range(2):
        run = tmp_path / f"run{attempt}"
        proc = _spawn("train", "--model", str(vit), "--data", data, "--image-size", "16", "--batch-size", "4",
                      "--epochs", "400", "--loader-workers", "2", "--run-dir", str(run), new_session=True)
        _wait_for(lambda m=run / "metrics.jsonl": m.exists() and m.read_text(), proc)  # an epoch in
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        lines = _lines(err)
        assert proc.returncode == 143 and len(lines) == 1 and lines[0].startswith("stopped during epoch 2"), err
