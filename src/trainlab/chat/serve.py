"""``trainlab chat serve``: a chat page at ``/`` and an OpenAI-compatible API under ``/v1``.

Stack: Starlette, served by uvicorn. Starlette gives routing, streaming responses and a
test client in a small, well-kept package. Request bodies are pydantic models in strict
mode (``parse_request``), whose first error becomes a 400 in OpenAI's own shape; FastAPI
would add its own error shape on top, which OpenAI's clients do not expect.

One thread owns the model (``Engine``). Requests wait in a queue (at most ``max_queue``;
past that, 429) for one of ``slots`` rows of a shared key/value cache. A new request's
prompt runs through the model alone (``prefill_row``); then every tick decodes one
character for every row in use at once: the weights are read once for all of them, so 8
streams run nearly as fast each as one alone (measured: ``benchmarks/serve_latency.py``).
A stream's numbers, and its text for a given ``seed``, do not depend on the others: the
row kernels (``chat/kernels.py``, through ``slots.decode_slots``) give a row the same bits
whatever rows share its pass, so a tick computes only the rows in use; where they cannot be
built or do not hold on this machine, every tick computes every row of the cache, used or
not (``decode_rows``). Sampling is ``chat.sampling.next_token``, the function
``generate`` and ``repl`` use, in the same documented order.

Chat messages become the corpus's dialogue (as in the repl): ``user`` turns are spoken by
the user speaker, ``assistant`` turns by the bot; a ``system`` message is written before
the conversation as plain text followed by a blank line, as a stage direction would be
(the model never saw one in training, so it mostly sets a scene). The reply ends where
the corpus ends a turn (a newline for inline dialogue, a blank line for block).

Safe by default: 127.0.0.1 unless told otherwise; with ``--api-key`` every ``/v1``
request needs ``Authorization: Bearer KEY``; only the shipped page, script and style are
served; bodies over ``MAX_BODY`` bytes are refused (413); prompts and ``max_tokens`` are
capped; characters the vocabulary lacks are dropped and counted in ``usage``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from trainlab.chat.config import SamplingConfig
from trainlab.chat.repl import ChatModel, Dialogue
from trainlab.chat.sampling import make_generator, next_token, stop_length
from trainlab.chat.slots import PREFILL_CHUNK, SlotCache, check_exactness, decode_rows, prefill_row
from trainlab.config import ConfigError
from trainlab.engine.threads import ThreadTuner

MAX_BODY = 1 << 20
CLIENT_LEFT = 499  # nginx's status for a request whose client closed the connection before the answer
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript"),
          "/static/style.css": ("style.css", "text/css")}


@dataclass
class Limits:
    slots: int = 8
    max_queue: int = 16
    max_prompt_chars: int = 16384
    max_tokens_cap: int = 4096


class ApiError(Exception):
    """An error in OpenAI's JSON shape, with its HTTP status."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# -- one request's generation ------------------------------------------------------------------
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

    def emit(self, kind: str, value: Any = None) -> None:
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
        for s in self.stops:
            at = self.text.find(s)
            if at >= 0:
                self._flush(at)
                return "stop"
        end = stop_length(self.text, self.cfg.stop_at, self.cfg.min_new_tokens)
        if end is not None:
            self._flush(end)
            return "stop"
        if self.generated >= self.cfg.max_new_tokens:
            self._flush(len(self.text))
            return "length"
        ready = len(self.text.rstrip()) if self.cfg.stop_at != "none" else len(self.text)
        for s in self.stops:  # the longest tail that begins a stop string is held back
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    ready = min(ready, len(self.text) - k)
                    break
        self._flush(ready)
        return None

    def _flush(self, upto: int) -> None:
        if upto > self.sent:
            self.emit("text", self.text[self.sent:upto])
            self.sent = upto


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
                 on_ready=None, kernels_root: Path | None = None) -> None:
        self.cm, self.limits = cm, limits
        self.kernels_root = kernels_root  # where the row kernels are built and kept (None: not used)
        self.kernels = None  # the row kernels, once warm-up has built and checked them
        device = next(cm.model.parameters()).device
        self.device = device
        self.cache = SlotCache(cm.model.cfg, limits.slots, device, dtype=next(cm.model.parameters()).dtype)
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
        self.thread = threading.Thread(target=self._loop, name="trainlab-engine", daemon=True)
        self.thread.start()

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
        with self.lock:
            self.running = False
            self.lock.notify()
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

    def _take(self, r: int, logits: torch.Tensor) -> None:
        """Sample row r's next character from ``logits`` and pass it to its job."""
        job = self.rows[r]
        window = job.tokens[-job.cfg.repetition_window:] if job.cfg.repetition_window else []
        tok = next_token(logits.float().cpu(), torch.tensor(window, dtype=torch.long), job.cfg, job.generator)
        job.tokens.append(tok)
        finish = job.add(self.cm.vocab.chars[tok])
        if finish is not None:
            job.emit("end", finish)
            self._free(r)

    def _tick(self) -> None:
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
                    self._take(r, prefill_row(model, job.tokens[-ctx:], self.cache, r))
                elif self.cache.lengths[r] >= ctx:  # full: start again from the recent part
                    self._take(r, prefill_row(model, job.tokens[-keep:], self.cache, r))
                else:
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
        for i, r in enumerate(active):
            try:
                self.cache.lengths[r] += 1
                self._take(r, logits[i])
            except Exception as e:  # noqa: BLE001
                self._fail(r, e)


