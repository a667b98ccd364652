"""A run never loses its work: a resumed run (from any checkpoint, on another number of
processes), a restarted run (a worker killed with -9) and a run whose final save failed
each end with the weights of an uninterrupted run."""
from __future__ import annotations

import json
import shutil
import tempfile

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_same_training, run_command, with_flags

pytestmark = pytest.mark.integration

COMMON = ["--stages", "all", "--freeze", "schedule", "--alpha", "0.5", "--epochs", "4", "--batch-size", "16",
          "--train-samples", "0", "--max-length", "16", "--dropout", "off", "--seed", "3",
          "--lr", "3e-3", "--cache", "off", "--checkpoint-every", "2", "--keep-checkpoints", "50"]


def _train(run_dir, model, data, *extra):
    out = run_command("train", "--model", str(model), "--data", str(data), "--run-dir", str(run_dir),
                      *with_flags(COMMON, *extra))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    return run_dir


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _stopped_copy(run_dir, dest, checkpoint_index):
    """`run_dir` as it was when its checkpoint number `checkpoint_index` was the newest: later
    checkpoints, final/ and the summary gone (metrics.jsonl may run ahead, as after a crash)."""
    shutil.copytree(run_dir, dest)
    checkpoints = sorted((dest / "checkpoints").glob("step-*"))
    for later in checkpoints[checkpoint_index + 1:]:
        shutil.rmtree(later)
    for name in ("final", "summary.json", "metrics.png"):
        shutil.rmtree(dest / name, ignore_errors=True)
        (dest / name).unlink(missing_ok=True)
    manifest = json.loads((checkpoints[checkpoint_index] / "manifest.json").read_text())
    return dest, (manifest["epoch"], manifest["step"])


def assert_same_end(ref_dir, run_dir, same_layouts=False, epochs=4):
    """Per-step losses and final weights within 1e-6, each epoch once. Across layouts the
    attention key biases are left out (their true gradient is zero: they hold rounding noise
    that another micro-batch split changes, see conftest.assert_same_training)."""
    ref = (_records(ref_dir), load_file(ref_dir / "final" / "model.safetensors"))
    got = (_records(run_dir), load_file(run_dir / "final" / "model.safetensors"))
    assert [r["epoch"] for r in got[0]] == list(range(1, epochs + 1))  # each epoch once
    assert_same_training(ref, got, tol=1e-6, key_biases=same_layouts)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_bert, tiny_csv):
    return _train(tmp_path_factory.mktemp("ref1") / "run", tiny_bert, tiny_csv, "--nproc", "1")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_bert, tiny_csv):
    return _train(tmp_path_factory.mktemp("ref2") / "run", tiny_bert, tiny_csv, "--nproc", "2")


@pytest.mark.parametrize("index, nproc", [(3, "1"), (2, "2")])
def test_resume_of_a_one_process_run_on_any_process_count(tmp_path, one_process, index, nproc):
    stopped, (epoch, step) = _stopped_copy(one_process, tmp_path / "run", index)
    out = run_command("train", "--resume", str(stopped), "--nproc", nproc)
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"resumed from {stopped}/checkpoints/" in out.stdout and f"(epoch {epoch + 1}, step {step})" in out.stdout
    assert_same_end(one_process, stopped, same_layouts=nproc == "1")


def test_two_processes_equal_one_and_resume_on_one(tmp_path, one_process, two_processes):
    assert_same_end(one_process, two_processes)
    stopped, (_, step) = _stopped_copy(two_processes, tmp_path / "run", 6)
    assert step > 0  # mid-epoch, in the 1-stage x 2-replica layout
    out = run_command("train", "--resume", str(stopped), "--nproc", "1")
    assert out.returncode == 0, out.stderr[-4000:]
    assert_same_end(one_process, stopped)


def test_with_dropout_on_a_resumed_run_replays_every_process_s_masks(tmp_path, tiny_bert, tiny_csv, two_processes):
    run = _train(tmp_path / "ref", tiny_bert, tiny_csv, "--nproc", "2", "--dropout", "on")
    moved = load_file(run / "final" / "model.safetensors")
    plain = load_file(two_processes / "final" / "model.safetensors")
    assert any(not torch.allclose(moved[n], plain[n], atol=1e-4) for n in plain)  # dropout drew masks
    stopped, (_, step) = _stopped_copy(run, tmp_path / "run", 6)
    assert step > 0  # mid-epoch, in the 1-stage x 2-replica layout
    out = run_command("train", "--resume", str(stopped), "--nproc", "2")
    assert out.returncode == 0, out.stderr[-4000:]
    assert_same_end(run, stopped, same_layouts=True)


