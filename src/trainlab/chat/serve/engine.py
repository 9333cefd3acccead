"""The thread that owns the model (``Engine``): it admits queued requests (``Job``) into the
rows of a shared key/value cache and decodes every row in use one character a tick."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainlab.chat.config import SamplingConfig
from trainlab.chat.decoding import slides
from trainlab.chat.loading import ChatModel
from trainlab.chat.sampling import batchable, next_token, sample_rows, settle
from trainlab.chat.slots import PREFILL_CHUNK, SlotCache, check_exactness, decode_rows, prefill_row
from trainlab.engine.threads import ThreadTuner


@dataclass
class Limits:
    slots: int = 8
    max_queue: int = 16
    max_prompt_chars: int = 16384
    max_tokens_cap: int = 4096
    # A stream's events go out at most this often (seconds; 0: each character as it comes):
    # one event a character is ~250 bytes of JSON and a wake-up of the server's and the
    # client's event loops, which on a small machine share the cores the decoding needs.
    stream_interval: float = 0.02


class Outbox:
    """What the engine thread sends a request's handler: items put from any thread, taken all
    at once in the event loop, so text that piled up while a client read goes out as one event."""

    def __init__(self) -> None:
        self.items: deque = deque()
        self.ready = asyncio.Event()

    def put(self, item) -> None:  # in the event loop's thread (the engine goes through call_soon_threadsafe)
        self.items.append(item)
        self.ready.set()

    async def take(self) -> list:
        await self.ready.wait()
        self.ready.clear()
        items, self.items = list(self.items), deque()
        return items


@dataclass
class Job:
    """A prompt to continue, how, and where its text goes (an asyncio queue of another thread)."""

    prompt: list[int]
    cfg: SamplingConfig
    stops: list[str]
    loop: asyncio.AbstractEventLoop
    out: Outbox
    generator: torch.Generator = field(default_factory=torch.Generator)
    tokens: list[int] = field(default_factory=list)  # prompt and completion, as the model reads them
    text: str = ""  # the completion so far, stops not applied
    sent: int = 0  # characters of ``text`` already sent
    generated: int = 0
    cancelled: bool = False
    submitted_at: float = field(default_factory=time.perf_counter)
    first_at: float | None = None  # when its first character was taken
    ended_at: float | None = None
    sink: list | None = None  # set during a tick: what it emits waits there, to go out as one call

    def emit(self, kind: str, value: Any = None) -> None:
        if self.sink is not None:  # inside a tick: sent with the tick's others (``Engine._tick``)
            self.sink.append((self, (kind, value)))
            return
        try:
            self.loop.call_soon_threadsafe(self.out.put, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is waiting any more
            pass

    def add(self, piece: str) -> str | None:
        """Take one more character; returns the finish reason when the completion is done.
        Text that may still turn out to be a stop (a stop string's beginning, a trailing
        space at a boundary) is held back until it is known not to be."""
        self.text += piece
        self.generated += 1
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
        self.ended_at = now
        ready, finish = settle(self.text, self.generated, self.cfg, self.stops)
        self._flush(ready)
        return finish

    def _flush(self, upto: int) -> None:
        if upto > self.sent:
            self.emit("text", self.text[self.sent:upto])
            self.sent = upto


def deliver(items: list) -> None:
    """In the event loop: each (outbox, item) of a tick, in order."""
    for out, item in items:
        out.put(item)


class QueueFull(Exception):
    pass


class Closing(Exception):
    """The server is shutting down and takes no more requests."""


def failure_line(e: BaseException) -> str:
    """One line for a failure, whatever its message (an empty one included)."""
    first = (str(e).strip().splitlines() or [""])[0][:200]
    return f"generation failed: {type(e).__name__}" + (f": {first}" if first else "")


class Engine:
    """The thread that owns the model: admits queued jobs into free rows and decodes every
    row one character per tick.

    A failure in one row's own work (its prompt's pass, its sampling, its stops) ends that
    row's request with an error and the others go on; a failure of the pass shared by all
    rows ends the requests in it. The thread survives either and goes on with the next
    requests. ``alive`` and ``heartbeat`` let ``/health`` tell a dead or stuck engine."""

    STUCK_SECONDS = 30.0  # a tick of the 14M model takes milliseconds; this long means stuck

    def __init__(self, cm: ChatModel, limits: Limits, tune_threads: bool = True, warm_up: bool = True,
                 on_ready=None, kernels_root: Path | None = None, own_thread: bool = True) -> None:
        """``own_thread``: decode in a thread of its own, started here; or (False) in the thread
        that calls ``run``, the process's main thread in ``chat serve``: torch's matrix products
        (a prompt's pass) ran about 1.4x slower from another thread than from the main one on a
        2-core EPYC (results/decoding/README.md)."""
        self.cm, self.limits = cm, limits
        self.kernels_root = kernels_root  # where the row kernels are built and kept (None: not used)
        self.kernels = None  # the row kernels, once warm-up has built and checked them
        device = next(cm.model.parameters()).device
        self.device = device
        self.cache = SlotCache(cm.model.cfg, limits.slots, device, dtype=next(cm.model.parameters()).dtype)
        self.slides = slides(cm.model)  # a full row slides (rotary positions) or is rebuilt, as in generate()
        self.notes: list[str] = []  # what warm-up found about this machine's kernels
        self.rows: list[Job | None] = [None] * limits.slots
        self.waiting: deque[Job] = deque()
        self.lock = threading.Condition()
        self.running = True
        self.closing: str | None = None  # set: every job ends with this error (the server is shutting down)
        self.ready = threading.Event()
        self.warm_up_seconds = 0.0
        self.heartbeat = time.monotonic()
        self.tuner = ThreadTuner(enabled=tune_threads and device.type == "cpu")
        self._warm, self._on_ready = warm_up, on_ready
        self.own_thread = own_thread
        if own_thread:
            self.thread = threading.Thread(target=self._loop, name="trainlab-engine", daemon=True)
            self.thread.start()
        else:
            self.thread = threading.current_thread()  # the caller runs it: see run()

    def run(self) -> None:
        """Decode in this thread until ``stop``, then end whatever is left (an engine made with
        ``own_thread=False``)."""
        self.thread = threading.current_thread()
        try:
            self._loop()
        finally:
            self._end_all("the server stopped")

    def submit(self, job: Job) -> None:
        with self.lock:
            if self.closing is not None:
                raise Closing(self.closing)
            if len(self.waiting) >= self.limits.max_queue:
                raise QueueFull
            self.waiting.append(job)
            self.lock.notify()

    def close_all(self, why: str) -> None:
        """End every job, decoding or waiting, with the error ``why``, and admit no more: what a
        shutdown's grace period ends with (each stream gets a final event, each handler returns)."""
        with self.lock:
            self.closing = why
            self.lock.notify()

    def stop(self) -> None:
        """Stop decoding. An engine in its own thread is joined here and what is left ended;
        one that ``run`` drives ends it there, once its loop has seen this."""
        with self.lock:
            self.running = False
            self.lock.notify()
        if self.own_thread:
            self.thread.join(timeout=10)
            self._end_all("the server stopped")  # the thread is gone: nobody else will end them

    @property
    def busy(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def queued(self) -> int:
        return len(self.waiting)

    def health(self) -> tuple[bool, str]:
        """(ok, why not): warming up, stopped, dead, or busy without a tick for too long."""
        if not self.thread.is_alive():
            return False, "the decoding engine has stopped"
        if not self.ready.is_set():
            return False, "warming up"
        if (self.busy or self.queued) and time.monotonic() - self.heartbeat > self.STUCK_SECONDS:
            return False, f"the decoding engine has made no progress for {self.STUCK_SECONDS:.0f} s"
        return True, "ok"

    def warm_up(self) -> float:
        """What this machine's kernels keep exact (``check_exactness``): trimmed passes are used
        only where they give each row the whole pass's bits, and the thread count is tuned only
        where it does not change them; then one prompt's pass and a few decoding passes on a
        scratch row, so that the first request does not pay for first-call costs."""
        t0 = time.perf_counter()
        model = self.cm.model
        if self.device.type == "cpu" and self.kernels_root is not None:
            self._load_kernels()
        if self.device.type == "cpu":
            exact = check_exactness(model)
            self.cache.trimmed = exact.trimmed
            if not exact.trimmed and self.kernels is None:
                self.notes.append("every pass computes all rows over the whole context: a trimmed pass rounds "
                                  "differently on this CPU")
            if not exact.threads:
                self.tuner.enabled = False
                self.notes.append(f"threads pinned at {torch.get_num_threads()}: 1 and 2 threads round differently "
                                  f"on this CPU, and a stream must not change with them")
        logits = prefill_row(model, [0] * min(PREFILL_CHUNK, model.cfg.context_len - 1), self.cache, 0)
        last = torch.zeros(self.cache.slots, dtype=torch.long, device=self.device)
        for _ in range(8):
            logits = self.tuner.run(lambda: self._decode(last, [0]))
        self._free(0)
        del logits
        return time.perf_counter() - t0

    def _load_kernels(self) -> None:
        """Build (or load) the row kernels and keep them where they give each row the same bits
        alone, among others and at 1 and 2 threads (``kernels_exact``); a line in ``notes``
        either way."""
        from trainlab.chat.kernels import load_kernels
        from trainlab.chat.slots import kernels_exact

        model = self.cm.model
        if next(model.parameters()).dtype != torch.float32:
            self.notes.append("decoding: the plain pass (the row kernels are for fp32 weights)")
            return
        kernels, note = load_kernels(self.kernels_root)
        if kernels is not None and not kernels_exact(model, kernels):
            kernels, note = None, "row kernels not used: they rounded a row differently alone and among others here"
        self.kernels = kernels
        self.notes.append(f"decoding: {note}" if kernels is not None else f"decoding: the plain pass ({note})")

    def _decode(self, last: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """One shared pass: the next logits of ``rows`` (len(rows), V), through the row kernels
        (only those rows computed) or the plain pass (every row of the cache computed)."""
        if self.kernels is not None:
            from trainlab.chat.slots import decode_slots

            return decode_slots(self.cm.model, self.kernels, last, self.cache, rows)
        decoding = [r in rows for r in range(self.cache.slots)]
        return decode_rows(self.cm.model, last, self.cache, decoding)[rows]

    def _loop(self) -> None:
        if self._warm:
            try:
                self.warm_up_seconds = self.warm_up()
            except Exception as e:  # noqa: BLE001 (requests will say what fails)
                self.warm_up_seconds = math.nan
                print(f"warning: warm-up failed ({failure_line(e)})", flush=True)
        self.heartbeat = time.monotonic()
        self.ready.set()
        if self._on_ready is not None:
            self._on_ready(self)
        while True:
            with self.lock:
                while self.running and not self.waiting and not any(self.rows):
                    self.lock.wait()
                if not self.running:
                    return
                if self.closing is not None:
                    self._end_all(self.closing)
                    continue
                for r in range(len(self.rows)):
                    if self.rows[r] is None and self.waiting:
                        self.rows[r] = self.waiting.popleft()  # no tokens yet: started at the next tick
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 (the shared pass failed: its jobs end, not the server)
                for r, job in enumerate(self.rows):
                    if job is not None:
                        self._fail(r, e)
            self.heartbeat = time.monotonic()

    def _end_all(self, why: str) -> None:
        """Every job, decoding or waiting, ended with the error ``why``; its row freed."""
        for r, job in enumerate(self.rows):
            if job is not None:
                self._free(r)
                job.emit("error", why)
        while self.waiting:
            self.waiting.popleft().emit("error", why)

    def _free(self, r: int) -> None:
        self.rows[r] = None
        self.cache.lengths[r] = 0

    def _fail(self, r: int, e: BaseException) -> None:
        job = self.rows[r]
        self._free(r)
        if job is not None:
            job.emit("error", failure_line(e))

    def _take(self, r: int, logits: torch.Tensor, tok: int | None = None) -> None:
        """Sample row r's next character from ``logits`` (unless ``sample_rows`` drew it:
        ``tok``) and pass it to its job."""
        job = self.rows[r]
        if tok is None:
            window = job.tokens[-job.cfg.repetition_window:] if job.cfg.repetition_window else []
            tok = next_token(logits.float().cpu(), torch.tensor(window, dtype=torch.long), job.cfg, job.generator)
        job.tokens.append(tok)
        finish = job.add(self.cm.vocab.chars[tok])
        if finish is not None:
            job.emit("end", finish)
            self._free(r)

    def _tick(self) -> None:
        """One character for every row in use. What the tick's jobs emit goes to the event loop
        in one call at its end: each call wakes the loop's thread, which then takes the GIL
        from this one between its kernels."""
        sink: list = []
        jobs = [job for job in self.rows if job is not None]
        for job in jobs:
            job.sink = sink
        try:
            self._tick_rows()
        finally:
            for job in jobs:
                job.sink = None
            by_loop: dict = {}
            for job, item in sink:
                by_loop.setdefault(job.loop, []).append((job.out, item))
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(deliver, items)
                except RuntimeError:  # the event loop is closed: nobody is waiting any more
                    pass

    def _tick_rows(self) -> None:
        model, ctx = self.cm.model, self.cm.model.cfg.context_len
        keep = max(1, ctx - ctx // 4)  # as generate(): when the context fills, keep its last three quarters
        decoding = [False] * self.cache.slots
        for r, job in enumerate(self.rows):
            if job is None:
                continue
            if job.cancelled:  # its client left: the row is freed and its handler told, so it ends too
                self._free(r)
                job.emit("cancelled")
                continue
            try:
                if not job.tokens:  # new: its prompt (its last window of it) goes in alone
                    job.tokens = list(job.prompt)
                    self._take(r, self.tuner.whole(lambda: prefill_row(model, job.tokens[-ctx:], self.cache, r)))
                elif self.cache.lengths[r] >= ctx and not self.slides:  # full: start again from the recent part
                    self._take(r, self.tuner.whole(lambda: prefill_row(model, job.tokens[-keep:], self.cache, r)))
                else:
                    if self.cache.lengths[r] >= ctx:  # full, rotary: the oldest quarter goes, the rest stays
                        self.cache.slide(model, r, max(1, ctx - keep))  # a context under 4 still drops one
                    decoding[r] = True  # its next character comes from this tick's shared pass
            except Exception as e:  # noqa: BLE001 (this row's own work: the others go on)
                self._fail(r, e)
        active = [r for r, d in enumerate(decoding) if d]
        if not active:
            return
        last = [job.tokens[-1] if job is not None and job.tokens else 0 for job in self.rows]
        last = torch.tensor(last + [0] * (self.cache.slots - len(last)), device=self.device)  # (cache rows,)
        logits = self.tuner.run(lambda: self._decode(last, active))  # (len(active), V)
        logits = logits.float().cpu()  # one copy to the host for every row (on a GPU, one wait a tick, not one a row)
        # most rows: one batched draw (each row's token as next_token's, from its own generator);
        # a row with non-finite logits goes alone, where next_token's checks end it with an error
        batch = [i for i, r in enumerate(active) if batchable(self.rows[r].cfg)]
        if len(batch) > 1:  # one row alone: next_token's few ops cost less than the batch's set-up
            finite = torch.isfinite(logits).all(dim=-1).tolist()
            batch = [i for i in batch if finite[i]]
        drawn: dict[int, int] = {}
        if len(batch) > 1:
            try:
                toks = sample_rows(logits[batch], [self.rows[active[i]].cfg.temperature for i in batch],
                                   [self.rows[active[i]].generator for i in batch])
                drawn = dict(zip(batch, toks))
            except Exception:  # noqa: BLE001 (each row then samples alone, and fails alone if it must)
                drawn = {}
        for i, r in enumerate(active):
            try:
                self.cache.lengths[r] += 1
                self._take(r, logits[i], drawn.get(i))
            except Exception as e:  # noqa: BLE001
                self._fail(r, e)
