"""The loader that runs ahead (a background thread) and the vectorised blend: same batches, exact positions."""

from __future__ import annotations

import json
import threading
import time
import traceback

import numpy as np
import pytest
import torch

from megatrain.data.dataset import TokenLoader, blend_picks
from megatrain.data.errors import DataError
from megatrain.data.prefetch import Prefetcher, run_ahead
from tests.unit.data_calls import run_check_data
from tests.unit.test_data_loader import config, data, loader  # noqa: F401 - data: its prepared-sets fixture


@pytest.fixture(scope="module")
def sets(data):  # noqa: F811 - the imported fixture, requested
    return data


def greedy_loop(weights: np.ndarray, samples: int, counts: list[int], n: int) -> np.ndarray:
    """The blend as it was written before it was vectorised: one argmax per sample."""
    counts, out = list(counts), np.empty(n, dtype=np.int64)
    for i in range(n):
        samples += 1
        d = int(np.argmax(weights * samples - np.asarray(counts)))
        out[i] = d
        counts[d] += 1
    return out


class LoopLoader(TokenLoader):
    """The loader with the per-sample loop it had before: the reference order."""

    def _assign(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        datasets, indices = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        picks = greedy_loop(self.weights, self.samples, self.counts, n)
        for i, d in enumerate(picks):
            self.samples += 1
            datasets[i], indices[i] = d, self.counts[d]
            self.counts[d] += 1
        return datasets, indices


def as_loop_loader(ld: TokenLoader) -> LoopLoader:
    ref = LoopLoader.__new__(LoopLoader)
    ref.__dict__.update(ld.fork().__dict__)
    return ref


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("weights", [(0.6, 0.4), (0.7, 0.3), (1, 1), (3, 1)])
def test_the_blended_sample_order_is_the_one_of_the_per_sample_loop(sets, weights):
    a, b = sets
    cfg = config(a, document_mask=True, blend=[f"{a}:{weights[0]}", f"{b}:{weights[1]}"])
    new, old = loader(cfg, mbs=3, dp=2, rank=1), as_loop_loader(loader(cfg, mbs=3, dp=2, rank=1))
    for _ in range(60):  # past the end of an epoch of the smaller set
        assert same(new.next_batch(), old.next_batch())
        assert new.state_dict() == old.state_dict()


def test_blend_picks_equal_the_loop_for_many_sets_weights_and_positions():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n_sets = int(rng.integers(2, 7))
        weights = np.full(n_sets, 1 / n_sets) if trial % 4 == 0 else rng.random(n_sets) ** 3 + 1e-3
        weights = weights / weights.sum()  # as parse_blend gives them
        start = int(rng.integers(0, 3000))
        counts = np.bincount(greedy_loop(weights, 0, [0] * n_sets, start), minlength=n_sets).tolist()
        n = int(rng.integers(1, 700))
        np.testing.assert_array_equal(blend_picks(weights, start, counts, n), greedy_loop(weights, start, counts, n))


@pytest.mark.parametrize("blend", [False, True])
def test_prefetched_batches_and_saved_positions_are_those_of_the_plain_loader(sets, blend):
    a, b = sets
    cfg = config(a, document_mask=True, blend=[f"{a}:0.6", f"{b}:0.4"] if blend else [])
    plain = loader(cfg, mbs=3)
    with Prefetcher(loader(cfg, mbs=3), depth=2) as ahead:
        for _ in range(5):
            assert same(ahead.next_batch(), plain.next_batch())
        time.sleep(0.2)  # let the thread fill its queue: the saved position must not count those batches
        state = ahead.state_dict()
        assert state == plain.state_dict() and ahead.seen() == plain.seen()
        expected = [plain.next_batch() for _ in range(4)]
        assert all(same(ahead.next_batch(), want) for want in expected)
        ahead.load_state_dict(json.loads(json.dumps(state)))  # a roll back: the queued batches are dropped
        assert all(same(ahead.next_batch(), want) for want in expected)
    with Prefetcher(loader(cfg, mbs=3), depth=1) as resumed:  # a resume in a new process
        resumed.load_state_dict(state)
        assert all(same(resumed.next_batch(), want) for want in expected)


class Counting(TokenLoader):
    """Counts the batches built and fails at the `fail_at`-th."""

    built = 0
    fail_at = 0

    def next_batch(self) -> dict[str, torch.Tensor]:
        type(self).built += 1
        if type(self).built == self.fail_at:
            self.shard_read_failed()
        return super().next_batch()

    def shard_read_failed(self) -> None:
        raise DataError("shard_00003.arrow: short read")


def counting(cfg, fail_at: int = 0) -> Counting:
    ld = loader(cfg)
    ref = Counting.__new__(Counting)
    ref.__dict__.update(ld.__dict__)
    Counting.built, Counting.fail_at = 0, fail_at
    return ref


def test_the_queue_is_bounded_and_close_stops_the_thread(sets):
    ahead = Prefetcher(counting(config(sets[0])), depth=2)
    time.sleep(0.3)
    assert Counting.built <= 3  # two queued, one blocked on the full queue
    ahead.next_batch()
    time.sleep(0.3)
    assert Counting.built <= 4
    ahead.close()
    assert not any(t.name == "megatrain-prefetch" for t in threading.enumerate())
    ahead.close()  # idempotent


def test_an_error_in_the_thread_reaches_the_loop_at_its_batch_with_the_thread_traceback(sets):
    ahead = Prefetcher(counting(config(sets[0]), fail_at=3), depth=2)
    ahead.next_batch()
    ahead.next_batch()
    with pytest.raises(DataError, match="short read") as err:
        ahead.next_batch()
    frames = [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert "shard_read_failed" in frames and "_run" in frames
    assert not any(t.name == "megatrain-prefetch" for t in threading.enumerate())
    with pytest.raises(DataError, match="short read"):  # and it stays failed
        ahead.next_batch()


@pytest.mark.parametrize("depth", [-1, 9])
def test_a_prefetch_depth_out_of_range_is_a_one_line_error(sets, depth):
    cfg = config(sets[0], prefetch=depth)
    with pytest.raises(DataError, match=rf"data.prefetch={depth} must be in \[0, 8\]"):
        run_check_data(cfg)


def test_prefetch_null_runs_ahead_on_cuda_only_and_a_depth_is_taken_as_given(sets):
    ld = loader(config(sets[0]))
    assert run_ahead(ld, None, torch.device("cpu")) is ld and run_ahead(ld, 0, torch.device("cpu")) is ld
    with run_ahead(ld, 3, torch.device("cpu")) as ahead:
        assert isinstance(ahead, Prefetcher) and ahead.depth == 3 and not ahead.pin_memory
