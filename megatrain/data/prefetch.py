"""A loader that runs ahead: the next batches are built in a background thread while the step runs.

The thread reads from a fork of the loader (its own counters and buffer, the same memory-mapped streams);
each queued batch carries the position just after it, and taking a batch moves the wrapped loader to that
position. So `state_dict()` (what a checkpoint saves) is the position of the batches consumed, never of
those prefetched: resume replays nothing and skips nothing. An error in the thread (a damaged shard, a
token outside the vocabulary) is raised in the training loop at the batch that hit it, with the thread's
traceback.
"""

from __future__ import annotations

import queue
import threading

import torch

from megatrain.data.dataset import TokenLoader

_POLL_S = 0.1  # how often a blocked thread checks for shutdown
AUTO_DEPTH = 2  # data.prefetch=null on CUDA: one batch ready, one being built


class Prefetcher:
    """Wraps a TokenLoader: `next_batch`, `state_dict`, `load_state_dict`, `seen` as the loader's, run ahead.

    `depth`: batches built ahead (the queue bound). `pin_memory`: page-locked host batches, so the
    step's `.to(device, non_blocking=True)` is a real asynchronous copy; CUDA only.
    """

    def __init__(self, loader: TokenLoader, depth: int = 2, pin_memory: bool = False):
        if depth < 1:
            raise ValueError(f"depth={depth}: a prefetcher builds at least one batch ahead")
        self.loader, self.depth, self.pin_memory = loader, depth, pin_memory
        self._thread: threading.Thread | None = None
        self._start()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=self.depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(self.loader.fork(), self._stop, self._queue),
                                        name="megatrain-prefetch", daemon=True)
        self._thread.start()

    def _run(self, producer: TokenLoader, stop: threading.Event, out: queue.Queue) -> None:
        try:
            while not stop.is_set():
                batch = producer.next_batch()
                if self.pin_memory:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                _put(out, (batch, producer.position()), stop)
        except BaseException as err:  # noqa: BLE001 - every failure goes to the consumer, none dies silently
            _put(out, (None, err), stop)

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self._error is not None:
            raise self._error
        batch, after = self._queue.get()
        if batch is None:
            self._error = after
            self.close()
            raise after  # the exception object carries the thread's traceback
        self.loader.seek(after)
        return batch

    def state_dict(self) -> dict[str, int]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume or roll back: the batches built ahead are dropped, the thread restarts at `state`."""
        self.close()
        self.loader.load_state_dict(state)
        self._start()

    def seen(self) -> tuple[int, float]:
        return self.loader.seen()

    def close(self) -> None:
        """Stop the thread (it may be blocked on a full queue or inside a read) and drop what it built."""
        if self._thread is None:
            return
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                pass
        self._thread.join()
        self._thread = None

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _put(out: queue.Queue, item: tuple, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            out.put(item, timeout=_POLL_S)
            return
        except queue.Full:
            continue


def run_ahead(loader: TokenLoader, depth: int | None, device: torch.device) -> TokenLoader | Prefetcher:
    """`depth` batches built ahead, pinned on CUDA; 0: the loader itself (batches built in the step); None: 2 on
    CUDA, where the host idles while the device computes, and 0 on CPU, where a thread takes cores from the
    step (docs/benchmarks.md, "Loader")."""
    if depth is None:
        depth = AUTO_DEPTH if device.type == "cuda" else 0
    return Prefetcher(loader, depth, pin_memory=device.type == "cuda") if depth > 0 else loader
