"""The batch scheduler: concurrent requests into the engine's running batch, on one worker thread.

A bounded queue of requests; the worker lets waiting requests join the running batch between decode steps
(continuous batching) and answers each one as soon as its row ends.
"""

from __future__ import annotations

import concurrent.futures
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from road_vlm.generation import GenerationRequest, GenerationResult
from road_vlm.generation.decode import Finished

from .engine import ServingEngine

logger = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """The scheduler already holds ``max_queue`` unfinished requests."""


@dataclass
class _Ticket:
    request: GenerationRequest
    future: concurrent.futures.Future[GenerationResult]


BATCHING_POLICIES = ("continuous", "static")


class BatchScheduler:
    """Feeds concurrent requests into the engine's running batch, on one worker thread.

    ``submit`` returns a ``concurrent.futures.Future``; a request's ``on_text`` callback streams its text from
    the worker thread. At most ``max_queue`` requests may be waiting or running (QueueFullError beyond that).

    ``batching="continuous"`` (default): between any two decode steps, waiting requests join the running batch
    (up to ``max_batch_size`` rows), and each row leaves as soon as it ends, so a short answer never waits for a
    long one. Newcomers are prefilled in their own forward, at most ``max_prefill_tokens`` (rows x longest prompt,
    the padded size of that forward) between two decode steps, so a burst of long prompts delays the running rows by
    one bounded prefill per step rather than by all of them at once; the rest join at the following steps, in
    arrival order (a single prompt longer than the budget joins alone). ``"static"``: a batch runs until its last
    row ends before the next one starts (kept for comparison; see scripts/bench_server.py). When the batch is
    empty, the worker waits for a first request and then up to ``batch_window_s`` for more, so requests that arrive
    together start together.
    """

    def __init__(
        self,
        engine: ServingEngine,
        *,
        max_batch_size: int = 8,
        max_queue: int = 64,
        batch_window_s: float = 0.02,
        batching: str = "continuous",
        max_prefill_tokens: int = 4096,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        if batch_window_s < 0:
            raise ValueError(f"batch_window_s must be >= 0, got {batch_window_s}")
        if batching not in BATCHING_POLICIES:
            raise ValueError(f"batching must be one of {BATCHING_POLICIES}, got {batching!r}")
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.batch_window_s = batch_window_s
        self.batching = batching
        self.max_prefill_tokens = max_prefill_tokens
        self._queue: queue.Queue[_Ticket | None] = queue.Queue()
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._running: dict[int, _Ticket] = {}  # id(request) -> ticket, for rows in the running batch

    @property
    def pending(self) -> int:
        """Requests submitted and not finished yet."""
        return self._pending

    @property
    def running(self) -> int:
        """Rows in the running batch."""
        return len(self._running)

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="road-vlm-batcher", daemon=True)
        self._thread.start()

    def close(self, timeout: float | None = 30.0) -> None:
        """Stop admitting; rows already running finish; requests still waiting fail with RuntimeError."""
        self._stopping.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        self._thread = None
        self._fail_waiting(RuntimeError("the server is shutting down"))

    def submit(self, request: GenerationRequest) -> concurrent.futures.Future[GenerationResult]:
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the batch scheduler is not running (call start())")
        with self._pending_lock:
            if self._pending >= self.max_queue:
                raise QueueFullError(
                    f"the server is busy: {self._pending} requests are waiting or running (max_queue={self.max_queue})"
                )
            self._pending += 1
        ticket = _Ticket(request, concurrent.futures.Future())
        self._queue.put(ticket)
        return ticket.future

    def _finish(self, ticket: _Ticket, *, result: GenerationResult | None = None,
                error: BaseException | None = None) -> None:
        with self._pending_lock:
            self._pending -= 1
        if error is not None:
            ticket.future.set_exception(error)
        else:
            ticket.future.set_result(result)

    def _fail_waiting(self, error: BaseException) -> None:
        while True:
            try:
                ticket = self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is not None:
                self._finish(ticket, error=error)

    def _collect(self, room: int, *, wait: bool) -> list[_Ticket]:
        """Up to ``room`` waiting requests. ``wait``: block for a first one, then gather for the batch window;
        otherwise only take what is already queued (running rows must not wait)."""
        batch: list[_Ticket] = []
        if wait:
            first = self._queue.get()
            if first is None:  # close() was called
                self._stopping.set()
                return []
            batch.append(first)
        deadline = time.monotonic() + (self.batch_window_s if wait else 0.0)
        while len(batch) < room:
            remaining = deadline - time.monotonic()
            try:
                ticket = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if ticket is None:  # close() was called: run what we have, then stop
                self._stopping.set()
                break
            batch.append(ticket)
        return batch

    def _take_admissible(self, held: deque[_Ticket]) -> list[_Ticket]:
        """The requests at the front of ``held`` to prefill now (cancelled ones are answered on the way): under
        continuous batching as many as fit ``max_prefill_tokens`` padded tokens, at least one; static: all."""
        live: list[_Ticket] = []
        longest = 0
        while held:
            ticket = held[0]
            if ticket.request.cancelled.is_set():  # the client left while waiting
                self._finish(held.popleft(), error=concurrent.futures.CancelledError())
                continue
            tokens = ticket.request.prompt.num_tokens
            if (live and self.batching == "continuous"
                    and (len(live) + 1) * max(longest, tokens) > self.max_prefill_tokens):
                break
            live.append(held.popleft())
            longest = max(longest, tokens)
        return live

    def _loop(self) -> None:
        batch = self.engine.open_batch()
        held: deque[_Ticket] = deque()  # taken off the queue, not admitted yet (over this step's prefill budget)
        try:
            while True:
                if self._stopping.is_set() and not self._running and not held:
                    break
                may_join = self.batching == "continuous" or not self._running
                if may_join and not self._stopping.is_set():
                    room = self.max_batch_size - len(self._running) - len(held)
                    held.extend(self._collect(room, wait=not self._running and not held))
                live = self._take_admissible(held) if may_join else []
                try:
                    finished: list[Finished] = []
                    if live:
                        self._running.update((id(t.request), t) for t in live)
                        finished += self.engine.admit(batch, [t.request for t in live])
                    if batch.size:
                        finished += self.engine.step(batch)
                except Exception as err:  # the batch failed: report it to each of its callers and keep serving
                    logger.exception("batch of %d failed", len(self._running))
                    for ticket in self._running.values():
                        self._finish(ticket, error=err)
                    self._running.clear()
                    batch.close()
                    batch = self.engine.open_batch()
                    continue
                for request, result in finished:
                    self._finish(self._running.pop(id(request)), result=result)
        finally:
            batch.close()
            for ticket in [*self._running.values(), *held]:
                self._finish(ticket, error=RuntimeError("the server is shutting down"))
            self._running.clear()
