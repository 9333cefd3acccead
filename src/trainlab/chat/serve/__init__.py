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

The package, by concern: ``engine.py`` (the thread that owns the model, its jobs and their
stops), ``api.py`` (OpenAI's request bodies, sampling settings and error shape),
``metrics.py`` (``/metrics``) and ``app.py`` (the Starlette app and the uvicorn server that
runs it). Loading the model and describing its checkpoint is ``chat/loading.py``'s.
"""
