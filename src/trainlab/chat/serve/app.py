"""The HTTP side: the Starlette app around one loaded model (``Server``: the chat page, the
OpenAI-compatible routes, health, metrics, the access log) and the uvicorn server that runs it
with a graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import math
import secrets
import time
from importlib import resources
from pathlib import Path
from typing import Any

from trainlab.chat.loading import ChatModel
from trainlab.chat.repl import Dialogue
from trainlab.chat.sampling import make_generator
from trainlab.chat.serve.api import ApiError, Message, Request, parse_request, sampling_from
from trainlab.chat.serve.engine import Closing, Engine, Job, Limits, Outbox, QueueFull
from trainlab.chat.serve.metrics import Metrics

MAX_BODY = 1 << 20
CLIENT_LEFT = 499  # nginx's status for a request whose client closed the connection before the answer
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/static/app.js": ("app.js", "text/javascript"),
          "/static/style.css": ("style.css", "text/css")}


class Server:
    """The Starlette app around one loaded model."""

    def __init__(self, cm: ChatModel, dialogue: Dialogue, info: dict[str, Any], api_key: str | None = None,
                 limits: Limits | None = None, tune_threads: bool = True, on_ready=None,
                 access_log=None, kernels_root: Path | None = None, engine_thread: bool = True) -> None:
        from starlette.applications import Starlette
        from starlette.routing import Route

        self.cm, self.dialogue, self.info, self.api_key = cm, dialogue, info, api_key
        self.limits = limits or Limits()
        self.model_id = str(info.get("model", "trainlab-chat"))
        self.loop: asyncio.AbstractEventLoop | None = None  # the event loop serving it, once started
        self.engine = Engine(cm, self.limits, tune_threads, on_ready=on_ready, kernels_root=kernels_root,
                             own_thread=engine_thread)  # False: the caller runs engine.run()
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

    def _job(self, body: dict, chat: bool) -> tuple[Job, Request, int]:
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
                finish, sent_at = None, None
                interval = self.limits.stream_interval
                while finish is None:
                    if sent_at is not None and interval > 0:  # the first event goes at once, then one an interval
                        wait = sent_at + interval - time.perf_counter()
                        if wait > 0:
                            await asyncio.sleep(wait)
                    items = await job.out.take()
                    text = "".join(v for k, v in items if k == "text")  # what piled up goes out as one event
                    if text:
                        yield chunk({"content": text} if chat else text, None)
                        sent_at = time.perf_counter()
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
