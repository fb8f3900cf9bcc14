"""Continuous batching: one thread owns the decoding session and serves every request.

The HTTP layer hands :class:`Ticket` s to :meth:`Scheduler.submit` (a bounded queue); the scheduler thread runs
the one decoding loop (:mod:`nemo_bard.generation.session`), whose rows move through their blocks each at its own
pace:

* before every forward it drops cancelled or timed-out rows (their rows are free at once), then prefills
  waiting requests into the free rows (together, in one forward), so a new request joins the running batch at
  the next forward instead of waiting for it to drain;
* it runs one forward per :meth:`~nemo_bard.generation.session.DecodeSession.step`;
* every committed block (with the session's ``stream_prefix``: also a block's newly decided leading tokens after
  each forward) goes to its ticket as an event (``tokens``), then ``done`` with the usage, or ``error``
  with an HTTP status and a message. Events are delivered with the ticket's ``deliver`` callable, from the
  scheduler thread (the HTTP layer hands them to its event loop).

A request that fails (its prefill raises, its prompt does not fit) fails alone; an error inside a batched
forward fails the rows in that batch and the scheduler starts a fresh session, so the server keeps serving.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from nemo_bard.generation.inputs import stack_inputs
from nemo_bard.generation.points import EngineError
from nemo_bard.generation.session import DecodeSession, RowRequest

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The waiting queue is full (HTTP 429)."""


class Draining(Exception):
    """The server is shutting down and admits no new requests (HTTP 503)."""


@dataclass
class Ticket:
    """One request's way through the scheduler.

    ``inputs`` are the processor's outputs for the one prompt (batch 1); ``deliver(event)`` receives
    ``("admitted", prompt_tokens)``, ``("tokens", [ids])`` per committed block (or decided prefix), then
    ``("done", finish_reason, usage)`` or ``("error", http_status, message)``. ``cancel()`` may be called from any thread.
    """

    inputs: dict[str, torch.Tensor]
    max_tokens: int
    deliver: Callable[[tuple], None]
    threshold: float | None = None
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    timeout: float | None = None  # seconds from arrival
    id: int = field(default_factory=itertools.count().__next__)
    arrival: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    prefill_s: float = 0.0  # its prompt prefill (one forward, maybe shared with other joining requests)
    decode_start: float = 0.0  # when the prefill ended
    cancelled: bool = False
    cancel_reason: str = "cancelled"

    def cancel(self, reason: str = "cancelled") -> None:
        """Stop this request before the next forward (a client gone, a stop string seen)."""
        self.cancel_reason = reason
        self.cancelled = True

    @property
    def expired(self) -> bool:
        return self.timeout is not None and time.perf_counter() - self.arrival > self.timeout


def usage_of(req: RowRequest, ticket: "Ticket") -> dict:
    """A finished row's share of the OpenAI ``usage``, plus its forwards, tokens per forward, the seconds of its
    prompt prefill (shared with the requests prefilled in the same forward) and from there to its last token."""
    return {"completion_tokens": len(req.tokens), "forwards": req.forwards,
            "tokens_per_forward": round(len(req.tokens) / max(req.forwards, 1), 3),
            "prefill_ms": round(1000 * ticket.prefill_s, 3),
            "decode_ms": round(1000 * (time.perf_counter() - ticket.decode_start), 3)}


