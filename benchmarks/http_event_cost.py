"""What one streamed event costs between `chat serve` and its client, with no model at all.

`serve_latency.py` measures a stream through HTTP against the in-process pass; the gap
between them is the HTTP side: the server's JSON and event loop, uvicorn, and the official
client parsing each event, all on the same cores as decoding. This measures that side alone:

- in process, per event: the server's part (the chunk as ``chat/serve/app.py`` writes it:
  a dict, ``json.dumps``, the SSE frame) and the client's (``json.loads`` and the openai
  package's construction of a ``Completion``, as its stream builds each event);
- end to end: a Starlette app under uvicorn (in a subprocess, as `chat serve` runs) streams
  N completion chunks of one character as fast as it can, and the official ``AsyncOpenAI``
  client reads them: events/s is the most characters/s one stream could reach if decoding
  took no time and each event carried one character.

    python benchmarks/http_event_cost.py --events 3000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from common import print_machine

APP = textwrap.dedent('''
    import json, sys
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    N = int(sys.argv[2])

    def chunk(text, finish=None):
        data = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": finish, "text": text, "logprobs": None}]}
        return f"data: {json.dumps(data)}\\n\\n"

    async def completions(request):
        await request.body()

        async def events():
            for _ in range(N):
                yield chunk("a")
            yield chunk("", "length")
            yield "data: [DONE]\\n\\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    app = Starlette(routes=[Route("/v1/completions", completions, methods=["POST"])])

    if __name__ == "__main__":
        import uvicorn
        uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
''')


def in_process(n: int = 20000) -> tuple[float, float]:
    """(server seconds, client seconds) per event, in this process."""
    from openai.types import Completion

    try:  # what the openai package's stream does with each event (lenient construction, no validation)
        from openai._models import construct_type

        def parse(data: dict):
            return construct_type(type_=Completion, value=data)
    except ImportError:
        def parse(data: dict):
            return Completion.model_construct(**data)

    def server() -> str:
        data = {"id": "cmpl-0", "object": "text_completion", "created": 0, "model": "m",
                "choices": [{"index": 0, "finish_reason": None, "text": "a", "logprobs": None}]}
        return f"data: {json.dumps(data)}\n\n"

    t = time.perf_counter()
    for _ in range(n):
        line = server()
    s = (time.perf_counter() - t) / n
    payload = line[6:].strip()
    t = time.perf_counter()
    for _ in range(n):
        parse(json.loads(payload))
    return s, (time.perf_counter() - t) / n


async def consume(url: str, events: int) -> tuple[float, int]:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    stream = await client.completions.create(model="m", prompt="x", max_tokens=events, stream=True)
    t0, n = time.perf_counter(), 0
    async for chunk in stream:
        n += len(chunk.choices[0].text)
    seconds = time.perf_counter() - t0
    await client.close()
    return seconds, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=3000)
    ap.add_argument("--port", type=int, default=8766)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print_machine()
    s, c = in_process()
    print(f"in process, one event: the server's chunk {1e6 * s:.1f} us, the client's parse {1e6 * c:.1f} us")
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "events_app.py"
        app.write_text(APP, encoding="utf-8")
        server = subprocess.Popen([sys.executable, str(app), str(args.port), str(args.events)])
        try:
            import httpx

            url = f"http://127.0.0.1:{args.port}"
            for _ in range(200):
                try:
                    httpx.post(url + "/v1/completions", json={}, timeout=1)
                    break
                except httpx.HTTPError:
                    time.sleep(0.1)
            rates = []
            for _ in range(args.rounds):
                seconds, n = asyncio.run(consume(url, args.events))
                rates.append(n / seconds)
        finally:
            server.terminate()
            server.wait()
    best = max(rates)
    print(f"end to end, uvicorn + Starlette -> AsyncOpenAI, {args.events} one-character events: "
          f"{', '.join(f'{r:,.0f}' for r in rates)} events/s (best {best:,.0f}: {1000 / best:.2f} ms an event "
          f"on these cores)")


if __name__ == "__main__":
    main()