@pytest.mark.parametrize("nproc", ["1", "2"])
def test_a_resume_mid_interval_keeps_what_the_freeze_policy_measured(tmp_path, tiny_bert, tiny_csv, nproc):
    """update-ratio measures from the weights at the interval's start and the LRs since:
    both must come back from the checkpoint, on the same and on another process count."""
    policy = ["--freeze", "adaptive", "--freeze-policy", "update-ratio", "--freeze-threshold", "1e9"]
    run = _train(tmp_path / "ref", tiny_bert, tiny_csv, "--nproc", "2", *policy)
    stopped, (epoch, step) = _stopped_copy(run, tmp_path / "run", 1)
    assert (epoch, step) == (0, 4)  # inside the first interval
    out = run_command("train", "--resume", str(stopped), "--nproc", nproc)
    assert out.returncode == 0, out.stderr[-4000:]
    for ref, got in zip(_records(run)[:-1], _records(stopped)[:-1]):
        assert torch.allclose(torch.tensor(ref["decision"]["values"]), torch.tensor(got["decision"]["values"]),
                              rtol=1e-5)
    assert_same_end(run, stopped, same_layouts=nproc == "2")


def test_a_four_process_run_resumes_on_two(tmp_path, tiny_bert, tiny_csv):
    four = _train(tmp_path / "four", tiny_bert, tiny_csv, "--nproc", "4")
    assert _records(four)[0]["stages"] == 4
    stopped, _ = _stopped_copy(four, tmp_path / "run", 1)
    out = run_command("train", "--resume", str(stopped), "--nproc", "2")
    assert out.returncode == 0, out.stderr[-4000:]
    assert_same_end(four, stopped)  # the uninterrupted run is the four-process one