# -- the HTTP side ------------------------------------------------------------------------------
# Request bodies, checked strictly by type (pydantic in strict mode): "stream": "false" is
# not a boolean, "n": true and "n": 1.0 are not integers, NaN is no number. Fields OpenAI's
# clients may send that mean nothing here (user, logprobs, ...) are ignored.
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Number = Union[StrictInt, FiniteFloat]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[StrictStr] = None
    stream: StrictBool = False
    n: StrictInt = 1
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[Number] = None
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = None
    repetition_penalty: Optional[Number] = None
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, list[StrictStr], None] = None
    stop_at: Optional[StrictStr] = None


class CompletionRequest(_Request):
    prompt: Union[StrictStr, list[StrictStr]] = ""


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatRequest(_Request):
    messages: list[Message]


def parse_request(body: dict, chat: bool) -> _Request:
    """The body as a request, or a 400 in OpenAI's shape naming the first field that is wrong."""
    try:
        return (ChatRequest if chat else CompletionRequest).model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err.get("loc", ())]
        # a union names each of its branches in the location: the field is what matters
        field = loc[0] if loc else None
        where = ".".join(x for x in loc if not x[:1].isupper() and "[" not in x) or field or "body"
        raise ApiError(400, f"{where}: {err.get('msg', 'invalid')}", param=field) from None


def sampling_from(req: _Request, limits: Limits, stop_at: str) -> tuple[SamplingConfig, list[str]]:
    """The request's sampling settings (OpenAI's names, plus top_k, repetition_penalty and
    stop_at), each checked as the CLI flag of the same meaning is."""
    if req.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = 256 if req.max_tokens is None else req.max_tokens
    if max_tokens < 1 or max_tokens > limits.max_tokens_cap:
        raise ApiError(400, f"max_tokens must be 1..{limits.max_tokens_cap}", param="max_tokens")
    stops = req.stop or []
    stops = [stops] if isinstance(stops, str) else stops
    if len(stops) > 4 or not all(stops):
        raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", param="stop")
    values = {"temperature": 0.8 if req.temperature is None else float(req.temperature),
              "top_p": 1.0 if req.top_p is None else float(req.top_p), "top_k": req.top_k or 0,
              "repetition_penalty": 1.0 if req.repetition_penalty is None else float(req.repetition_penalty),
              "max_new_tokens": max_tokens, "stop_at": req.stop_at or stop_at, "seed": req.seed}
    try:
        return SamplingConfig(**values), stops
    except ConfigError as e:
        raise ApiError(400, str(e), param=e.field) from None


