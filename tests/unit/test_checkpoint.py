"""Checkpoints on one in-process process group: atomic folders, the newest N kept, tensors
back by name, and a manifest that a resume checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipetransformer import checkpoint, distributed
from pipetransformer.errors import ConfigError


@pytest.fixture
def group():
    distributed.init()
    yield
    distributed.shutdown()


def _snapshot(samples: int) -> checkpoint.Snapshot:
    return checkpoint.Snapshot(epoch=samples // 10, step=samples % 10, samples_seen=samples, freeze={"frozen": 1},
                               records=[{"epoch": 1}], partial={}, world=1, stages=1,
                               fingerprint={"model": "m", "num_blocks": 2, "labels": ["0", "1"], "data": "d"})


def test_the_newest_checkpoints_are_kept_complete_and_read_back_by_name(tmp_path, group):
    tensors = {"model.w": torch.arange(6.0).view(2, 3), "optim.w.step": torch.tensor(4.0)}
    for samples in (16, 32, 48):
        tensors["model.w"] += 1
        checkpoint.save(tmp_path, tensors, _snapshot(samples), keep=2)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert kept == ["step-000000000032", "step-000000000048"]  # no temporary folder left either
    newest = checkpoint.latest(tmp_path)
    assert newest is not None and newest.name == kept[-1]
    assert checkpoint.read_manifest(newest) == _snapshot(48)
    wanted = {"model.w": torch.zeros(2, 3), "meter.absent": torch.zeros(1)}
    found = checkpoint.load_tensors(newest, wanted)
    assert set(found) == {"model.w"} and torch.equal(wanted["model.w"], torch.arange(6.0).view(2, 3) + 3)


def test_a_folder_without_its_manifest_is_not_a_checkpoint(tmp_path, group):
    checkpoint.save(tmp_path, {"model.w": torch.ones(2)}, _snapshot(16), keep=3)
    (tmp_path / "checkpoints" / "step-000000000032").mkdir()  # as if a save had died midway
    assert checkpoint.latest(tmp_path).name == "step-000000000016"


def test_a_foreign_checkpoint_is_refused_by_name():
    stored = _snapshot(16).fingerprint
    checkpoint.check_fingerprint("ck", stored, dict(stored))
    with pytest.raises(ConfigError, match="was made with another --model"):
        checkpoint.check_fingerprint("ck", stored, {**stored, "num_blocks": 3})
    with pytest.raises(ConfigError, match="was made with another --data"):
        checkpoint.check_fingerprint("ck", stored, {**stored, "labels": ["a", "b"]})


def test_a_data_file_is_hashed_once_per_version_of_it(tmp_path):
    """The digest is the file's sha256, kept under the data cache by path, size, inode and
    times: a resume does not read a large file again, and a file replaced by a copy of the
    same size and modification time is hashed anew."""
    import hashlib
    import os

    from pipetransformer.checkpoint import _data_digest
    data, cache = tmp_path / "d.csv", tmp_path / "data-cache"
    data.write_bytes(b"text,label\ngood,1\n")
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    assert _data_digest(data, cache) == digest
    [kept] = cache.glob("*/sha256.npy")  # the kept digest is what a second start reads
    np.save(kept, np.full((1, 32), 7, np.uint8))
    assert _data_digest(data, cache) == "07" * 32
    stat = data.stat()
    copy = tmp_path / "copy.csv"  # `cp -p` over it: same size and modification time
    copy.write_bytes(b"text,label\nbad!,0\n")
    os.utime(copy, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(copy, data)
    assert _data_digest(data, cache) == hashlib.sha256(b"text,label\nbad!,0\n").hexdigest()
