"""`trainlab chat serve`: the OpenAI-compatible API through the official client and raw HTTP,
concurrent and disconnecting streams, the page in a real browser, and the repl's Ctrl+C."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from helpers import KERNELS_ROOT, trained_play

from trainlab.chat.loading import checkpoint_info, load_chat_model
from trainlab.chat.repl import default_dialogue
from trainlab.chat.serve.app import Server
from trainlab.chat.serve.engine import Limits
from trainlab.chat.slots import SlotCache, decode_rows, prefill_row
from trainlab.engine.tracking import resolve_checkpoint

KEY = "s3cret"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny chat model trained on a made-up play, once for the module."""
    return trained_play(tmp_path_factory, "serve", "--max-steps", "30", "--eval-every", "30")


class Live:
    """A server on a free loopback port, in a thread of this process."""

    def __init__(self, runs: Path, server_kw: dict | None = None, run: str = "srv", source: Path | None = None,
                 ready: bool = True, weights: str = "fp32", **kw) -> None:
        """``source``: a folder `chat export` wrote, served instead of the run; ``ready``: wait
        for the engine's warm-up too."""
        import uvicorn

        if source is not None:
            from trainlab.chat.export import load_exported

            cm, info = load_exported(source, torch.device("cpu"))
        else:
            ckpt = resolve_checkpoint(runs, "chat", run)
            cm, info = load_chat_model(ckpt, torch.device("cpu")), checkpoint_info(ckpt, run)
        from dataclasses import replace

        from trainlab.chat.loading import with_weights

        cm = replace(cm, model=with_weights(cm.model, weights, torch.device("cpu")))
        self.server = Server(cm, default_dialogue(cm.dialogue, None, None, None), info,
                             kw.pop("api_key", None), Limits(**kw), tune_threads=False, **(server_kw or {}))
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.uv = uvicorn.Server(uvicorn.Config(self.server.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        if ready:
            assert self.server.engine.ready.wait(60), "the engine did not warm up"

    def close(self) -> None:
        self.uv.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


@pytest.fixture(scope="module")
def live(trained):
    srv = Live(trained)
    yield srv
    srv.close()


def client(url: str, key: str = "unused"):
    from openai import OpenAI

    return OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def test_decode_rows_match_the_plain_forward_and_ignore_the_other_rows(trained):
    cm = load_chat_model(resolve_checkpoint(trained, "chat", "srv"), torch.device("cpu"))
    model, V = cm.model, cm.vocab.size
    for text in ("ANNA:\nThe boat", "BORIS:\nBring t"):  # prompts of 13 and 14: some row counts round
        seq = cm.vocab.encode(text).tolist()              # differently with 1 and 2 threads in plain matmuls
        with torch.no_grad():
            plain = model(torch.tensor([seq]))[0][0]
        runs = []
        for row, threads in ((0, 1), (3, 2)):
            torch.set_num_threads(threads)
            cache = SlotCache(model.cfg, 4)
            for other in range(4):  # the other rows hold other text
                prefill_row(model, torch.randint(0, V, (5 + other,)).tolist(), cache, other)
            first = prefill_row(model, seq[:-1], cache, row)
            tokens = torch.randint(0, V, (cache.slots,))
            tokens[row] = seq[-1]
            runs.append((first, decode_rows(model, tokens, cache)[row]))
        torch.set_num_threads(2)
        for a, b in zip(*runs):  # bit for bit, whatever the row, the neighbours and the threads
            assert torch.equal(a, b)
        torch.testing.assert_close(runs[0][0], plain[-2], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(runs[0][1], plain[-1], rtol=1e-4, atol=1e-5)


def test_the_official_client_completes_and_chats_streaming_or_not(live):
    c = client(live.url)
    assert [m.id for m in c.models.list().data] == ["srv"]
    r = c.completions.create(model="srv", prompt="ANNA:\n", max_tokens=40, temperature=0.8, seed=7)
    text = r.choices[0].text
    assert 0 < len(text) <= 40 and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens == 6 and r.usage.completion_tokens >= len(text)
    again = c.completions.create(model="srv", prompt="ANNA:\n", max_tokens=40, temperature=0.8, seed=7)
    assert again.choices[0].text == text  # the seed gives the same text
    pieces = [ch.choices[0].text for ch in c.completions.create(model="srv", prompt="ANNA:\n", max_tokens=40,
                                                                  temperature=0.8, seed=7, stream=True)]
    assert "".join(pieces) == text and len([p for p in pieces if p]) > 1  # streamed in pieces
    chat = c.chat.completions.create(model="srv", messages=[{"role": "system", "content": "A quay at dawn."},
                                                           {"role": "user", "content": "Is the door shut?"}],
                                     max_tokens=60, seed=3)
    msg = chat.choices[0].message
    assert msg.role == "assistant" and "\n\n" not in msg.content  # one turn of block dialogue
    streamed = "".join((ch.choices[0].delta.content or "") for ch in c.chat.completions.create(
        model="srv", messages=[{"role": "system", "content": "A quay at dawn."},
                               {"role": "user", "content": "Is the door shut?"}], max_tokens=60, seed=3, stream=True))
    assert streamed == msg.content
    stopped = c.completions.create(model="srv", prompt="ANNA:\n", max_tokens=200, seed=7, stop=["o"])
    assert "o" not in stopped.choices[0].text and stopped.choices[0].finish_reason == "stop"
    dropped = c.completions.create(model="srv", prompt="ANNA ✓ é\n", max_tokens=5, seed=1)
    assert dropped.usage.model_extra["dropped_characters"] == 2


def raw_path(url: str, path: str) -> tuple[int, bytes]:
    """A GET of ``path`` exactly as written (no client-side normalisation of ``..``)."""
    import http.client
    from urllib.parse import urlsplit

    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=30)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def raw(url: str, path: str, body=None, key: str | None = None, content: bytes | None = None):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if content is not None:
        return httpx.post(url + path, content=content, headers={**headers, "Content-Type": "application/json"})
    if body is None:
        return httpx.get(url + path, headers=headers)
    return httpx.post(url + path, json=body, headers=headers, timeout=60)


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "a", "n": 2}, 400, "n"),
    ({"prompt": "a", "max_tokens": 10**6}, 400, "max_tokens"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "stop": [""]}, 400, "stop"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "a" * 20000}, 400, "prompt"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "model"),
])
def test_bad_requests_get_openai_errors(live, body, status, param):
    r = raw(live.url, "/v1/completions", body)
    assert r.status_code == status
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"]


