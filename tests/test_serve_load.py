"""`trainlab chat serve` under real use: requests arriving at random with prompts shorter than,
as long as and longer than the context, streamed or not, some leaving early; a failure in
one row or in the shared pass; strict request bodies; /health, /metrics and the access log."""

from __future__ import annotations

import asyncio
import json
import random
import re
import time

import httpx
import pytest
import torch
from helpers import link_suite_kernels, trained_play
from test_serve import Live, raw

from trainlab.chat.loading import load_chat_model
from trainlab.chat.serve import engine as serve_module
from trainlab.chat.slots import SlotCache, decode_rows, prefill_row
from trainlab.engine.tracking import resolve_checkpoint

CONTEXT = 80  # three prefill chunks of 32: prompts longer than one chunk, and than the context


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    return trained_play(tmp_path_factory, "serve-load", "--max-steps", "20", "--eval-every", "20",
                        "--context-len", str(CONTEXT), "--sample-every", "0")


@pytest.fixture(scope="module")
def busy(long_context):
    srv = Live(long_context, slots=8, max_queue=16)
    yield srv
    srv.close()


def idle(srv, timeout: float = 30.0) -> None:
    """Wait until no row is busy and nothing waits (a left request frees its row at a tick)."""
    deadline = time.monotonic() + timeout
    while srv.server.engine.busy or srv.server.engine.queued:
        assert time.monotonic() < deadline, f"rows still busy: {srv.server.engine.busy}"
        time.sleep(0.02)


