"""Micro-batching of query encodes on the one thread that owns the models."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from index import SearchStopped
from sparc_core import SparseCode
from sparc_core.encoders import FeatureEncoder
from sparc_core.model import CodeKind


class EncodeBatcher:
    """Micro-batching: concurrent queries of one stream and kind share one encoder call and one model call.

    Everything already queued joins the batch at once; a query then waits at most ``max_wait_ms`` for more
    company (0: never wait, batch only what piles up while the models are busy); a batch holds at most
    ``max_size`` queries. Texts and images go through the stream's feature encoder first; one thread owns
    the models (GPU-safe).
    """

    def __init__(self, model: Any, encoders: dict[str, FeatureEncoder], max_size: int, max_wait_ms: float) -> None:
        self.model, self.encoders, self.max_size, self.max_wait = model, encoders, max_size, max_wait_ms / 1000.0
        self._q: queue.Queue[tuple | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="encode-batcher", daemon=True)
        self._thread.start()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the thread that owns the models, between batches (work that must not overlap an
        encode: gradients through the encoders, hooks on them)."""
        fut: Future = Future()
        self._q.put(("", "call", fn, fut, None, ""))
        return fut

    def submit(
        self, stream: str, kind: str, payload: Any, should_stop: Callable[[], bool] | None = None, code: CodeKind = "search"
    ) -> Future:
        """Future of the SparseCode (of kind ``code``) of ``payload``: features [n, d], texts (list), or pixels
        [n, 3, H, W]. A payload whose ``should_stop()`` is true when its batch forms is dropped (SearchStopped)."""
        fut: Future = Future()
        self._q.put((stream, kind, payload, fut, should_stop, code))
        return fut

    def _features(self, stream: str, kind: str, payloads: list[Any]) -> torch.Tensor:
        if kind == "text":
            return self.encoders[stream].encode_texts([t for p in payloads for t in p])
        if kind == "pixels":
            return self.encoders[stream].encode_pixels(torch.cat(payloads))
        return torch.from_numpy(np.concatenate(payloads))

    def _run(self) -> None:
        while True:
            first = self._q.get()
            if first is None:
                return
            if first[1] == "call":
                self._run_call(first)
                continue
            batch = [first]
            deadline = time.monotonic() + self.max_wait
            rows = len(first[2])
            while rows < self.max_size:
                timeout = deadline - time.monotonic()
                try:  # whatever is queued already joins at once; then wait for company until the deadline
                    item = self._q.get_nowait() if timeout <= 0 else self._q.get(timeout=timeout)
                except queue.Empty:
                    break
                if item is None:
                    self._q.put(None)
                    break
                if item[1] == "call":  # after this batch, in order
                    self._q.put(item)
                    break
                batch.append(item)
                rows += len(item[2])
            groups: dict[tuple[str, str, str], list[tuple[Any, Future]]] = {}
            for stream, kind, payload, fut, should_stop, code_kind in batch:
                if should_stop is not None and should_stop():  # its caller is gone: no model time for it
                    fut.set_exception(SearchStopped("the deadline passed or the call was cancelled before encoding"))
                    continue
                groups.setdefault((stream, kind, code_kind), []).append((payload, fut))
            for (stream, kind, code_kind), items in groups.items():
                try:
                    x = self._features(stream, kind, [p for p, _ in items]).to(self.model.device)
                    code = self.model.encode({stream: x}, code=code_kind).to("cpu")
                    start = 0
                    for p, fut in items:
                        n = len(p)
                        fut.set_result(
                            SparseCode(code.indices[start : start + n], code.values[start : start + n], code.n_latents)
                        )
                        start += n
                except Exception as e:  # noqa: BLE001 - delivered to every waiting caller
                    for _, fut in items:
                        if not fut.done():
                            fut.set_exception(e)

    @staticmethod
    def _run_call(job: tuple) -> None:
        _, _, fn, fut, _, _ = job
        try:
            fut.set_result(fn())
        except Exception as e:  # noqa: BLE001 - delivered to the caller
            fut.set_exception(e)

    def close(self) -> None:
        """Stop the model thread once the batches queued before this have run, and wait for it (up to 30 s):
        a thread still releasing its last batch's tensors while the interpreter finalizes aborts the
        process (torch's deleters take the GIL, which finalization refuses by ending the thread)."""
        self._q.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=30)
