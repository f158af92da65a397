"""The gradient lane: localisation, caption attribution and pair explanations, kept away from search.

Gradient work takes a second or more per call on CPU (a backward pass through a vision transformer) and
installs hooks on the encoders. Run on the thread that encodes search queries, one dashboard calling
Localize adds its whole cost to every Search queued behind it. Here it runs on its own thread, on its own
replica of the models (``replica=True``, the default: search encoding never waits for it, at the cost of a
second copy of the weights), with a bounded number of calls queued or running (``capacity``; beyond it a
call is refused at once, ResourceExhausted), and every queued call honours its caller's deadline and
cancellation: a call whose client is gone is never started, and its caller is answered as soon as the
deadline passes, not when the work would have finished.

Without a replica (``replica=False``: memory-bound deployments) the jobs run on the encode thread between
batches, through ``run_shared``, with the same bound and the same deadline handling.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout  # not the builtin TimeoutError before Python 3.11
from typing import Any

from index import SearchStopped

from .errors import ResourceExhausted

log = logging.getLogger("sparc.service")
Work = Callable[[Any, dict], Any]  # work(model, encoders) -> result


class GradientLane:
    """One worker thread with its own (or the shared) models and a bounded queue of gradient jobs."""

    def __init__(
        self,
        model: Any,
        encoders: dict,
        capacity: int,
        replica: bool = True,
        run_shared: Callable[[Callable[[], Any]], Future] | None = None,
    ) -> None:
        self.capacity = capacity
        self._slots = threading.BoundedSemaphore(capacity)
        self._run_shared = None if replica else run_shared
        self.replica = replica
        if replica:
            # deep-copied together, so towers that share one model (CLIP image + text) still share it
            self.model, self.encoders = copy.deepcopy((model, encoders))
            self._q: queue.Queue = queue.Queue()
            self._thread: threading.Thread | None = threading.Thread(target=self._loop, name="gradient-lane", daemon=True)
            self._thread.start()
        else:
            if run_shared is None:
                raise ValueError("a lane without a replica needs run_shared (the encode thread's call)")
            self.model, self.encoders, self._thread = model, encoders, None

    @property
    def busy(self) -> int:
        """Calls queued or running now."""
        return self.capacity - self._slots._value  # type: ignore[attr-defined]

    def _loop(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            self._execute(*job)

    def _execute(self, work: Work, fut: Future, should_stop: Callable[[], bool]) -> None:
        try:
            if not fut.set_running_or_notify_cancel():
                return  # its caller gave up while it waited
            if should_stop():
                fut.set_exception(SearchStopped("the deadline passed or the call was cancelled before its turn"))
                return
            try:
                fut.set_result(work(self.model, self.encoders))
            except BaseException as e:  # noqa: BLE001 - delivered to the caller
                fut.set_exception(e)
        finally:
            self._slots.release()

    def check_room(self) -> None:
        """ResourceExhausted now when every slot is taken (a cheap check before a call decodes its image;
        ``run`` takes the slot)."""
        if self.busy >= self.capacity:
            raise ResourceExhausted(self._full())

    def _full(self) -> str:
        return (
            f"{self.capacity} localisation / attribution calls are already queued or running (max_gradient_calls); "
            "retry with backoff"
        )

    def run(self, work: Work, should_stop: Callable[[], bool] | None = None, poll: float = 0.05) -> Any:
        """``work(model, encoders)`` on the lane; ResourceExhausted when ``capacity`` calls are already queued
        or running; SearchStopped as soon as ``should_stop()`` turns true (the job is dropped if not started)."""
        stop = should_stop or (lambda: False)
        if not self._slots.acquire(blocking=False):
            raise ResourceExhausted(self._full())
        fut: Future = Future()
        if self._thread is not None:
            self._q.put((work, fut, stop))
        else:
            assert self._run_shared is not None
            self._run_shared(lambda: self._execute(work, fut, stop))
        while True:
            try:
                return fut.result(timeout=poll)
            except FutureTimeout:
                if stop():
                    fut.cancel()  # never started: it is skipped; running: its result is dropped
                    raise SearchStopped("the deadline passed or the call was cancelled; the call was dropped") from None

    def close(self) -> None:
        """Stop the lane's thread once the jobs queued before this have run (waits up to 30 s)."""
        if self._thread is not None:
            self._q.put(None)
            self._thread.join(timeout=30)