def prompt_of(kind: str, rng: random.Random) -> str:
    line = "ANNA:\nThe boat is late again.\n\nBORIS:\nBring the red lamp.\n\n"
    n = {"short": rng.randint(1, 20), "context": CONTEXT, "longer": CONTEXT + rng.randint(1, 40),
         "much longer": 3 * CONTEXT + rng.randint(0, 30)}[kind]
    return (line * (n // len(line) + 1))[:n]


async def ask(url: str, body: dict, leave_after: int | None = None) -> tuple[int, str, str | None]:
    """(status, text received, finish reason); ``leave_after``: close after that many text pieces
    (a stream) or after that many seconds / 100 (a plain request), as a client that gives up."""
    async with httpx.AsyncClient(timeout=120) as http:
        if not body.get("stream"):
            try:
                r = await http.post(url + "/v1/completions", json=body,
                                    timeout=None if leave_after is None else leave_after / 100)
            except httpx.TimeoutException:
                return 0, "", "left"
            if r.status_code != 200:
                return r.status_code, "", None
            choice = r.json()["choices"][0]
            return 200, choice["text"], choice["finish_reason"]
        text, finish, pieces = "", None, 0
        async with http.stream("POST", url + "/v1/completions", json=body) as r:
            if r.status_code != 200:
                return r.status_code, "", None
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                assert "error" not in data, data
                choice = data["choices"][0]
                text += choice["text"]
                finish = choice["finish_reason"] or finish
                pieces += 1
                if leave_after is not None and pieces >= leave_after:
                    return 200, text, "left"
        return 200, text, finish


def test_random_arrivals_of_every_prompt_length_each_get_their_text_alone(busy):
    """The test that would have caught the full-context crash: seeded random arrivals of 2-16
    requests; every one completes (or is refused with 429), and its text is what it gets alone
    with the same seed. Some run past the context (the window slides); some clients leave."""
    rng = random.Random(24)
    for burst in range(3):
        n = rng.randint(2, 16)
        plans = []
        for i in range(n):
            body = {"prompt": prompt_of(rng.choice(["short", "context", "longer", "much longer"]), rng),
                    "max_tokens": rng.choice([5, 30, CONTEXT + 20]), "seed": rng.randrange(2**31),
                    "stream": rng.random() < 0.5, "stop_at": "none", "temperature": 1.0}
            leave = None
            if rng.random() < 0.25:
                leave = rng.randint(1, 3) if body["stream"] else rng.randint(1, 5)
            plans.append((rng.uniform(0, 0.3), body, leave))

        async def together():
            async def one(delay, body, leave):
                await asyncio.sleep(delay)
                return await ask(busy.url, body, leave)
            return await asyncio.gather(*(one(*p) for p in plans))

        results = asyncio.run(together())
        idle(busy)  # every request that left freed its row
        for (delay, body, leave), (status, text, finish) in zip(plans, results):
            assert status in (200, 429, 0), (status, body)
            if status == 429 or finish == "left" and not text:
                continue
            alone = asyncio.run(ask(busy.url, {**body, "stream": False}))
            assert alone[0] == 200
            if finish == "left":
                assert alone[1].startswith(text), (burst, body)
            else:
                assert (text, finish) == alone[1:], (burst, body)
                assert finish == "length" and len(text) == body["max_tokens"]
    assert raw(busy.url, "/health").json() == {"status": "ok"}


@pytest.fixture(scope="module")
def rotary_context(tmp_path_factory):
    return trained_play(tmp_path_factory, "serve-rotary", "--max-steps", "20", "--eval-every", "20",
                        "--context-len", "48", "--positions", "rotary", "--sample-every", "0")


def test_a_rotary_model_slides_its_full_rows_and_each_stream_keeps_its_text_alone(rotary_context, monkeypatch):
    """Past the context a rotary model's row slides (its oldest quarter dropped, nothing run
    again): a stream's only whole pass is its prompt's, and its text is the same among others
    as alone, with the same seed."""
    import trainlab.chat.serve.engine as engine_module

    passes = []
    real = engine_module.prefill_row
    monkeypatch.setattr(engine_module, "prefill_row",
                        lambda model, tokens, cache, row: passes.append(len(tokens)) or real(model, tokens, cache, row))
    srv = Live(rotary_context, slots=8)
    try:
        passes.clear()  # the warm-up's
        bodies = [{"prompt": "ANNA:\nThe boat is late.\n" * k, "max_tokens": 48 * 3 + 7 * k, "seed": k,
                   "stop_at": "none", "temperature": 1.0} for k in range(1, 5)]

        async def together():
            return await asyncio.gather(*(ask(srv.url, b) for b in bodies))

        among = asyncio.run(together())
        alone = [asyncio.run(ask(srv.url, b)) for b in bodies]
        assert among == alone
        assert all(status == 200 and len(text) == b["max_tokens"] for (status, text, _), b in zip(alone, bodies))
        assert sorted(passes) == sorted(2 * [min(48, len(b["prompt"])) for b in bodies])  # the prompts only
    finally:
        srv.close()


def test_a_failing_row_ends_its_own_request_and_the_others_go_on(busy, monkeypatch):
    """A row's own work fails (here: taking its characters, with an exception whose message is
    empty): that request gets OpenAI's error JSON, a stream beside it is untouched, and the
    engine goes on serving."""
    engine = busy.server.engine
    real_take = engine._take

    def take(r, logits, tok=None):
        if engine.rows[r].prompt[:1] == busy.server._encode("C")[0]:  # the request that fails
            raise RuntimeError()
        real_take(r, logits, tok)

    ok = {"prompt": "ANNA:\n", "max_tokens": 60, "seed": 5, "stream": True, "stop_at": "none"}
    alone = asyncio.run(ask(busy.url, ok))
    monkeypatch.setattr(engine, "_take", take)

    async def together():
        good = asyncio.ensure_future(ask(busy.url, ok))
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=60) as http:
            bad = await http.post(busy.url + "/v1/completions", json={"prompt": "CLARA:\n", "max_tokens": 20})
        return await good, bad

    good, bad = asyncio.run(together())
    assert good == alone
    assert bad.status_code == 500
    err = bad.json()["error"]
    assert err["type"] == "server_error" and err["message"] == "generation failed: RuntimeError"
    monkeypatch.undo()
    assert engine.thread.is_alive()
    assert asyncio.run(ask(busy.url, ok)) == alone


def test_a_row_whose_logits_are_not_finite_ends_alone_while_the_others_draw_together(busy, monkeypatch):
    """Rows of a tick are drawn together (``sample_rows``), but one whose logits hold a NaN is
    left to ``next_token``, whose checks end that request with an error; the stream beside it
    keeps its text."""
    engine = busy.server.engine
    real_decode = engine._decode
    bad = busy.server._encode("C")[0]

    def decode(last, rows):
        logits = real_decode(last, rows).clone()
        for i, r in enumerate(rows):
            if engine.rows[r] is not None and engine.rows[r].prompt[:1] == bad:
                logits[i, 3] = float("nan")
        return logits

    ok = {"prompt": "ANNA:\n", "max_tokens": 60, "seed": 5, "stream": True, "stop_at": "none"}
    others = [{**ok, "seed": s} for s in (6, 7)]
    alone = [asyncio.run(ask(busy.url, body)) for body in (ok, *others)]
    monkeypatch.setattr(engine, "_decode", decode)

    async def together():
        good = [asyncio.ensure_future(ask(busy.url, body)) for body in (ok, *others)]
        await asyncio.sleep(0.05)
        async with httpx.AsyncClient(timeout=60) as http:
            failed = await http.post(busy.url + "/v1/completions", json={"prompt": "CLARA:\n", "max_tokens": 20})
        return [await g for g in good], failed

    good, failed = asyncio.run(together())
    assert good == alone
    assert failed.status_code == 500 and failed.json()["error"]["message"].startswith("generation failed")
    monkeypatch.undo()
    assert engine.thread.is_alive()


def test_a_failing_shared_pass_ends_its_requests_and_the_engine_survives(busy, monkeypatch):
    calls = {"n": 0}
    real = serve_module.decode_rows

    def fails_once(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("")  # an empty message once raised again inside the handler
        return real(*args, **kwargs)

    monkeypatch.setattr(serve_module, "decode_rows", fails_once)
    r = raw(busy.url, "/v1/completions", {"prompt": "ANNA:\n", "max_tokens": 20})
    assert r.status_code == 500 and r.json()["error"]["message"] == "generation failed: ValueError"
    r = raw(busy.url, "/v1/completions", {"prompt": "ANNA:\n", "max_tokens": 20})
    assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 20
    assert busy.server.engine.thread.is_alive() and raw(busy.url, "/health").status_code == 200


def test_a_prompt_that_fills_the_context_beside_a_stream_does_not_touch_the_others_cache(long_context):
    """The mechanism under the crash: a row prefilled to the whole context is not decoded in
    the pass that follows (its position would be outside the context), and that pass leaves
    its cache as it was; decoding a row at the context is refused, not an index error."""
    cm = load_chat_model(resolve_checkpoint(long_context, "chat", "srv"), torch.device("cpu"))
    model, ctx = cm.model, cm.model.cfg.context_len
    cache = SlotCache(model.cfg, 8)
    prefill_row(model, list(range(5)), cache, 0)
    prefill_row(model, [1] * ctx, cache, 1)  # a full window
    before = cache.k[:, 1].clone(), cache.v[:, 1].clone()
    tokens = torch.zeros(8, dtype=torch.long)
    decode_rows(model, tokens, cache, [True, False])
    assert torch.equal(cache.k[:, 1], before[0]) and torch.equal(cache.v[:, 1], before[1])
    assert cache.lengths[:2] == [5, ctx]
    with pytest.raises(ValueError, match="outside the context"):
        decode_rows(model, tokens, cache, [True, True])


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a", "stream": "false"}, "stream"),
    ({"prompt": "a", "n": True}, "n"),
    ({"prompt": "a", "n": 1.0}, "n"),
    ({"prompt": "a", "seed": "1"}, "seed"),
    ({"prompt": "a", "seed": 1.5}, "seed"),
    ({"prompt": "a", "max_tokens": "9"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"),
    ({"prompt": "a", "stop": 5}, "stop"),
    ({"prompt": "a", "stop": ["x", 3]}, "stop"),
    ({"prompt": "a", "temperature": True}, "temperature"),
    ({"prompt": "a", "top_k": 2.5}, "top_k"),
    ({"prompt": "a", "stop_at": 1}, "stop_at"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "a", "model": 7}, "model"),
])
def test_request_fields_are_checked_by_type_not_truthiness(busy, body, param):
    r = raw(busy.url, "/v1/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]


@pytest.mark.parametrize("content", [b'{"prompt": "a", "temperature": NaN}', b'{"prompt": "a", "top_p": Infinity}'])
def test_non_finite_numbers_are_refused(busy, content):
    r = raw(busy.url, "/v1/completions", content=content)
    assert r.status_code == 400 and r.json()["error"]["param"] in ("temperature", "top_p")


def test_chat_messages_are_checked_by_type(busy):
    for messages, param in (([{"role": "user", "content": 5}], "messages"),
                            ([{"role": "robot", "content": "hi"}], "messages"), ("hi", "messages"), ([], "messages")):
        r = raw(busy.url, "/v1/chat/completions", {"messages": messages})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (messages, r.text)


def pending_tasks(srv) -> int:
    """The asyncio tasks alive in the server's event loop, this count's own aside."""
    async def count() -> int:
        return len(asyncio.all_tasks()) - 1

    return asyncio.run_coroutine_threadsafe(count(), srv.server.loop).result(10)


def test_plain_requests_whose_clients_leave_end_their_handlers_and_are_counted(long_context):
    """20 plain requests abandoned mid-answer (8 decoding, 12 waiting): every row is freed,
    every handler ends (the event loop holds no more tasks than before) and each is counted as
    nginx counts a client that left, 499."""
    srv = Live(long_context, slots=8, max_queue=20, max_tokens_cap=10 ** 6)
    try:
        idle(srv)
        before = pending_tasks(srv)
        body = {"prompt": "ANNA:\n", "max_tokens": 10 ** 6, "stop_at": "none"}

        async def leave_all():
            return await asyncio.gather(*(ask(srv.url, body, leave_after=40) for _ in range(20)))

        results = asyncio.run(leave_all())
        assert all(r[2] == "left" for r in results), [r for r in results if r[2] != "left"]
        idle(srv, timeout=10)  # long before 20 x 1,000,000 characters would have been decoded
        deadline = time.monotonic() + 10
        while pending_tasks(srv) > before:
            assert time.monotonic() < deadline, f"handlers still waiting: {pending_tasks(srv) - before} tasks"
            time.sleep(0.05)
        text = raw(srv.url, "/metrics").text
        assert 'trainlab_requests_total{endpoint="/v1/completions",status="499"} 20.0' in text
        assert "trainlab_busy_rows 0.0" in text and "trainlab_queue_length 0.0" in text
        r = raw(srv.url, "/v1/completions", {"prompt": "ANNA:\n", "max_tokens": 5})  # and it still serves
        assert r.status_code == 200 and len(r.json()["choices"][0]["text"]) == 5
    finally:
        srv.close()


@pytest.mark.parametrize("grace", ["-1", "nan", "inf", "soon"])
def test_a_bad_grace_period_is_one_line(long_context, capsys, grace):
    from trainlab.cli import main

    assert main(["chat", "serve", "--checkpoint", "srv", "--runs-dir", str(long_context), "--grace", grace]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--grace" in err[0], err


def test_sigterm_gives_streams_a_grace_period_then_a_final_event_and_exits(long_context, tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    grace = 1.5
    link_suite_kernels(long_context)  # a build of the server's own took most of this test's 37 s
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "trainlab", "chat", "serve", "--checkpoint", "srv", "--runs-dir",
                             str(long_context), "--port", str(port), "--grace", str(grace), "--quiet",
                             "--max-tokens-cap", "1000000", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        for line in proc.stdout:
            if line.startswith("ready:"):
                break
        else:
            raise AssertionError(f"the server did not start (exit {proc.wait()})")
        url = f"http://127.0.0.1:{port}"
        streams: list[list[str]] = [[], []]
        started = [threading.Event(), threading.Event()]

        def read(i: int) -> None:
            body = {"prompt": "ANNA:\n", "max_tokens": 1000000, "stop_at": "none", "stream": True}
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        streams[i].append(line[6:])
                        started[i].set()

        readers = [threading.Thread(target=read, args=(i,), daemon=True) for i in range(2)]
        for t in readers:
            t.start()
        assert all(e.wait(30) for e in started)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=grace + 10)
        took = time.monotonic() - t0
        for t in readers:
            t.join(5)
        assert code == 0 and took <= grace + 1.0, (code, took)
        assert took >= grace - 0.2  # the streams did get their grace period
        for events in streams:
            assert events[-1] == "[DONE]"
            final = json.loads(events[-2])
            assert "shutting down" in final["error"]["message"], final
            assert len(events) > 3  # text came before the end
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_health_is_503_while_warming_up_then_ok(long_context, monkeypatch):
    gate = __import__("threading").Event()
    real = serve_module.Engine.warm_up

    def slow_warm_up(self):
        gate.wait(30)
        return real(self)

    monkeypatch.setattr(serve_module.Engine, "warm_up", slow_warm_up)
    seen = []
    srv = Live(long_context, server_kw={"on_ready": lambda engine: seen.append(engine.warm_up_seconds)}, ready=False)
    try:
        r = raw(srv.url, "/health")
        assert r.status_code == 503 and r.json()["error"]["message"] == "warming up"
        r = raw(srv.url, "/v1/completions", {"prompt": "a", "max_tokens": 3})
        assert r.status_code == 503 and r.json()["error"]["code"] == "warming_up"
        gate.set()
        srv.server.engine.ready.wait(30)
        assert raw(srv.url, "/health").json() == {"status": "ok"} and seen and seen[0] > 0
        assert raw(srv.url, "/v1/completions", {"prompt": "a", "max_tokens": 3}).status_code == 200
    finally:
        gate.set()
        srv.close()


def test_metrics_and_the_access_log(long_context):
    lines: list[str] = []
    srv = Live(long_context, api_key="k3y-secret", server_kw={"access_log": lines.append})
    try:
        srv.server.engine.ready.wait(30)
        secret = "ANNA:\nsecret-prompt"
        for _ in range(2):
            r = raw(srv.url, "/v1/completions", {"prompt": secret, "max_tokens": 7}, key="k3y-secret")
            assert r.status_code == 200
        assert raw(srv.url, "/v1/completions", {"prompt": "x"}, key="wrong").status_code == 401
        text = raw(srv.url, "/metrics").text
        assert 'trainlab_requests_total{endpoint="/v1/completions",status="200"} 2.0' in text
        assert 'trainlab_requests_total{endpoint="/v1/completions",status="401"} 1.0' in text
        assert "trainlab_characters_generated_total 14.0" in text
        assert "trainlab_time_to_first_character_seconds_count 2.0" in text
        assert "trainlab_characters_per_second_count 2.0" in text
        assert "trainlab_queue_length 0.0" in text and "trainlab_busy_rows 0.0" in text
        requests = [line for line in lines if "/v1/completions" in line]
        assert len(requests) == 3
        assert all(re.fullmatch(r'127\.0\.0\.1 "POST /v1/completions" (200|401) \d+ ms', line) for line in requests)
        assert not any("secret" in line or "k3y" in line for line in lines)
    finally:
        srv.close()


def test_trimmed_passes_are_used_only_where_they_keep_every_bit(long_context, monkeypatch):
    """A trimmed pass (the rows and positions in use) must give each row the whole pass's bits;
    the check finds a kernel that does not (here: attention made to round differently over a
    shorter span) and the server then computes every pass whole, saying so."""
    from trainlab.chat import slots as model_module
    from trainlab.chat.slots import check_exactness

    cm = load_chat_model(resolve_checkpoint(long_context, "chat", "srv"), torch.device("cpu"))
    model, ctx = cm.model, cm.model.cfg.context_len
    exact = check_exactness(model)
    # greedy decoding of three rows, trimmed and whole, step by step: the same logits, bit for bit
    if exact.trimmed:
        runs = []
        for trimmed in (False, True):
            cache = SlotCache(model.cfg, 8, trimmed=trimmed)
            toks = torch.zeros(8, dtype=torch.long)
            for r, n in enumerate((3, 30, 50)):
                toks[r] = int(prefill_row(model, [i % model.cfg.vocab_size for i in range(n)], cache, r).argmax())
            out = []
            for _ in range(ctx - 51):
                logits = decode_rows(model, toks, cache, [True, True, True])
                for r in range(3):
                    cache.lengths[r] += 1
                out.append(logits[:3].clone())
                toks[:3] = logits[:3].argmax(-1)
            runs.append(torch.stack(out))
        assert torch.equal(runs[0], runs[1])
    real = model_module.attend_written_out

    def rounds_differently(q, k, v, mask):
        out = real(q, k, v, mask)
        return out * (1 + 1e-6) if k.shape[2] < ctx else out

    monkeypatch.setattr(model_module, "attend_written_out", rounds_differently)
    assert check_exactness(model).trimmed is False
    srv = Live(long_context)
    try:
        assert srv.server.engine.cache.trimmed is False
        assert any("trimmed pass rounds differently" in n for n in srv.server.engine.notes)
    finally:
        srv.close()


def test_prefill_pads_to_whole_quanta_and_every_shape_is_checked_at_each_thread_count(long_context, monkeypatch):
    """A prompt's pass is padded to the next multiple of 16 (a 200-character prompt costs 208
    positions, not 256), every such shape a prompt may need is checked at 1 and 2 threads, and a
    kernel that rounds differently by thread count in one of them turns the thread tuning off."""
    from trainlab.chat import slots as model_module
    from trainlab.chat.slots import PREFILL_CHUNK, check_exactness, prefill_chunks, prefill_exact, prefill_shapes

    assert prefill_chunks(200) == [(0, 200, 208)] and prefill_chunks(192) == [(0, 192, 192)]
    assert prefill_chunks(3) == [(0, 3, 16)]
    assert prefill_chunks(PREFILL_CHUNK + 20) == [(0, PREFILL_CHUNK, PREFILL_CHUNK), (PREFILL_CHUNK, 20, 32)]
    assert prefill_shapes(256) == [(0, c) for c in range(16, 257, 16)]
    assert (PREFILL_CHUNK, 48) in prefill_shapes(PREFILL_CHUNK + 40)
    cm = load_chat_model(resolve_checkpoint(long_context, "chat", "srv"), torch.device("cpu"))
    model = cm.model
    passes = []
    real_forward = model_module._serve_forward

    def counted(model, tokens, *a, **kw):
        passes.append((torch.get_num_threads(), tokens.shape[1]))
        return real_forward(model, tokens, *a, **kw)

    monkeypatch.setattr(model_module, "_serve_forward", counted)
    prefill_exact(model)  # on this machine's kernels either way; the shapes it ran are what is checked here
    ctx = model.cfg.context_len
    assert sorted(passes) == sorted((n, C) for n in (1, 2) for _, C in prefill_shapes(ctx))
    real = model_module.attend_written_out
    shape = prefill_shapes(ctx)[-1][1]

    def rounds_by_threads(q, k, v, mask):
        out = real(q, k, v, mask)
        return out * (1 + 1e-6) if q.shape[2] == shape and torch.get_num_threads() == 2 else out

    monkeypatch.setattr(model_module, "attend_written_out", rounds_by_threads)
    assert prefill_exact(model) is False
    assert check_exactness(model).threads is False


def test_bf16_weights_keep_a_stream_the_same_alone_and_among_others(long_context):
    """Where the CPU has native bf16, bf16 weights decode with other numbers than fp32's but a
    stream is still the same alone and among others; elsewhere they fall back to fp32 in one line."""
    from trainlab.chat.loading import with_weights
    from trainlab.engine.precision import cpu_has_native_bf16

    cm = load_chat_model(resolve_checkpoint(long_context, "chat", "srv"), torch.device("cpu"))
    said: list[str] = []
    model = with_weights(cm.model, "bf16", torch.device("cpu"), said.append)
    if not cpu_has_native_bf16():
        assert model.tok.weight.dtype == torch.float32 and len(said) == 1 and "decoding in fp32" in said[0]
        return
    assert model.tok.weight.dtype == torch.bfloat16 and not said
    bodies = [{"prompt": prompt_of(kind, random.Random(i)), "max_tokens": 40, "seed": i, "stream": True,
               "stop_at": "none"} for i, kind in enumerate(["short", "context", "longer", "short"])]
    for weights in ("fp32", "bf16"):
        srv = Live(long_context, weights=weights)
        try:
            alone = [asyncio.run(ask(srv.url, b)) for b in bodies]

            async def together():
                return await asyncio.gather(*(ask(srv.url, b) for b in bodies))

            assert asyncio.run(together()) == alone and all(len(a[1]) == 40 for a in alone)
            assert srv.server.cm.model.tok.weight.dtype == (torch.bfloat16 if weights == "bf16" else torch.float32)
            assert srv.server.engine.cache.k.dtype == srv.server.cm.model.tok.weight.dtype
        finally:
            srv.close()


@pytest.mark.parametrize("opts", [dict(positions="rotary", norm="rmsnorm", mlp="swiglu", qk_norm=True),
                                  dict(positions="rotary", mlp="relu2", logit_softcap=10.0)])
def test_the_modern_block_decodes_in_the_server_as_its_plain_forward(opts):
    """Prefill and decoding passes rotate each row by its own positions: what a row gets equals
    the model's own forward over the whole text, and the same bits alone or beside others."""
    from trainlab.chat.config import GPTConfig
    from trainlab.chat.model import GPT

    torch.manual_seed(0)
    model = GPT(GPTConfig(d_model=32, nhead=2, num_layers=2, context_len=64, dropout=0.0, vocab_size=20,
                          **opts)).eval()
    seq = torch.randint(0, 20, (50,)).tolist()
    with torch.no_grad():
        plain = model(torch.tensor([seq]))[0][0]  # (50, V)
    results = []
    for others in (False, True):
        cache = SlotCache(model.cfg, 8, trimmed=True)
        if others:
            for r in (0, 2):
                prefill_row(model, torch.randint(0, 20, (7 + r,)).tolist(), cache, r)
        got = [prefill_row(model, seq[:30], cache, 1)]  # predicts position 30
        decoding = [others and r in (0, 2) or r == 1 for r in range(8)]
        for t in range(30, 49):  # seq[t] goes in at position t and predicts position t + 1
            out = decode_rows(model, torch.tensor([seq[t]] * 8), cache, decoding)
            for r in range(8):
                if decoding[r]:
                    cache.lengths[r] += 1
            got.append(out[1])
        results.append(torch.stack(got))
    torch.testing.assert_close(results[0], plain[29:49], rtol=1e-4, atol=1e-5)
    assert torch.equal(results[0], results[1])


def sse_texts(url: str, body: dict) -> list[tuple[float, str]]:
    """(seconds since the request, text) of every text event of a streamed completion."""
    out = []
    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=60) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                text = json.loads(line[6:])["choices"][0]["text"]
                if text:
                    out.append((time.perf_counter() - t0, text))
    return out


def test_a_stream_interval_sends_the_same_text_in_fewer_events(long_context):
    """The first characters go out at once, then what came during an interval goes out as
    one event; the text is the same as a plain request's, and a 0 interval sends characters
    as they come (here the decoding outpaces the handler only now and then)."""
    body = {"prompt": "ANNA:\n", "max_tokens": 60, "seed": 3, "stop_at": "none"}
    slow = Live(long_context, stream_interval=0.5)
    try:
        events = sse_texts(slow.url, body)
        plain = raw(slow.url, "/v1/completions", body).json()["choices"][0]["text"]
    finally:
        slow.close()
    assert "".join(t for _, t in events) == plain and len(plain) == 60
    assert len(events) == 2, events  # 60 characters of a tiny model take far less than the interval
    assert events[1][0] - events[0][0] >= 0.45
    fast = Live(long_context, stream_interval=0.0)
    try:
        events = sse_texts(fast.url, body)
    finally:
        fast.close()
    assert "".join(t for _, t in events) == plain
    assert len(events) > 5, events


@pytest.mark.parametrize("ms", ["-1", "nan", "1001", "soon"])
def test_a_bad_stream_interval_is_one_line(long_context, capsys, ms):
    from trainlab.cli import main

    assert main(["chat", "serve", "--checkpoint", "srv", "--runs-dir", str(long_context),
                 "--stream-interval-ms", ms]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--stream-interval-ms" in err[0], err
