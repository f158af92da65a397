"""Feature stores in every format, pairing checks, and block-shuffled batching."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from sparc_core.data import BlockBatcher, FeatureError, FeatureStore, PairedFeatures


@pytest.fixture
def arr() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((100, 8)).astype(np.float32)


def test_npy_safetensors_h5_read_the_same_rows(tmp_path, arr):
    np.save(tmp_path / "a.npy", arr)
    save_file({"features": arr, "ids": np.arange(100, dtype=np.int64)}, str(tmp_path / "a.safetensors"))
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f["emb"] = arr
    rows = np.array([5, 99, 0, 5, 42])
    for path in ("a.npy", "a.safetensors", "a.h5"):
        st = FeatureStore(tmp_path / path)
        assert (st.n_rows, st.dim) == (100, 8)
        np.testing.assert_array_equal(st.read(rows), arr[rows])
        np.testing.assert_array_equal(st.read_range(10, 20), arr[10:20])
        st.close()
    assert isinstance(FeatureStore(tmp_path / "a.npy")._array, np.memmap)
    assert isinstance(FeatureStore(tmp_path / "a.safetensors")._array, np.memmap)
    np.testing.assert_array_equal(FeatureStore(tmp_path / "a.safetensors").ids, np.arange(100))


def test_named_dataset_selection(tmp_path, arr):
    with h5py.File(tmp_path / "b.h5", "w") as f:
        f["x"] = arr
        f["y"] = arr * 2
    with pytest.raises(FeatureError, match=r"name the 2-D dataset to use as FILE:NAME \(found \['x', 'y'\]\)"):
        FeatureStore(tmp_path / "b.h5")
    np.testing.assert_array_equal(FeatureStore(f"{tmp_path / 'b.h5'}:y").read_range(0, 3), arr[:3] * 2)


def test_truncated_safetensors_is_rejected(tmp_path, arr):
    p = tmp_path / "t.safetensors"
    save_file({"features": arr}, str(p))
    p.write_bytes(p.read_bytes()[:-64])
    with pytest.raises(FeatureError, match="runs past the end of the file"):
        FeatureStore(p)


def test_pairing_errors_are_clear(tmp_path, arr):
    np.save(tmp_path / "a.npy", arr)
    np.save(tmp_path / "b.npy", arr[:90])
    with pytest.raises(FeatureError, match="different row counts"):
        PairedFeatures({"a": tmp_path / "a.npy", "b": tmp_path / "b.npy"})
    bad = arr.copy()
    bad[17, 3] = np.nan
    np.save(tmp_path / "c.npy", bad)
    data = PairedFeatures({"a": tmp_path / "a.npy", "c": tmp_path / "c.npy"})
    with pytest.raises(FeatureError, match="row 17 of stream 'c' contains NaN or inf"):
        data.validate()
    with pytest.raises(FeatureError, match="stream 'a' has dim 8, expected 9"):
        PairedFeatures({"a": tmp_path / "a.npy", "c": tmp_path / "c.npy"}).validate(dims={"a": 9, "c": 8})
    with pytest.raises(FeatureError, match="feature file not found"):
        PairedFeatures({"a": tmp_path / "zzz.npy"})
    np.save(tmp_path / "i.npy", np.arange(800).reshape(100, 8))
    with pytest.raises(FeatureError, match="must be floating point"):
        FeatureStore(tmp_path / "i.npy")


def test_ids_are_verified_across_streams(tmp_path, arr):
    np.save(tmp_path / "a.npy", arr)
    np.save(tmp_path / "b.npy", arr)
    np.save(tmp_path / "a.ids.npy", np.arange(100))
    ids = np.arange(100)
    ids[30] = 999
    np.save(tmp_path / "b.ids.npy", ids)
    with pytest.raises(FeatureError, match="differ first at row 30"):
        PairedFeatures({"a": tmp_path / "a.npy", "b": tmp_path / "b.npy"})


def test_block_batcher_is_a_pure_function_of_step():
    rows = np.arange(1000)
    a = BlockBatcher(rows, batch_size=64, block_size=100, shuffle_blocks=2, seed=1)
    b = BlockBatcher(rows, batch_size=64, block_size=100, shuffle_blocks=2, seed=1)
    seq_a = [a.batch(i) for i in range(40)]
    seq_b = [b.batch(i) for i in reversed(range(40))][::-1]  # any access order gives the same batches
    for x, y in zip(seq_a, seq_b):
        np.testing.assert_array_equal(x, y)
    epoch = np.concatenate(seq_a[: a.batches_per_epoch])
    assert len(np.unique(epoch)) == len(epoch) == a.batches_per_epoch * 64  # no row twice in an epoch
    assert not np.array_equal(seq_a[0], seq_a[a.batches_per_epoch])  # reshuffled next epoch
    # Whole blocks move: each window of 2 blocks holds rows from at most 2 distinct blocks.
    order = a._epoch_order(0)
    for start in range(0, 1000, 200):
        assert len(np.unique(order[start : start + 200] // 100)) <= 2


def test_paired_read_keeps_pairing(tmp_path, arr):
    np.save(tmp_path / "a.npy", arr)
    np.save(tmp_path / "b.npy", arr[:, :4] * 3)
    data = PairedFeatures({"a": tmp_path / "a.npy", "b": tmp_path / "b.npy"})
    rows = np.array([9, 3, 77])
    got = data.read(rows)
    np.testing.assert_array_equal(got["b"], got["a"][:, :4] * 3)
    assert torch.from_numpy(got["a"]).shape == (3, 8)


def test_block_batcher_is_exact_when_two_threads_cross_epoch_boundaries():
    # The trainer and the prefetch thread ask for batches of neighbouring steps, so at an epoch boundary
    # they ask for two epochs at once. Force the worst interleaving: the trainer is paused just before
    # it returns epoch 0's order while the prefetcher computes epoch 1; the trainer must still get epoch 0.
    import linecache
    import sys
    import threading

    rows = np.arange(400)
    ref = BlockBatcher(rows, batch_size=20, block_size=50, shuffle_blocks=2, seed=3)
    want_last, want_next = ref.batch(19), ref.batch(20)
    shared = BlockBatcher(rows, batch_size=20, block_size=50, shuffle_blocks=2, seed=3)
    shared.batch(0)  # epoch 0 cached
    paused, resumed = threading.Event(), threading.Event()

    def tracer(frame, event, arg):
        if frame.f_code.co_name != "_epoch_order":
            return None

        def on_line(frame, event, arg):
            line = linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip()
            if event == "line" and line.startswith("return") and not paused.is_set():
                paused.set()
                resumed.wait(1.0)  # a correct batcher keeps the prefetcher out until this returns
            return on_line

        return on_line

    got_next: list[np.ndarray] = []

    def prefetch() -> None:
        paused.wait(5.0)
        got_next.append(shared.batch(20))
        resumed.set()

    helper = threading.Thread(target=prefetch)
    helper.start()
    sys.settrace(tracer)
    try:
        got_last = shared.batch(19)
    finally:
        sys.settrace(None)
    helper.join(10.0)
    assert paused.is_set()
    np.testing.assert_array_equal(got_last, want_last)
    np.testing.assert_array_equal(got_next[0], want_next)