class Metrics:
    """What ``/metrics`` shows, in Prometheus' text format (prometheus-client), in a registry of
    this server's own (so that two servers in one process do not share counts)."""

    def __init__(self, engine: Engine) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter("trainlab_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        Gauge("trainlab_queue_length", "requests waiting for a row", registry=r).set_function(lambda: engine.queued)
        Gauge("trainlab_busy_rows", "rows decoding a request", registry=r).set_function(lambda: engine.busy)
        Gauge("trainlab_rows", "rows decoded together", registry=r).set(engine.limits.slots)
        self.characters = Counter("trainlab_characters_generated", "characters generated", registry=r)
        self.first = Histogram("trainlab_time_to_first_character_seconds", "from request to first character",
                               buckets=(0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10), registry=r)
        self.rate = Histogram("trainlab_characters_per_second", "characters per second of each request after its "
                              "first", buckets=(10, 25, 50, 100, 150, 250, 400, 600, 1000, 2000), registry=r)

    def finished(self, job: Job) -> None:
        self.characters.inc(job.generated)
        if job.first_at is not None:
            self.first.observe(job.first_at - job.submitted_at)
            if job.generated > 1 and job.ended_at is not None and job.ended_at > job.first_at:
                self.rate.observe((job.generated - 1) / (job.ended_at - job.first_at))


class Server:
    """The Starlette app around one loaded model."""

    def __init__(self, cm: ChatModel, dialogue: Dialogue, info: dict[str, Any], api_key: str | None = None,
                 limits: Limits | None = None, tune_threads: bool = True, on_ready=None,
                 access_log=None, kernels_root: Path | None = None) -> None:
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.cm, self.dialogue, self.info, self.api_key = cm, dialogue, info, api_key
        self.limits = limits or Limits()
        self.model_id = str(info.get("model", "trainlab-chat"))
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop serving it, once started
        self.engine = Engine(cm, self.limits, tune_threads, on_ready=on_ready, kernels_root=kernels_root)
        self.metrics = Metrics(self.engine)
        self.access_log = access_log  # one line per request (method, path, status, time), never a body
        routes = [Route(path, self.static) for path in STATIC]
        routes += [Route("/info", self.describe), Route("/health", self.health), Route("/metrics", self.prometheus),
                   Route("/v1/models", self.models),
                   Route("/v1/completions", self.completions, methods=["POST"]),
                   Route("/v1/chat/completions", self.chat, methods=["POST"])]
        self.starlette = Starlette(routes=routes, exception_handlers={404: self.not_found, 405: self.not_allowed},
                                   lifespan=self._lifespan)
        self.app = self._logged(self.starlette)  # what uvicorn serves

    @contextlib.asynccontextmanager
    async def _lifespan(self, app):
        self.loop = asyncio.get_running_loop()
        yield
        self.engine.stop()

    def shut_down(self, grace: float) -> None:
        """A graceful shutdown began (uvicorn takes no new connections): running requests get
        ``grace`` seconds to finish, then every one still open ends with a final error event.
        Called in the event loop."""
        asyncio.get_running_loop().call_later(max(0.0, grace), self.engine.close_all,
                                              f"the server is shutting down (its {grace:g} s grace period is over)")

    def _logged(self, app):
        """The app, counting and logging every request by its status when its response starts."""
        endpoints = set(STATIC) | {"/info", "/health", "/metrics", "/v1/models", "/v1/completions",
                                   "/v1/chat/completions"}

        async def asgi(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            t0 = time.perf_counter()
            path = scope.get("path", "")
            endpoint = path if path in endpoints else "other"

            async def sending(message):
                if message["type"] == "http.response.start":
                    status = message["status"]
                    self.metrics.requests.labels(endpoint, str(status)).inc()
                    if self.access_log is not None:
                        client = scope.get("client") or ("-", 0)
                        self.access_log(f'{client[0]} "{scope.get("method", "?")} {path[:200]}" {status} '
                                        f"{1000 * (time.perf_counter() - t0):.0f} ms")
                await send(message)

            await app(scope, receive, sending)

        return asgi

    # -- plumbing
    def _json(self, data: Any, status: int = 200):
        from starlette.responses import JSONResponse

        return JSONResponse(data, status_code=status)

    async def not_found(self, request, exc):
        return self._json(ApiError(404, f"no such path: {request.url.path[:100]}", code="not_found").body(), 404)

    async def not_allowed(self, request, exc):
        return self._json(ApiError(405, f"{request.method} is not allowed here").body(), 405)

    def _check_key(self, request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:] if header.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", kind="authentication_error",
                           code="invalid_api_key")

    async def _body(self, request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > MAX_BODY):
            raise ApiError(413, f"request body over {MAX_BODY} bytes")
        data = b""
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY:
                raise ApiError(413, f"request body over {MAX_BODY} bytes")
        try:
            body = json.loads(data or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise ApiError(400, "the body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        return body

    def _encode(self, text: str) -> tuple[list[int], int]:
        ids, lacking = self.cm.vocab.encode_known(text)
        return ids.tolist(), len(lacking)

    # -- routes
    async def static(self, request):
        from starlette.responses import Response

        name, media = STATIC[request.url.path]
        data = (resources.files("trainlab.chat") / "static" / name).read_bytes()
        return Response(data, media_type=media, headers={"Cache-Control": "no-cache"})

    async def describe(self, request):
        return self._json({**self.info, "auth": self.api_key is not None, "dialogue": vars(self.dialogue)})

    async def health(self, request):
        ok, why = self.engine.health()
        if ok:
            return self._json({"status": "ok"})
        return self._json({"status": "unavailable", "error": {"message": why, "type": "unavailable",
                                                              "param": None, "code": "unavailable"}}, 503)

    async def prometheus(self, request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        from starlette.responses import Response

        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def models(self, request):
        try:
            self._check_key(request)
        except ApiError as e:
            return self._json(e.body(), e.status)
        return self._json({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                        "created": int(self.info.get("created", 0)),
                                                        "owned_by": "trainlab"}]})

    async def completions(self, request):
        return await self._serve(request, chat=False)

    async def chat(self, request):
        return await self._serve(request, chat=True)

    def _chat_prompt(self, messages: list[Message]) -> str:
        if not messages:
            raise ApiError(400, "messages must be a non-empty list", param="messages")
        d = self.dialogue
        text = ""
        for m in messages:
            if m.role == "system":
                text += m.content.strip() + "\n\n"
            else:
                speaker = d.user if m.role == "user" else d.bot
                text += d.cue(speaker) + m.content.strip() + d.end
        return text + d.cue(d.bot)

    def _job(self, body: dict, chat: bool) -> tuple[Job, _Request, int]:
        """The request checked and queued as a job; (job, request, characters dropped)."""
        req = parse_request(body, chat)
        if req.model is not None and req.model != self.model_id:
            raise ApiError(404, f"no model {req.model[:80]!r}; this server has {self.model_id!r}",
                           code="model_not_found", param="model")
        if chat:
            prompt_text, default_stop_at = self._chat_prompt(req.messages), self.dialogue.stop_at
        else:
            prompt = req.prompt
            if isinstance(prompt, list):
                if len(prompt) != 1:
                    raise ApiError(400, "prompt must be a string (or a list of one)", param="prompt")
                prompt = prompt[0]
            prompt_text, default_stop_at = prompt, "none"
        if len(prompt_text) > self.limits.max_prompt_chars:
            raise ApiError(400, f"the prompt is over {self.limits.max_prompt_chars} characters", param="prompt")
        cfg, stops = sampling_from(req, self.limits, default_stop_at)
        ids, dropped = self._encode(prompt_text)
        if not ids:  # an empty prompt starts from a new line, as generate does
            ids = self._encode("\n")[0] or [0]
        job = Job(ids, cfg, stops, asyncio.get_running_loop(), Outbox(), make_generator(cfg.seed))
        try:
            self.engine.submit(job)
        except QueueFull:
            raise ApiError(429, "too many requests waiting; try again shortly", kind="rate_limit_error",
                           code="queue_full") from None
        except Closing as e:
            raise ApiError(503, str(e), kind="unavailable", code="shutting_down") from None
        return job, req, dropped

    async def _serve(self, request, chat: bool):
        try:
            self._check_key(request)
            if not self.engine.ready.is_set():
                raise ApiError(503, "the model is warming up; try again shortly", kind="unavailable",
                               code="warming_up")
            job, req, dropped = self._job(await self._body(request), chat)
        except ApiError as e:
            return self._json(e.body(), e.status)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(8)}"
        created = int(time.time())
        n_prompt = len(job.prompt)
        usage = lambda: {"prompt_tokens": n_prompt, "completion_tokens": job.generated,  # noqa: E731
                         "total_tokens": n_prompt + job.generated, "dropped_characters": dropped}
        if req.stream:
            return self._stream(job, rid, created, chat, usage)
        watcher = asyncio.ensure_future(self._watch_disconnect(request, job))
        text, finish = "", None
        try:
            while finish is None:
                for kind, value in await job.out.take():
                    if kind == "text":
                        text += value
                    elif kind == "end":
                        finish = value
                    elif kind == "cancelled":  # the client left: counted as nginx counts it, 499
                        return self._json(ApiError(CLIENT_LEFT, "the client closed the connection",
                                                   code="client_closed_request").body(), CLIENT_LEFT)
                    else:
                        status = 503 if self.engine.closing is not None else 500
                        return self._json(ApiError(status, value, kind="unavailable" if status == 503
                                                   else "server_error").body(), status)
        finally:
            job.cancelled = True  # a client that left (or a handler cancelled) frees its row at the next tick
            watcher.cancel()
            self.metrics.finished(job)
        choice = {"index": 0, "finish_reason": finish}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
            obj = "chat.completion"
        else:
            choice.update(text=text, logprobs=None)
            obj = "text_completion"
        return self._json({"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [choice],
                           "usage": usage()})

    @staticmethod
    async def _watch_disconnect(request, job: Job) -> None:
        """When its client goes away (the body is read: what comes next on the connection is
        its end), the job is cancelled, which frees its row at the engine's next tick, and its
        handler is told at once."""
        while True:
            message = await request.receive()
            if message.get("type") == "http.disconnect":
                job.cancelled = True
                job.out.put(("cancelled", None))
                return

    def _stream(self, job: Job, rid: str, created: int, chat: bool, usage):
        from starlette.responses import StreamingResponse

        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: dict | str | None, finish: str | None, with_usage: bool = False) -> str:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if chat:
                choice["delta"] = delta or {}
            else:
                choice.update(text=delta or "", logprobs=None)
            data = {"id": rid, "object": obj, "created": created, "model": self.model_id, "choices": [choice]}
            if with_usage:
                data["usage"] = usage()
            return f"data: {json.dumps(data)}\n\n"

        async def events():
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""}, None)
                finish = None
                while finish is None:
                    items = await job.out.take()
                    text = "".join(v for k, v in items if k == "text")  # what piled up goes out as one event
                    if text:
                        yield chunk({"content": text} if chat else text, None)
                    for kind, value in items:
                        if kind == "end":
                            finish = value
                            yield chunk(None, value, with_usage=True)
                        elif kind == "cancelled":
                            finish = "cancelled"
                        elif kind == "error":
                            finish = "error"
                            yield f"data: {json.dumps(ApiError(500, value, kind='server_error').body())}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True  # a client that left frees its row at the next tick
                self.metrics.finished(job)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def checkpoint_info(ckpt, run_id: str) -> dict[str, Any]:
    """What the page shows of the checkpoint it serves: run, step, val loss."""
    info: dict[str, Any] = {"model": run_id, "run": run_id, "step": ckpt.step, "checkpoint": str(ckpt.path),
                            "created": int(ckpt.meta.get("saved_at", time.time()))}
    try:
        state = ckpt.tensors("gpt/train_state.pt")
        evals = state.get("evals") or []
        if evals and "val_loss" in evals[-1]:
            info["val_loss"] = float(evals[-1]["val_loss"])
    except Exception:  # noqa: BLE001 (the page can do without it)
        pass
    return info


def uvicorn_server(server: Server, grace: float = 5.0, **config: Any):
    """The uvicorn server that runs ``server.app``. On SIGTERM or Ctrl+C it stops taking
    connections, gives running requests ``grace`` seconds (``Server.shut_down``), then ends
    them with a final event; uvicorn's own forced cancel is a backstop a second later."""
    import uvicorn

    class Graceful(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            server.shut_down(grace)
            await super().shutdown(sockets)

    return Graceful(uvicorn.Config(server.app, timeout_graceful_shutdown=max(1, math.ceil(grace + 1)), **config))
