"""The engine thread: admits waiting requests into free batch rows between steps.

HTTP handlers run on the asyncio loop; the model runs on one background thread so a long
verify pass never blocks the loop. :meth:`Scheduler.submit` puts a request in a bounded
waiting queue (full: :class:`QueueFullError`, answered 429); the thread loops

    admit waiting requests into free rows (prefill) -> one batched step -> repeat

and sleeps when there is nothing to do. A cancelled request (its client went away) is
dropped from the queue or frees its row at the next step.
"""

from __future__ import annotations

import threading
import time
from collections import deque

from specdec.serving.batch_engine import BatchEngine, EngineEvent, EngineRequest
from specdec.serving.metrics import ServerMetrics


class QueueFullError(RuntimeError):
    """The waiting queue is at capacity."""


class ShuttingDownError(RuntimeError):
    """The server is draining and takes no new requests."""


class Scheduler:
    def __init__(self, engine: BatchEngine, metrics: ServerMetrics, max_queue: int) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_queue = max_queue
        self._waiting: deque[EngineRequest] = deque()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self._accepting = True
        self._admitting = 0  # popped from the queue, not yet in a row (prefill running)

    # ----------------------------------------------------------------- public API
    def start(self) -> None:
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="specdec-engine", daemon=True)
        self._thread.start()

    def submit(self, request: EngineRequest) -> None:
        with self._wake:
            if not self._accepting:
                self.metrics.reject("shutting_down")
                raise ShuttingDownError("the server is shutting down")
            if len(self._waiting) >= self.max_queue:  # clients that left do not hold places
                for gone in [r for r in self._waiting if r.cancelled.is_set()]:
                    self._drop(gone)
            if len(self._waiting) >= self.max_queue:
                self.metrics.reject("queue_full")
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting)")
            self._waiting.append(request)
            self._publish_load()
            self._wake.notify()

    def load(self) -> tuple[int, int]:
        """``(waiting, active)`` request counts."""
        with self._wake:
            return len(self._waiting) + self._admitting, self.engine.num_active

    def stop(self, drain_timeout: float = 10.0) -> None:
        """Refuse new requests, let in-flight ones finish for ``drain_timeout`` s, cancel the rest."""
        with self._wake:
            self._accepting = False
        deadline = time.monotonic() + drain_timeout
        while time.monotonic() < deadline and any(self.load()):
            time.sleep(0.02)
        with self._wake:
            self._running = False
            self._wake.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for request in self._waiting:
            request.emit(EngineEvent([], "", [], [], finish_reason="cancelled", error="server shutting down"))
        self._waiting.clear()
        self.engine.cancel_all()

    # ----------------------------------------------------------------- the thread
    def _loop(self) -> None:
        while True:
            with self._wake:
                while self._running and not self._waiting and self.engine.num_active == 0:
                    self._wake.wait()
                if not self._running:
                    return
                admitted: list[EngineRequest] = []
                while self._waiting and self.engine.num_free > len(admitted):
                    request = self._waiting[0]
                    if request.cancelled.is_set():
                        self._drop(request)
                    else:
                        admitted.append(self._waiting.popleft())
                self._admitting = len(admitted)
            for request in admitted:
                self.engine.add(request)
            with self._wake:
                self._admitting = 0
            try:
                self.engine.step()
            except Exception as e:  # a failed batched pass: fail the whole batch, keep serving
                self.engine.cancel_all("error", error=f"engine step failed: {e}")
            with self._wake:
                self._publish_load()

    def _drop(self, request: EngineRequest) -> None:
        """Forget a waiting request whose client went away (caller holds the lock)."""
        self._waiting.remove(request)
        self.metrics.finish("cancelled", len(request.prompt_ids), 0)
        request.emit(EngineEvent([], "", [], [], finish_reason="cancelled"))

    def _publish_load(self) -> None:
        self.metrics.set_load(len(self._waiting), self.engine.num_active)