def _meter_sums(checkpoint) -> dict[str, torch.Tensor]:
    """The AutoFreeze gradient sums a checkpoint holds (every process's share), by name."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    with tempfile.TemporaryDirectory() as scratch:
        dcp_to_torch_save(checkpoint, f"{scratch}/all.pt")
        tensors = torch.load(f"{scratch}/all.pt")
    return {k: v for k, v in tensors.items() if k.startswith("meter.")}


def test_an_adaptive_run_resumes_mid_epoch_on_fewer_processes(tmp_path, tiny_bert, tiny_csv):
    """--freeze adaptive decides from gradient sums accumulated over the epoch: a mid-epoch
    checkpoint holds the sums so far (split by stage in 2 stages x 1 replica, shared out
    over the replicas in 1 x 2), and a resume on one process takes them all back. The
    resumed run's next mid-epoch checkpoint holds the uninterrupted run's sums, and it ends
    with its freeze decisions and weights."""
    extra = ["--nproc", "2", "--freeze", "adaptive", "--epochs", "5"]
    two = _train(tmp_path / "two", tiny_bert, tiny_csv, *extra)
    records = _records(two)
    # the gradient term binds (the cap alone gives 0, 4, 6, 7, 8), and a decision follows 1 x 2
    assert [r["frozen_layers"] for r in records] == [0, 3, 4, 5, 6], records
    assert [(r["stages"], r["replicas"]) for r in records] == [(2, 1)] * 3 + [(1, 2)] * 2
    reference = sorted((two / "checkpoints").glob("step-*"))
    for index, layout in ((0, (2, 1)), (9, (1, 2))):  # epoch 1 and epoch 4, step 2 of 5
        stopped, (epoch, step) = _stopped_copy(two, tmp_path / f"run{index}", index)
        assert step == 2 and (records[epoch]["stages"], records[epoch]["replicas"]) == layout
        assert _meter_sums(reference[index])  # something to restore
        out = run_command("train", "--resume", str(stopped), "--nproc", "1")
        assert out.returncode == 0, out.stderr[-4000:]
        assert f"(epoch {epoch + 1}, step 2) on 1 process(es)" in out.stdout
        # two steps later, still before the decision: the same sums (another layout rounds
        # otherwise: 3e-7 measured; sums lost on a resume differ by 0.66)
        want, got = _meter_sums(reference[index + 1]), _meter_sums(stopped / "checkpoints" / reference[index + 1].name)
        assert got.keys() == want.keys()
        num = sum(float((got[n] - want[n]).double().pow(2).sum()) for n in want) ** 0.5
        den = sum(float(want[n].double().pow(2).sum()) for n in want) ** 0.5
        assert num / den < 1e-5, f"gradient sums differ by {num / den:.2e} (relative)"
        assert_same_end(two, stopped, epochs=5)


def test_resume_refuses_what_would_change_the_math_and_foreign_checkpoints(tmp_path, one_process, tiny_csv):
    stopped, _ = _stopped_copy(one_process, tmp_path / "run", 3)
    before = sorted(p.name for p in (stopped / "checkpoints").iterdir())
    out = run_command("train", "--resume", str(stopped), "--lr", "1e-3")
    assert out.returncode == 2 and "--lr=0.001 would change the run's math" in out.stderr
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    out = run_command("train", "--resume", str(stopped), "--keep-checkpoints", "0")  # older ones would stay
    assert out.returncode == 2 and "--keep-checkpoints=0 is invalid on a resume" in out.stderr
    # the same folder as a new run: refused, with the command that continues it
    out = run_command("train", "--model", "minilm-l6", "--data", str(tiny_csv), "--run-dir", str(stopped))
    assert out.returncode == 2 and f"pipetransformer train --resume {stopped}" in out.stderr
    # a checkpoint made for another data set
    manifest = sorted((stopped / "checkpoints").glob("step-*"))[-1] / "manifest.json"
    raw = json.loads(manifest.read_text())
    raw["fingerprint"]["data"] = "0" * 64
    manifest.write_text(json.dumps(raw))
    out = run_command("train", "--resume", str(stopped))
    assert out.returncode == 2 and "was made with another --data" in out.stderr and "Traceback" not in out.stderr
    # a truncated one: its tensors cut short
    for f in manifest.parent.glob("*.distcp"):
        f.write_bytes(f.read_bytes()[:100])
    raw["fingerprint"] = json.loads((one_process / "checkpoints" / manifest.parent.name / "manifest.json")
                                    .read_text())["fingerprint"]
    manifest.write_text(json.dumps(raw))
    out = run_command("train", "--resume", str(stopped))
    assert out.returncode == 2 and "cannot be read" in out.stderr and "Traceback" not in out.stderr
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == before  # nothing deleted


def test_a_failed_final_save_names_the_checkpoint_and_export_writes_final(tmp_path, tiny_bert, tiny_csv, one_process):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".final-tmp").write_text("in the way")  # saving final/ fails as on a full disk
    out = run_command("train", "--model", str(tiny_bert), "--data", str(tiny_csv), "--run-dir", str(run), *COMMON)
    assert out.returncode == 1 and "the last good checkpoint is" in out.stderr
    assert f"pipetransformer export {run}" in out.stderr and not (run / "final").exists()
    (run / ".final-tmp").unlink()
    out = run_command("export", str(run))
    assert out.returncode == 0, out.stderr[-3000:]
    assert_same_end(one_process, run, same_layouts=True)


def test_without_checkpoints_a_failed_final_save_says_to_run_again(tmp_path, tiny_bert, tiny_csv):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".final-tmp").write_text("in the way")
    common = COMMON[:COMMON.index("--checkpoint-every")]  # its checkpoint flags come last
    out = run_command("train", "--model", str(tiny_bert), "--data", str(tiny_csv), "--run-dir", str(run),
                      *with_flags(common, "--keep-checkpoints", "0", "--epochs", "1"))
    assert out.returncode == 1 and "there is no checkpoint to write it from (--keep-checkpoints 0)" in out.stderr
    assert "run it again to start over" in out.stderr and not (run / "checkpoints").exists()


def _planned(run_dir):
    """(stages, replicas, micro-batches) of each epoch as `plan` computes them from the run's
    own profile.json, its config and the frozen blocks it measured."""
    from pipetransformer.config import load_config
    from pipetransformer.costs import local_hardware, read_profile
    from pipetransformer.planner import simulate
    records, cfg = _records(run_dir), load_config(run_dir / "config.yaml")
    profile = read_profile(run_dir / "profile.json")
    samples = records[0]["steps"] * cfg.train.batch_size  # what the choices read of it: whole batches
    epochs = simulate(profile, local_hardware(profile, 2), cfg, samples, [r["frozen_layers"] for r in records])
    return [(e.stages, e.replicas, e.micro_batches) for e in epochs]


def test_automatic_layout_and_micro_batches_are_the_planners_and_a_resume_keeps_them(tmp_path, tiny_bert,
                                                                                      tiny_csv, one_process,
                                                                                      two_processes):
    """--stages auto and --micro-batches auto (the defaults): rank 0 times the units into the
    run's profile.json, and every epoch's layout and micro-batches are what `plan` computes
    from it; the result is still the one-process run's. A resume prices with that same file
    (timing again could choose another M, and with dropout another M draws other masks)."""
    auto = _train(tmp_path / "auto", tiny_bert, tiny_csv, "--nproc", "2", "--stages", "auto")
    got = [(r["stages"], r["replicas"], r["micro_batches"]) for r in _records(auto)]
    assert got == _planned(auto)
    assert_same_end(one_process, auto)
    # the paper's start (--stages all) with automatic micro-batches: a 2-stage pipeline's M
    pipeline = [(r["stages"], r["replicas"], r["micro_batches"]) for r in _records(two_processes)]
    assert pipeline[0][:2] == (2, 1) and pipeline == _planned(two_processes)
    stopped, (_, step) = _stopped_copy(two_processes, tmp_path / "run", 1)
    out = run_command("train", "--resume", str(stopped), "--nproc", "2")
    assert out.returncode == 0, out.stderr[-4000:]
    assert f"automatic choices priced with {stopped}/profile.json" in out.stdout
    assert [(r["stages"], r["replicas"], r["micro_batches"]) for r in _records(stopped)] == pipeline
    assert_same_end(two_processes, stopped, same_layouts=True)


def _decisions(records):
    return [(r["frozen_layers"], r["stages"], r["replicas"], r["frozen_after"],
             [(d["step"], d["frozen_layers"], d["stages"], d["replicas"]) for d in r["decisions_within"]])
            for r in records]


def test_decisions_inside_epochs_equal_one_process_and_resume_after_a_transition_inside_one(tmp_path, tiny_bert,
                                                                                            tiny_csv):
    """--freeze-every 3 with 5 steps an epoch decides at global steps 3, 6, 9, 12, 15 (inside
    epochs 1 to 3 and at epoch 3's end): the 2-process run re-lays out inside an epoch and
    equals one process; a resume from the checkpoint after such a transition (epoch 1, step
    4: the checkpoint's layout is not the epoch's first) equals the uninterrupted run."""
    every = ["--freeze-every", "3", "--alpha", "0.5"]
    one = _train(tmp_path / "one", tiny_bert, tiny_csv, "--nproc", "1", *every)
    two = _train(tmp_path / "two", tiny_bert, tiny_csv, "--nproc", "2", *every)
    records = _records(two)
    assert [r["steps"] for r in records] == [5] * 4
    within = [(r["epoch"], d["step"]) for r in records for d in r["decisions_within"]]
    assert within == [(1, 3), (2, 1), (2, 4), (3, 2), (4, 3)]
    assert ["decision" in r for r in records] == [False, False, True, False]  # global step 15 only
    first = records[0]["decisions_within"][0]
    assert records[0]["stages"] == 2 and first["frozen_layers"] > 0 and first["transition_seconds"] > 0
    layouts = [(d["stages"], d["replicas"]) for r in records for d in r["decisions_within"]]
    assert (1, 2) in layouts  # compressed inside an epoch
    assert_same_end(one, two)
    stopped, (epoch, step) = _stopped_copy(two, tmp_path / "run", 1)
    assert (epoch, step) == (0, 4)
    out = run_command("train", "--resume", str(stopped), "--nproc", "2")
    assert out.returncode == 0, out.stderr[-4000:]
    assert _decisions(_records(stopped)) == _decisions(records)  # the epoch's start, the decisions in it
    assert_same_end(two, stopped, same_layouts=True)