class Scheduler:
    """Owns a decoding session and the thread that drives it (see the module docstring).

    Args:
        make_session: builds a fresh, empty session (called at start and after a failed batched forward).
        max_queue: requests waiting for a row at most; more are refused with :class:`QueueFull`.
        metrics: an object with the server's Prometheus metrics (``nemo_bard.serving.app.Metrics``) or None.
    """

    def __init__(self, make_session: Callable[[], DecodeSession], max_queue: int = 64, metrics: Any = None) -> None:
        self.make_session = make_session
        self.session = make_session()
        self.max_queue = max_queue
        self.metrics = metrics
        self.waiting: collections.deque[Ticket] = collections.deque()
        self.tickets: dict[int, Ticket] = {}  # running, by id
        self._cond = threading.Condition()
        self._draining = False
        self._deadline: float | None = None  # drain: cancel what still runs after this time
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="nemo-bard-scheduler", daemon=True)
        self._rate: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of the last 10 s

    # ----------------------------------------------------------- control
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining

    def submit(self, ticket: Ticket) -> None:
        """Queue a request; raises :class:`QueueFull` or :class:`Draining`."""
        with self._cond:
            if self._draining or self._stopped:
                raise Draining("the server is shutting down")
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue {self.max_queue})")
            self.waiting.append(ticket)
            self._gauge("queue_depth", len(self.waiting))
            self._cond.notify()

    def drain(self, grace: float) -> None:
        """Stop admitting; finish what runs, cancelling it after ``grace`` seconds; queued requests get 503."""
        with self._cond:
            self._draining = True
            self._deadline = time.perf_counter() + grace
            rejected = list(self.waiting)
            self.waiting.clear()
            self._cond.notify()
        for t in rejected:
            t.deliver(("error", 503, "the server is shutting down; retry on another replica"))

    def join(self, timeout: float | None = None) -> None:
        """Wait for the scheduler thread to end (after :meth:`drain`, when nothing runs any more)."""
        self._thread.join(timeout)

    def stop(self) -> None:
        """Drain with no grace and wait for the thread."""
        self.drain(0.0)
        self._thread.join(10)

    # ----------------------------------------------------------- the loop
    def _run(self) -> None:
        with torch.inference_mode():
            self._loop()
        self._stopped = True
        self.session.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                if not self.session.running and not self.waiting:
                    if self._draining:
                        break
                    self._cond.wait(0.05)
                    continue
            session = self.session
            self._reap()
            self._admit()
            if not session.running:
                continue
            before = session.num_forwards
            try:
                session.step()
            except Exception as exc:  # noqa: BLE001 - a failed batch fails its rows, not the server
                logger.exception("decoding step failed")
                self._fail_running(500, f"decoding failed: {type(exc).__name__}: {exc}")
                continue
            self._count("forwards", session.num_forwards - before)
            self._dispatch()

    def _reap(self) -> None:
        """Drop cancelled and timed-out rows (and, past the drain grace, everything)."""
        over = self._deadline is not None and time.perf_counter() > self._deadline
        for ticket in list(self.tickets.values()):
            if ticket.cancelled or ticket.expired or over:
                req = self.session.cancel(ticket.id)  # also surfaces in take_finished(); the ticket is gone
                self.tickets.pop(ticket.id, None)
                if over:
                    ticket.deliver(("error", 503, "the server shut down before this request finished"))
                elif ticket.expired and not ticket.cancelled:
                    ticket.deliver(("error", 504, f"the request timed out after {ticket.timeout:g} s "
                                                  "(the server's --request-timeout)"))
                else:
                    ticket.deliver(("done", ticket.cancel_reason, None if req is None else usage_of(req, ticket)))
        with self._cond:
            expired = [t for t in self.waiting if t.cancelled or t.expired]
            for t in expired:
                self.waiting.remove(t)
        for t in expired:
            if not t.cancelled:
                t.deliver(("error", 504, f"the request timed out after {t.timeout:g} s in the queue "
                                         "(the server's --request-timeout)"))

    def _admit(self) -> None:
        """Prefill waiting requests into the free rows: together in one forward, or one by one when that fails
        (so a request that cannot be processed fails alone)."""
        session = self.session
        with self._cond:
            take = min(session.free_rows, len(self.waiting)) if not self._draining else 0
            batch = [self.waiting.popleft() for _ in range(take)]
            self._gauge("queue_depth", len(self.waiting))
        batch = [t for t in batch if not t.cancelled]
        if not batch:
            return
        if len(batch) > 1:
            try:
                self._add(batch)
                return
            except Exception:  # noqa: BLE001 - retried one by one below, which names the culprit
                logger.info("a joint prefill of %d requests failed; admitting them one by one", len(batch))
        for ticket in batch:
            try:
                self._add([ticket])
            except EngineError as exc:
                ticket.deliver(("error", 400, str(exc)))
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                logger.exception("prefill failed")
                ticket.deliver(("error", 500, f"the prompt could not be processed: {type(exc).__name__}: {exc}"))

    def _add(self, tickets: list[Ticket]) -> None:
        session = self.session
        dev = session.engine.device
        rows = [RowRequest(t.id, t.max_tokens, t.threshold, t.temperature, t.top_k, t.top_p,
                           torch.Generator(dev).manual_seed(t.seed) if t.seed is not None else None)
                for t in tickets]
        inputs = stack_inputs([t.inputs for t in tickets], session.pad)
        t0 = time.perf_counter()
        session.add(rows, {k: v.to(dev) if v is not None else None for k, v in inputs.items()})
        t1 = time.perf_counter()
        for t in tickets:
            t.prefill_s, t.decode_start = t1 - t0, t1
            self.tickets[t.id] = t
            t.deliver(("admitted", int(t.inputs["input_ids"].shape[1])))
        self._dispatch()  # AR: the prefill already produced a token

    def _dispatch(self) -> None:
        session = self.session
        now = time.perf_counter()
        produced = 0
        for key, tokens in session.collect():
            ticket = self.tickets.get(key)
            if ticket is None:
                continue
            if ticket.first_token is None:
                ticket.first_token = now
                self._observe("time_to_first_token", now - ticket.arrival)
            produced += len(tokens)
            ticket.deliver(("tokens", tokens))
        for req in session.take_finished():
            ticket = self.tickets.pop(req.key, None)
            if ticket is None:
                continue
            usage = usage_of(req, ticket)
            self._observe("latency", now - ticket.arrival)
            self._observe("tokens_per_forward", usage["tokens_per_forward"])
            ticket.deliver(("done", req.finish_reason, usage))
        if produced:
            self._count("output_tokens", produced)
            self._rate.append((now, produced))
        while self._rate and now - self._rate[0][0] > 10.0:
            self._rate.popleft()
        window = max(now - self._rate[0][0], 1.0) if self._rate else 1.0
        self._gauge("output_tokens_per_second", sum(n for _, n in self._rate) / window)
        self._gauge("running_rows", session.running)

    def _fail_running(self, status: int, message: str) -> None:
        for ticket in self.tickets.values():
            ticket.deliver(("error", status, message))
        self.tickets.clear()
        try:
            self.session.close()
        finally:
            self.session = self.make_session()

    # ----------------------------------------------------------- metrics
    def _gauge(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).set(value)

    def _count(self, name: str, value: float) -> None:
        if self.metrics is not None and value:
            getattr(self.metrics, name).inc(value)

    def _observe(self, name: str, value: float) -> None:
        if self.metrics is not None:
            getattr(self.metrics, name).observe(value)
