"""One worker thread that owns the model and interleaves every generation, a decoding step at a time.

    scheduler = Scheduler(engine, max_batch_size=8, max_queue=16, request_timeout=300)
    ticket = scheduler.submit(prompt_ids, options)      # ServerBusy when max_queue requests are already held
    completion = await ticket.result()                  # or: async for piece in ticket.pieces(); for gradio: sync
    ticket.cancel()                                     # the client left: stops within one step, or never starts

Requests that wait together with equal options start as one batch (medicalgpt/serve/decoding.py); each batch then
takes one step per turn, round-robin, so a 5-token answer is not held up by a 2,000-token one. Nothing a request
does can stop the worker: a cancelled or timed-out request is dropped at the next step, an exception in a batch's
step fails that batch's requests (GenerationFailed) and the others go on, and a reader that stops reading is
parked once `buffer_limit` pieces wait for it, then cancelled after `stall_timeout` seconds. stop() (safe in a
signal handler: it only sets an event) makes the worker fail every request with ShuttingDown and exit.
"""

import asyncio
import collections
import logging
import threading
import time

from medicalgpt.serve.decoding import Decoding

logger = logging.getLogger(__name__)


class ServerBusy(Exception):
    """max_queue requests are already held (HTTP 503 with Retry-After)."""


class ShuttingDown(Exception):
    """The server is stopping (HTTP 503)."""


class TimedOut(Exception):
    """The request ran past request_timeout (HTTP 504)."""


class GenerationFailed(Exception):
    """The model failed on this request's batch (HTTP 500, with the error)."""


class Cancelled(Exception):
    """The request was cancelled (its client left, or stopped reading)."""


class Ticket:
    """One request in the scheduler: its text pieces as they are generated, then its completion or error."""

    def __init__(self, scheduler, ids, options, deadline):
        self.scheduler, self.ids, self.options, self.deadline = scheduler, ids, options, deadline
        self.completion, self.error, self.done = None, None, False
        self.cancel_reason = None
        self.parked_since = None  # when the reader last left buffer_limit pieces waiting
        self.released = False  # no longer counted under max_queue (cancelled or ended)
        self._pieces = collections.deque()
        self._lock = threading.Lock()
        self._listener = None

    def cancel(self, reason="cancelled"):
        """Stop this request's generation at the next step (or never start it). Safe from any thread, repeatable.
        Its place under max_queue is freed at once: clients that hang up and ask again do not fill the queue."""
        if not self.done and self.cancel_reason is None:
            self.cancel_reason = reason
            self.scheduler.release(self)

    @property
    def backlog(self):
        return len(self._pieces)

    # -- the worker's side -----------------------------------------------------------------------------------

    def push(self, piece):
        if piece:
            with self._lock:
                self._pieces.append(piece)
            self._notify()

    def finish(self, completion=None, error=None):
        with self._lock:
            self.completion, self.error, self.done = completion, error, True
        self._notify()

    def _notify(self):
        listener = self._listener
        if listener is not None:
            try:
                listener()
            except RuntimeError:  # the consumer's event loop is closed: nobody is waiting any more
                pass

    # -- the consumer's side ---------------------------------------------------------------------------------

    def take(self):
        """(the pieces generated since the last take, whether the request is over)."""
        with self._lock:
            pieces, done = list(self._pieces), self.done
            self._pieces.clear()
        if pieces and self.parked_since is not None:
            self.scheduler.wake()
        return pieces, done

    async def pieces(self):
        """The text pieces as they come (async); raises the request's error at the end, if any."""
        loop, changed = asyncio.get_running_loop(), asyncio.Event()
        self._listener = lambda: loop.call_soon_threadsafe(changed.set)
        while True:
            pieces, done = self.take()
            for piece in pieces:
                yield piece
            if done:
                break
            await changed.wait()
            changed.clear()
        if self.error is not None:
            raise self.error

    def iter_pieces(self, poll=0.1):
        """The text pieces as they come, for a thread (gradio); raises the request's error at the end, if any."""
        changed = threading.Event()
        self._listener = changed.set
        while True:
            pieces, done = self.take()
            yield from pieces
            if done:
                break
            changed.wait(poll)
            changed.clear()
        if self.error is not None:
            raise self.error

    async def result(self):
        """The Completion (its text whole), or the request's error."""
        async for _ in self.pieces():  # the completion holds the whole text
            pass
        return self.completion


