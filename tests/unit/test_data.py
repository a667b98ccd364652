"""Data: the stratified split and its sizes, what the launcher reads of a data set, and the
image augmentation's draw."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from pipetransformer.data.augment import crop_flip
from pipetransformer.data.sources import describe_data, encode_labels, split_sizes, stratified_split
from pipetransformer.errors import ConfigError

from conftest import make_csv


def test_stratified_split_holds_out_each_class_share_and_is_seeded():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 5)
    train, val = stratified_split(labels, 0.1, seed=0)
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(45))
    assert [int((labels[val] == c).sum()) for c in (0, 1, 2)] == [3, 1, 1]  # ceil per class
    again = stratified_split(labels, 0.1, seed=0)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert not np.array_equal(train, stratified_split(labels, 0.1, seed=1)[0])


def test_split_sizes_match_the_split_and_the_limits():
    labels = np.array([0] * 30 + [1] * 10 + [2] * 5)
    train, val = stratified_split(labels, 0.2, seed=0)
    assert split_sizes(labels, 0.2, 0, 0) == (len(train), len(val)) == (36, 9)
    assert split_sizes(labels, 0.2, 20, 4) == (20, 4)
    assert split_sizes(labels, 0.2, 100, 100) == (36, 9)


def test_labels_sort_numbers_numerically_then_names():
    ids, names = encode_labels(["10", "2", "cat", "2", "-1"], "x")
    assert names == ["-1", "2", "10", "cat"] and ids.tolist() == [2, 1, 3, 1, 0]
    with pytest.raises(ConfigError, match="at least 2"):
        encode_labels(["a", "a"], "x")


def test_describe_reads_rows_and_labels_of_every_kind(tmp_path):
    csv = describe_data(str(make_csv(tmp_path / "r.csv", rows=20)))
    assert (csv.modality, len(csv.labels), csv.label_names) == ("text", 20, ["0", "1"])
    np.savez(tmp_path / "a.npz", x=np.zeros((6, 4, 4)), y=np.array([0, 1, 2] * 2))
    npz = describe_data(str(tmp_path / "a.npz"))
    assert (npz.modality, npz.label_names) == ("image", ["0", "1", "2"])
    from PIL import Image
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "imgs" / c / "0.png")
    assert describe_data(str(tmp_path / "imgs")).label_names == ["cat", "dog"]
    rt = describe_data("rotten-tomatoes")
    assert len(rt.labels) == 8530 and rt.label_names == ["0", "1"]


@pytest.mark.parametrize("make, words", [
    (lambda p: p.write_text("text,sentiment\ngood,1\n"), ["lacks column", "label"]),
    (lambda p: np.savez(p, images=np.zeros((4, 8, 8))), ["arrays named x"]),
])
def test_describe_names_what_a_file_lacks(tmp_path, make, words):
    path = tmp_path / ("bad.csv" if "column" in words[0] else "bad.npz")
    make(path)
    with pytest.raises(ConfigError) as e:
        describe_data(str(path))
    assert all(w in str(e.value) for w in words)
    with pytest.raises(ConfigError, match="not a built-in name"):
        describe_data(str(tmp_path / "missing.csv"))


def test_crop_flip_depends_only_on_seed_epoch_and_row():
    x = torch.randn(4, 3, 12, 12)
    rows = torch.tensor([7, 2, 9, 4])
    a = crop_flip(x, rows, 10, epoch=1, seed=3)
    assert a.shape == x.shape and not torch.allclose(a, x)
    assert torch.equal(a, crop_flip(x, rows, 10, epoch=1, seed=3))
    # the same row in another batch, at another position, gets the same augmentation
    assert torch.equal(a[2:3], crop_flip(x[2:3], rows[2:3], 10, epoch=1, seed=3))
    assert not torch.allclose(a, crop_flip(x, rows, 10, epoch=2, seed=3))
    # with the whole image kept, each image is either itself or its mirror, about half each
    whole = crop_flip(x.repeat(25, 1, 1, 1), torch.arange(100), 100, epoch=0, seed=0, min_side=1.0)
    same = torch.isclose(whole, x.repeat(25, 1, 1, 1), atol=1e-5).flatten(1).all(1)
    mirrored = torch.isclose(whole, x.repeat(25, 1, 1, 1).flip(-1), atol=1e-5).flatten(1).all(1)
    assert bool((same ^ mirrored).all()) and 30 < int(mirrored.sum()) < 70
