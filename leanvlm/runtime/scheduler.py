"""Continuous batching: one thread drives a StepRunner; requests are prefilled and join the running decode
batch between steps, and leave it (freeing their slot) when they finish or are cancelled.

Callers `submit` a prepared request (`Pipeline.preprocess.prepare`: validated before it queues, so a bad
request never reaches the batch) with a sink that receives `Event`s from the scheduler thread: text deltas
as tokens decode, then one final event with the finish reason (or the error). `Ticket.cancel` (a client that
went away) frees the slot at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

from leanvlm.errors import LeanVLMError, UserError
from leanvlm.runtime.preprocess import Prepared
from leanvlm.runtime.sampling import SamplingParams
from leanvlm.runtime.steps import Sequence, StepRunner

log = logging.getLogger(__name__)


class QueueFullError(LeanVLMError):
    """The scheduler's wait queue is full: retry later (a server answers 429)."""


class SchedulerClosedError(LeanVLMError):
    """The scheduler is shutting down or its engine failed (a server answers 503)."""


@dataclass
class Event:
    """What a request's sink receives: `text` is new text since the last event. The last event has
    `finish_reason` (eos, stop, length, cancelled) or `error`, and the request's totals."""

    text: str = ""
    finish_reason: str | None = None
    error: Exception | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    kept: list[list[int]] = field(default_factory=list)
    timings: dict = field(default_factory=dict)  # queued_s, ttft_s, total_s (final event)

    @property
    def final(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Ticket:
    """A submitted request. Without a sink, iterate `events()` (or call `result()`) from the caller's thread."""

    def __init__(self, prepared: Prepared, params: SamplingParams, sink: Callable[[Event], None] | None):
        self.prepared, self.params = prepared, params
        self._queue: queue.Queue | None = None
        if sink is None:
            self._queue = queue.Queue()
            sink = self._queue.put
        self.sink = sink
        self.submitted = time.perf_counter()
        self.cancelled = False
        self.sequence: Sequence | None = None
        self.emitted = 0  # characters of text sent so far

    def cancel(self) -> None:
        """Stop this request: dropped from the queue, or its slot freed at the next step."""
        self.cancelled = True
        if self.sequence is not None:
            self.sequence.cancel()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        if self._queue is None:
            raise RuntimeError("this ticket has a sink; its events go there")
        while True:
            event = self._queue.get(timeout=timeout)
            yield event
            if event.final:
                return

    def result(self, timeout: float | None = None) -> tuple[str, Event]:
        """(whole text, final event); raises the request's error."""
        text = []
        for event in self.events(timeout):
            text.append(event.text)
        if event.error is not None:
            raise event.error
        return "".join(text), event


class Scheduler:
    """Runs `pipeline` with continuous batching over up to `max_batch` slots. `max_queue` requests may wait
    for a slot; past that, submit raises QueueFullError. `on_step(rows, running)` is called after each decode
    step (metrics). At most `max_prefill` waiting requests are prefilled together between two decode steps."""

    def __init__(self, pipeline, max_batch: int | None = None, max_queue: int = 64, round_to: int = 32,
                 on_step: Callable[[int, int], None] | None = None, max_prefill: int = 4):
        limit = pipeline.spec.limits.max_batch
        max_batch = limit if max_batch is None else max_batch
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= limit:
            raise UserError(f"max batch {max_batch!r}: must be between 1 and this engine's limit of {limit} "
                            "(re-export with a larger --max-batch)")
        if max_queue < 0:
            raise UserError(f"max queue {max_queue}: must be >= 0")
        self.pipeline, self.max_batch, self.max_queue = pipeline, max_batch, max_queue
        # Requests prefilled together between two decode steps. On CPU a prefill batch costs its requests' sum
        # (per-request time flat from 1 to 4, ~15% worse at 8 on the mid engine), so small chunks lose nothing
        # and let the running requests decode between them.
        self.prefill_batch = max(1, min(max_prefill, limit))
        self.runner = StepRunner(pipeline, max_batch, round_to)
        self.on_step = on_step
        self._waiting: deque[Ticket] = deque()
        self._tickets: dict[int, Ticket] = {}  # slot -> running ticket
        self._cv = threading.Condition()
        self._closed = False
        self._accepted = 0  # submitted and not yet given their final event: waiting, prefilling or running
        self.failure: Exception | None = None
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="leanvlm-scheduler", daemon=True)
        self._thread.start()

    # ---- client side ------------------------------------------------------------------------
    def submit(self, prepared: Prepared, params: SamplingParams,
               sink: Callable[[Event], None] | None = None) -> Ticket:
        ticket = Ticket(prepared, params, sink)
        with self._cv:
            if self._closed:
                raise SchedulerClosedError("the server is shutting down" if self.failure is None
                                           else f"the engine failed: {self.failure}")
            if self._accepted >= self.max_batch + self.max_queue:
                raise QueueFullError(f"{len(self._waiting)} requests are waiting for {self.max_batch} slots; "
                                     "retry later")
            self._waiting.append(ticket)
            self._accepted += 1
            self._cv.notify()
        return ticket

    def generate(self, image, prompt: str, timeout: float | None = None, **sampling) -> tuple[str, Event]:
        """Blocking convenience: one request through the running batch -> (text, final event)."""
        prepared = self.pipeline.preprocess.prepare(image, prompt)
        return self.submit(prepared, self.pipeline.params(**sampling)).result(timeout)

    @property
    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """The loop runs and the engine has not failed."""
        return self.failure is None and not self._closed and self._thread.is_alive()

    @property
    def running(self) -> int:
        return len(self._tickets)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the loop; waiting and running requests get a SchedulerClosedError."""
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # ---- the loop ---------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._closed and not self._waiting and not self._tickets:
                        self._cv.wait()
                    if self._closed:
                        break
                    admit = self._take_waiting()
                if admit:
                    self._admit(admit)
                if self._tickets:
                    self._step()
        except Exception as e:  # an engine failure: every request gets a clean error, the server reports 503
            log.exception("scheduler loop failed")
            self.failure = e
        with self._cv:
            self._closed = True
            pending = list(self._waiting) + list(self._tickets.values())
            self._waiting.clear()
            self._tickets.clear()
        error = SchedulerClosedError("the server is shutting down" if self.failure is None
                                     else f"the engine failed: {self.failure}")
        for ticket in pending:
            self._send(ticket, Event(error=error))

    def _take_waiting(self) -> list[Ticket]:
        take = []
        while self._waiting and len(take) < min(self.runner.free, self.prefill_batch):
            ticket = self._waiting.popleft()
            if ticket.cancelled:
                self._send(ticket, Event(finish_reason="cancelled"))
            else:
                take.append(ticket)
        return take

    def _admit(self, tickets: list[Ticket]) -> None:
        try:
            batch = self.pipeline.preprocess.collate([t.prepared for t in tickets])
            seqs = self.runner.start(batch, [t.params for t in tickets], [t.submitted for t in tickets], tickets)
        except Exception as e:  # e.g. prompt + max_tokens past a cache group's capacity: only these requests fail
            if not isinstance(e, UserError):
                log.exception("prefill failed")
            for seq in [s for s in self.runner.running if s.tag in tickets]:
                self.runner.finish(seq)  # slots taken before the failure
            for ticket in tickets:
                self._send(ticket, Event(error=e))
            return
        for ticket, seq in zip(tickets, seqs):
            ticket.sequence = seq
            if ticket.cancelled:
                seq.cancel()
            self._tickets[seq.slot] = ticket
        self._emit(seqs)

    def _step(self) -> None:
        for ticket in list(self._tickets.values()):
            if ticket.cancelled and ticket.sequence is not None:
                ticket.sequence.cancel()
        for seq in [t.sequence for t in self._tickets.values() if t.sequence.done]:
            self._finish(seq)  # cancelled before the step: their slots are free for it
        if not self._tickets:
            return
        rows = self.runner.cache.rows
        stepped = self.runner.step()
        self.steps += 1
        if self.on_step is not None:
            self.on_step(rows, len(stepped))
        self._emit(stepped)
        if self.runner.holes and not self._waiting:
            self.runner.compact()
            self._tickets = {s.slot: s.tag for s in self.runner.running}

    def _emit(self, seqs: list[Sequence]) -> None:
        for seq in seqs:
            ticket = seq.tag
            if seq.done:
                self._finish(seq)
                continue
            text = seq.text.safe_text()
            if len(text) > ticket.emitted:
                self._send(ticket, Event(text=text[ticket.emitted:], completion_tokens=len(seq.tokens)))
                ticket.emitted = len(text)

    def _finish(self, seq: Sequence) -> None:
        ticket = seq.tag
        self._tickets.pop(seq.slot, None)
        self.runner.finish(seq)
        t = seq.times
        text = seq.text.text
        self._send(ticket, Event(text=text[ticket.emitted:], finish_reason=seq.finish_reason,
                                 completion_tokens=len(seq.tokens), prompt_tokens=len(seq.prompt_token_ids),
                                 kept=seq.kept, timings={"ttft_s": t["first_token"] - t["submitted"],
                                                         "total_s": t["finished"] - t["submitted"]}))
        ticket.emitted = len(text)

    def _send(self, ticket: Ticket, event: Event) -> None:
        if event.final:
            with self._cv:
                self._accepted -= 1
        try:
            ticket.sink(event)
        except Exception:  # a sink whose client is gone must not stop the loop
            log.exception("event sink failed")