class Scheduler:
    def __init__(
        self,
        engine,
        max_batch_size=8,
        max_queue=16,
        request_timeout=300.0,
        buffer_limit=64,
        stall_timeout=30.0,
        prefill_chunk=256,
    ):
        self.engine, self.max_batch_size, self.max_queue = engine, max_batch_size, max_queue
        self.request_timeout, self.buffer_limit, self.stall_timeout = request_timeout, buffer_limit, stall_timeout
        self.prefill_chunk = prefill_chunk
        self._pending = collections.deque()
        self._batches = []  # [(Decoding, [Ticket per row])], stepped round-robin
        self._held = 0  # requests pending or generating, not cancelled
        self._ready = threading.Condition()
        self._stop = threading.Event()
        self.steps = 0  # decoding steps taken (prefill chunks and tokens), for tests and logs
        self.thread = threading.Thread(target=self._run, name="generation-worker", daemon=True)
        self.thread.start()

    @property
    def alive(self):
        return self.thread.is_alive()

    @property
    def held(self):
        return self._held

    def submit(self, ids, options) -> Ticket:
        with self._ready:  # checked under the lock the worker's last act (_fail_all) takes: no request is left behind
            if self._stop.is_set() or not self.alive:
                raise ShuttingDown("the server is shutting down")
            if self._held >= self.max_queue:
                raise ServerBusy(f"the server is busy ({self._held} requests held, --max_queue {self.max_queue})")
            ticket = Ticket(self, ids, options, time.monotonic() + self.request_timeout)
            self._pending.append(ticket)
            self._held += 1
            self._ready.notify()
        return ticket

    def wake(self):
        with self._ready:
            self._ready.notify()

    def release(self, ticket):
        """Stop counting `ticket` under max_queue (once), and wake the worker."""
        with self._ready:
            if not ticket.released:
                ticket.released = True
                self._held -= 1
            self._ready.notify()

    def stop(self):
        """Fail every request with ShuttingDown and end the worker (after its current step). Signal-safe."""
        self._stop.set()

    def close(self, timeout=10.0):
        self.stop()
        self.wake()
        self.thread.join(timeout)

    # -- the worker ------------------------------------------------------------------------------------------

    def _run(self):
        try:
            while not self._stop.is_set():
                self._start_pending()  # once per turn: requests that arrive during a turn start as one batch
                turn = list(self._batches)
                for batch in turn:  # one step each, round-robin; the abandoned are dropped before every step
                    if self._stop.is_set():
                        break
                    if self._drop_abandoned(batch) and not self._parked(batch):
                        self._step(batch)
                if not any(not self._parked(batch) for batch in self._batches):
                    with self._ready:
                        if not self._pending and not self._stop.is_set():
                            self._ready.wait(0.05 if self._batches else 0.25)
        except BaseException:  # a bug in the scheduler itself: every request still gets an answer
            logger.exception("The generation worker failed")
            raise
        finally:
            self._fail_all(ShuttingDown("the server is shutting down"))

    def _start_pending(self):
        """Every waiting request joins the round-robin; those with equal options start as one batch."""
        with self._ready:
            pending, self._pending = list(self._pending), collections.deque()
        for ticket in pending:
            if ticket.cancel_reason is not None:  # cancelled while waiting: never started
                self._end(ticket, error=Cancelled(ticket.cancel_reason))
        pending = [ticket for ticket in pending if not ticket.done]
        while pending:
            options = pending[0].options
            batch = [ticket for ticket in pending if ticket.options == options][: self.max_batch_size]
            pending = [ticket for ticket in pending if ticket not in batch]
            try:
                decoding = Decoding(self.engine, [t.ids for t in batch], options, self.prefill_chunk)
            except Exception as error:
                self._fail(batch, error)
                continue
            self._batches.append((decoding, batch))

    def _drop_abandoned(self, batch):
        """Cancelled, timed-out and stalled requests leave the batch; False (and the batch ends) once none is left."""
        decoding, tickets = batch
        now = time.monotonic()
        for row, ticket in enumerate(tickets):
            if ticket.done or not decoding.live(row):
                continue
            error = self._abandoned(ticket, now)
            if error is not None:
                decoding.drop(row)
                self._end(ticket, error=error)
        if decoding.finished:
            self._batches.remove(batch)
            return False
        return True

    def _abandoned(self, ticket, now):
        if ticket.cancel_reason is not None:
            return Cancelled(ticket.cancel_reason)
        if now > ticket.deadline:
            return TimedOut(f"the request ran past --request_timeout ({self.request_timeout:g} s)")
        if ticket.backlog >= self.buffer_limit:
            ticket.parked_since = ticket.parked_since or now
            if now - ticket.parked_since > self.stall_timeout:
                return Cancelled(f"the client read nothing for {self.stall_timeout:g} s")
        else:
            ticket.parked_since = None
        return None

    def _parked(self, batch):
        """A batch whose every live reader already has buffer_limit pieces waiting is not stepped."""
        decoding, tickets = batch
        live = [ticket for row, ticket in enumerate(tickets) if decoding.live(row)]
        return bool(live) and all(ticket.backlog >= self.buffer_limit for ticket in live)

    def _step(self, batch):
        decoding, tickets = batch
        try:
            with self.engine._lock:
                added = decoding.step()
        except Exception as error:  # this batch's requests fail; the worker and the other batches go on
            logger.exception("Generation failed")
            self._batches.remove(batch)
            self._fail([t for row, t in enumerate(tickets) if decoding.live(row)], error)
            return
        self.steps += 1
        for row, piece in added:
            tickets[row].push(piece)
            if not decoding.live(row):
                self._end(tickets[row], completion=decoding.completion(row))
        if decoding.finished:
            self._batches.remove(batch)

    def _fail(self, tickets, error):
        failure = GenerationFailed(f"generation failed: {type(error).__name__}: {error}")
        for ticket in tickets:
            self._end(ticket, error=failure)

    def _fail_all(self, error):
        with self._ready:
            pending, self._pending = list(self._pending), collections.deque()
        for ticket in pending + [ticket for _, tickets in self._batches for ticket in tickets]:
            self._end(ticket, error=error)
        self._batches = []

    def _end(self, ticket, completion=None, error=None):
        if ticket.done:  # only this thread ends tickets: no race
            return
        self.release(ticket)
        ticket.finish(completion, error)
