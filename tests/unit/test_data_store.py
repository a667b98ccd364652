"""Arrays built once per key and memory-mapped (data/store.py)."""
from __future__ import annotations

import numpy as np

from pipetransformer.data.store import cache_key, cached_arrays


def test_chunks_are_concatenated_built_once_and_mapped(tmp_path):
    calls = []

    def build():
        calls.append(1)
        yield {"ids": np.arange(6, dtype=np.int32).reshape(3, 2), "n": np.array([1, 2, 3], np.uint16)}
        yield {"ids": np.arange(6, 10, dtype=np.int32).reshape(2, 2), "n": np.array([4, 5], np.uint16)}

    key = cache_key(path="x.csv", max_length=2)
    first = cached_arrays(tmp_path, key, build)
    again = cached_arrays(tmp_path, key, build)
    assert len(calls) == 1
    assert isinstance(again["ids"], np.memmap) and again["ids"].dtype == np.int32
    np.testing.assert_array_equal(first["ids"], np.arange(10).reshape(5, 2))
    np.testing.assert_array_equal(again["n"], [1, 2, 3, 4, 5])
    assert cache_key(path="x.csv", max_length=3) != key


def test_a_failed_build_leaves_nothing_behind(tmp_path):
    def build():
        yield {"ids": np.zeros(3)}
        raise RuntimeError("tokenizer broke")

    try:
        cached_arrays(tmp_path, "k", build)
    except RuntimeError:
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["k.lock"]
    assert cached_arrays(tmp_path, "k", lambda: iter([{"ids": np.ones(2)}]))["ids"].tolist() == [1.0, 1.0]
