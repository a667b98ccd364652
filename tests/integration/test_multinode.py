"""Several machines through the project's own launcher, played by two agents on this one:
`train --nnodes 2 --node-rank 0|1 --rdzv-endpoint localhost:PORT --nproc 1` each. The run
starts as a 2-stage pipeline across the "machines" and compresses to 1 stage x 2 replicas;
its per-step losses and final weights equal a one-process run's (fp32, dropout off), with
one run folder shared by the machines and with one folder each. The cache is on, so each
machine fills its own copy (named by its node rank: the two share a host here).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import assert_same_training, run_command, with_flags

pytestmark = pytest.mark.integration

COMMON = ["--stages", "all", "--freeze", "schedule", "--alpha", "0.5", "--epochs", "3", "--batch-size", "32",
          "--train-samples", "0", "--max-length", "16", "--dropout", "off", "--seed", "3",
          "--lr", "3e-3", "--cache", "on"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _two_machines(runs: tuple[Path, Path], model, data, *extra: str) -> list[subprocess.CompletedProcess]:
    """Node 0 and node 1 at once, each with its own run folder argument (the same one or not)."""
    port = _free_port()
    return _together([[sys.executable, "-m", "pipetransformer", "train", "--model", str(model), "--data", str(data),
                       *with_flags(COMMON, "--nproc", "1", "--nnodes", "2", "--node-rank", str(rank),
                                   "--rdzv-endpoint", f"localhost:{port}", "--run-dir", str(run), *extra)]
                      for rank, run in enumerate(runs)])


def _together(commands: list[list[str]]) -> list[subprocess.CompletedProcess]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for command in commands]
    done = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=300)
            done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            proc.kill()
    return done


def _result(run: Path):
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return records, load_file(run / "final" / "model.safetensors")


def _difference(ref, got, names) -> tuple[float, float]:
    """(largest absolute, relative) difference of two runs' final weights `names`."""
    w0, w1 = ref[1], got[1]
    num = sum(float((w1[n] - w0[n]).double().pow(2).sum()) for n in names) ** 0.5
    den = sum(float(w0[n].double().pow(2).sum()) for n in names) ** 0.5
    return max(float((w1[n] - w0[n]).abs().max()) for n in names), num / den


def _cache_files() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob(f"pipetransformer-*-{socket.gethostname()}-node*")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_bert, tiny_csv):
    run = tmp_path_factory.mktemp("ref") / "run"
    out = run_command("train", "--model", str(tiny_bert), "--data", str(tiny_csv), "--run-dir", str(run), *COMMON)
    assert out.returncode == 0, out.stderr[-3000:]
    return _result(run)


def _check(nodes: list[subprocess.CompletedProcess], reference, run: Path) -> None:
    for node in nodes:
        assert node.returncode == 0, node.stdout[-2000:] + node.stderr[-4000:]
    got = _result(run)
    assert [(r["stages"], r["replicas"]) for r in got[0]] == [(2, 1), (2, 1), (1, 2)]
    assert "on each of 2 machines, each filled by its own processes" in nodes[0].stdout
    assert_same_training(reference, got)
    _report(reference, got)


def _report(reference, got) -> None:
    """The measured difference (-s shows it); key biases apart, as assert_same_training has them."""
    names = [n for n in reference[1] if not n.endswith("key.bias")]
    largest, relative = _difference(reference, got, names)
    everything = _difference(reference, got, list(reference[1]))[0]
    print(f"\n2 machines vs 1 process: weights differ by at most {largest:.2e} (relative {relative:.2e}); "
          f"{everything:.2e} with the attention key biases, whose true gradient is zero")


def test_two_machines_sharing_one_run_folder_equal_one_process(tmp_path, tiny_bert, tiny_csv, reference):
    before = _cache_files()
    run = tmp_path / "run"
    nodes = _two_machines((run, run), tiny_bert, tiny_csv, "--keep-checkpoints", "1")
    _check(nodes, reference, run)
    assert "shared by the 2 machines" in nodes[0].stdout
    assert (run / ".lock").is_file() and (run / ".lock-node1").is_file()  # one lock per machine
    assert len(list((run / "checkpoints").glob("step-*"))) == 1  # both machines' parts in one checkpoint
    assert _cache_files() <= before  # each machine removed its own files


def test_two_machines_with_a_run_folder_each_equal_one_process(tmp_path, tiny_bert, tiny_csv, reference):
    runs = (tmp_path / "node0", tmp_path / "node1")
    nodes = _two_machines(runs, tiny_bert, tiny_csv, "--keep-checkpoints", "0")
    _check(nodes, reference, runs[0])
    assert "one per machine (not shared)" in nodes[0].stdout
    # node 1's folder gets what its processes need (the tokenised data), not the run's record
    assert (runs[1] / "data-cache").is_dir()
    assert not any((runs[1] / name).exists() for name in ("metrics.jsonl", "config.yaml", "final"))


def test_separate_run_folders_with_checkpoints_are_refused_on_every_machine(tmp_path, tiny_bert, tiny_csv):
    """A checkpoint's parts would lie on different machines: no one could resume from it."""
    nodes = _two_machines((tmp_path / "node0", tmp_path / "node1"), tiny_bert, tiny_csv)
    for node in nodes:
        lines = [x for x in node.stderr.splitlines() if x.strip()]
        assert node.returncode == 2 and len(lines) == 1, node.stderr[-3000:]
        assert "is not one folder shared by the 2 machines" in lines[0] and "--keep-checkpoints 0" in lines[0]
    assert not (tmp_path / "node0" / "config.yaml").exists()


def test_the_readme_torchrun_command_for_two_machines_works_as_written(tmp_path, tiny_bert, tiny_csv, reference):
    """torchrun itself, as the README shows it per machine (its static rendezvous: ranks follow
    --node-rank), with the project's flags after `-m pipetransformer train` (no --nproc there:
    torchrun reads it as an abbreviation of its own --nproc-per-node)."""
    run, port = tmp_path / "run", _free_port()
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    nodes = _together([[torchrun, "--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1",
                        "--master-addr", "localhost", "--master-port", str(port), "-m", "pipetransformer", "train",
                        "--model", str(tiny_bert), "--data", str(tiny_csv), "--run-dir", str(run), *COMMON]
                       for rank in (0, 1)])
    _check(nodes, reference, run)


def test_two_machines_given_one_node_rank_stop_with_one_line_each(tmp_path, tiny_bert, tiny_csv):
    """Three agents, two of them --node-rank 1 (separate folders, so the folder lock cannot
    tell): every one stops at the rendezvous with the same line, exit 2, before any worker."""
    port = _free_port()
    nodes = _together([[sys.executable, "-m", "pipetransformer", "train", "--model", str(tiny_bert), "--data",
                        str(tiny_csv), *with_flags(COMMON, "--nproc", "1", "--nnodes", "3", "--node-rank", str(rank),
                        "--batch-size", "30", "--rdzv-endpoint", f"localhost:{port}", "--comm-timeout", "60",
                        "--run-dir", str(tmp_path / f"run{i}"))] for i, rank in enumerate((0, 1, 1))])
    for node in nodes:
        lines = [x for x in node.stderr.splitlines() if x.strip()]
        assert node.returncode == 2 and len(lines) == 1, node.stderr[-3000:]
        assert "the 3 machines that met gave --node-rank [0, 1, 1]" in lines[0]