def test_errors_of_paths_bodies_keys_and_queues(trained, live):
    assert raw(live.url, "/v1/nothing").status_code == 404
    # sent as written: httpx would normalise "/../../etc/passwd" to "/etc/passwd" before sending
    for path in ("/../../etc/passwd", "/static/../serve.py", "/static/../../chat/serve.py", "/static/%2e%2e/serve.py",
                 "/static/..%2fserve.py", "//etc/passwd"):
        status, body = raw_path(live.url, path)
        assert status in (400, 404), (path, status)
        assert b"import" not in body and b"root:" not in body, path
    assert raw_path(live.url, "/static/app.js")[0] == 200  # the same route does serve its own files
    assert raw(live.url, "/v1/chat/completions", {"messages": []}).status_code == 400
    assert raw(live.url, "/v1/completions", content=b"{not json").status_code == 400
    big = raw(live.url, "/v1/completions", content=b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert big.status_code == 413 and big.json()["error"]["message"]
    page = raw(live.url, "/")
    assert page.status_code == 200 and "ChatGoT" in page.text and "http" not in page.text.split("<body>")[1]
    guarded = Live(trained, api_key=KEY, slots=1, max_queue=1)
    try:
        assert raw(guarded.url, "/v1/models").status_code == 401
        assert raw(guarded.url, "/v1/models", key="wrong").status_code == 401
        assert raw(guarded.url, "/v1/models", key=KEY).status_code == 200
        assert raw(guarded.url, "/info").json()["auth"] is True
        # one stream in the slot, one waiting: a third request is refused with 429
        holders = [httpx.stream("POST", guarded.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                                json={"prompt": "ANNA:\n", "max_tokens": 4000, "stream": True,
                                      "stop_at": "none"}, timeout=60) for _ in range(2)]
        opened = [h.__enter__() for h in holders]
        deadline = time.monotonic() + 10
        while not (guarded.server.engine.busy == 1 and len(guarded.server.engine.waiting) == 1):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        refused = raw(guarded.url, "/v1/completions", {"prompt": "a"}, key=KEY)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        for h, o in zip(holders, opened):
            h.__exit__(None, None, None)
        # the clients left mid-stream: their rows and places free up at once
        deadline = time.monotonic() + 5
        while guarded.server.engine.busy or guarded.server.engine.waiting:
            assert time.monotonic() < deadline, "a disconnected stream kept its slot"
            time.sleep(0.01)
        assert raw(guarded.url, "/v1/completions", {"prompt": "a", "max_tokens": 3}, key=KEY).status_code == 200
    finally:
        guarded.close()


def eight_streams(url: str, rows_per_pass: list[int]) -> None:
    """The same text alone and among others, and "among others" is real: the streams shared
    decoding passes (a server answering one request at a time would pass the first part);
    ``rows_per_pass`` is filled by the caller's spy on the shared pass."""
    async def stream(seed: int) -> str:
        async with httpx.AsyncClient(timeout=120) as http:
            text = ""
            async with http.stream("POST", url + "/v1/completions",
                                   json={"prompt": "BORIS:\n", "max_tokens": 150, "seed": seed, "stream": True,
                                         "stop_at": "none"}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        text += json.loads(line[6:])["choices"][0]["text"]
            return text

    async def together():
        return await asyncio.gather(*(stream(seed) for seed in range(8)))

    alone = [asyncio.run(stream(seed)) for seed in range(8)]
    assert len(set(alone)) == 8 and all(len(t) == 150 for t in alone)
    assert max(rows_per_pass) == 1  # one at a time: every pass decoded one row
    rows_per_pass.clear()
    assert asyncio.run(together()) == alone
    assert max(rows_per_pass) >= 2, "the streams never shared a decoding pass"


def test_eight_concurrent_streams_each_get_their_text_alone(live, monkeypatch):
    from trainlab.chat.serve import engine as serve_module

    assert live.server.engine.kernels is None  # no kernels folder given: the plain pass, every row computed
    rows_per_pass: list[int] = []
    real = serve_module.decode_rows

    def counted(model, last, cache, decoding):
        rows_per_pass.append(sum(decoding))
        return real(model, last, cache, decoding)

    monkeypatch.setattr(serve_module, "decode_rows", counted)
    eight_streams(live.url, rows_per_pass)


@pytest.fixture(scope="module")
def live_kernels(trained):
    """The server as `chat serve` starts it: decoding through the row kernels, built at warm-up."""
    srv = Live(trained, server_kw={"kernels_root": KERNELS_ROOT})
    yield srv
    srv.close()


def test_eight_streams_through_the_row_kernels_each_get_their_text_alone(live_kernels, monkeypatch):
    """With the row kernels each pass computes only the rows in use (one stream: one row), and
    a stream's text is still the same alone and among others."""
    from trainlab.chat import slots as decoding

    engine = live_kernels.server.engine
    assert engine.kernels is not None, engine.notes
    assert any(n.startswith("decoding: row kernels ready") for n in engine.notes)
    rows_per_pass: list[int] = []
    real = decoding.decode_slots

    def counted(model, kernels, last, cache, rows):
        rows_per_pass.append(len(rows))
        return real(model, kernels, last, cache, rows)

    monkeypatch.setattr(decoding, "decode_slots", counted)
    eight_streams(live_kernels.url, rows_per_pass)


@pytest.fixture
def long_answers(trained):
    """A server whose answers may run to 100,000 characters: a browser under load renders the
    stream late, and at the usual cap of 4,096 the whole answer had arrived before Stop was seen."""
    srv = Live(trained, max_tokens_cap=100_000)
    yield srv
    srv.close()


def test_the_page_streams_and_stops_in_a_real_browser(long_answers, tmp_path):
    live = long_answers
    browser, driver = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
    if not (browser and driver):
        if os.environ.get("CI"):  # .ci/run installs Chromium: in CI a missing browser is a failure, never a skip
            pytest.fail("CI has no Chromium: .ci/run should have installed chromium and chromium-driver")
        pytest.skip("no Chromium here: `apt-get install chromium chromium-driver` enables the browser test")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    web = webdriver.Chrome(service=Service(executable_path=driver), options=options)
    web.set_window_size(900, 600)
    try:
        web.get(live.url + "/")
        wait = WebDriverWait(web, 30, poll_frequency=0.05)
        wait.until(lambda w: "run srv, step 30" in w.find_element(By.ID, "model").text)
        web.find_element(By.ID, "max_tokens").clear()
        # long enough that the answer is still streaming when Stop is clicked: at 4,096 characters
        # a loaded machine's browser showed 800 only once all of them had arrived
        web.find_element(By.ID, "max_tokens").send_keys("100000")
        web.find_element(By.ID, "stop_at").send_keys("none")
        web.find_element(By.ID, "line").send_keys("Is the door shut?\n")
        bot = lambda w: w.find_elements(By.CSS_SELECTOR, ".turn.bot .said")  # noqa: E731
        # the answer streams in, longer than the conversation box holds: Stop must stay clickable
        wait.until(lambda w: bot(w) and len(bot(w)[-1].text) > 800)
        web.find_element(By.ID, "stop").click()
        wait.until(lambda w: bot(w)[-1].text.endswith("[stopped]"))
        # the conversation scrolls in its own box: Send and Stop stay where they were, in view
        box, composer = (web.find_element(By.ID, i).rect for i in ("conversation", "composer"))
        assert box["y"] + box["height"] <= composer["y"] + 1
        assert composer["y"] + composer["height"] <= web.execute_script("return window.innerHeight")
        # each answer shows its length and pace
        speed = web.find_elements(By.CSS_SELECTOR, ".turn.bot .speed")[-1].text
        m = re.fullmatch(r"(\d+) characters, (\d+)/s", speed.strip())
        assert m and int(m.group(1)) > 800 and int(m.group(2)) > 0, speed
        web.save_screenshot(str(tmp_path / "page.png"))
        assert (tmp_path / "page.png").stat().st_size > 5000
        turns = web.find_elements(By.CSS_SELECTOR, ".turn .who")
        assert [t.text.strip() for t in turns][:1] == [live.server.dialogue.user + ":"]
        shutil.copy(tmp_path / "page.png", "/tmp/page.png") if os.environ.get("TRAINLAB_KEEP_SCREENSHOT") else None
    finally:
        web.quit()


def test_repl_ctrl_c_stops_the_answer_and_at_the_prompt_leaves(trained, monkeypatch):
    from trainlab.chat import repl as repl_module
    from trainlab.chat.config import SamplingConfig
    from trainlab.chat.sampling import make_generator

    cm = load_chat_model(resolve_checkpoint(trained, "chat", "srv"), torch.device("cpu"))

    def interrupted(*args, **kwargs):
        yield "The bo"
        raise KeyboardInterrupt

    monkeypatch.setattr(repl_module, "generate", interrupted)
    out = io.StringIO()
    code = repl_module.repl(cm, default_dialogue(cm.dialogue, None, None, None), SamplingConfig(), make_generator(0),
                            inp=io.StringIO("hello\n/quit\n"), out=out)
    assert code == 0 and "The bo [stopped]" in out.getvalue() and out.getvalue().count(": ") >= 3

    class CtrlC(io.StringIO):
        def readline(self, *a):
            raise KeyboardInterrupt

    assert repl_module.repl(cm, default_dialogue(cm.dialogue, None, None, None), SamplingConfig(),
                            make_generator(0), inp=CtrlC(), out=io.StringIO()) == 0


def test_the_thread_tuner_keeps_the_faster_count_and_gives_the_process_its_own_back():
    from trainlab.engine.threads import ThreadTuner

    before = torch.get_num_threads()
    slow = {1: 0.001, 2: 0.004}  # as beside a training job: one thread is faster

    def step():
        time.sleep(slow[torch.get_num_threads()])
        return torch.get_num_threads()

    torch.set_num_threads(2)
    try:
        tuner = ThreadTuner(candidates=[1, 2], probe=3, every=1000)
        seen = [tuner.run(step) for _ in range(10)]
        assert seen[:6] == [1, 1, 1, 2, 2, 2] and tuner.current == 1 and set(seen[6:]) == {1}
        # a prompt's pass between the steps (compute-bound) runs on the process's own count, the
        # next step on the tuned one again
        assert tuner.whole(torch.get_num_threads) == 2 and tuner.run(step) == 1
        tuner.restore()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
