"""``trainlab chat train|generate|repl|serve``: ChatGoT."""

from __future__ import annotations

import argparse
import sys

from trainlab.chat.config import AUTO_COMPILE_CHARS, SamplingConfig
from trainlab.cli.common import Parser, train_command, train_flags
from trainlab.config import ConfigError, add_flags, build
from trainlab.runs import chat_sections, warn


def add_parser(sub) -> None:
    chat = sub.add_parser("chat", help="ChatGoT: a character-level GPT on any text")
    csub = chat.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = csub.add_parser("train", help="train on a UTF-8 text file (--text FILE)")
    train_flags(train, "chat", chat_sections())
    gen = csub.add_parser("generate", help="print the prompt and a completion")
    gen.add_argument("--prompt", default="", help="text to continue (default: start from a new line)")
    repl = csub.add_parser("repl", help="chat with a trained model in the style of its corpus")
    serve = csub.add_parser("serve", help="a chat page at / and an OpenAI-compatible API at /v1")
    for p in (repl, serve):
        p.add_argument("--user-name", help="your speaker name (default: the corpus's second most frequent)")
        p.add_argument("--bot-name", help="the model's speaker name (default: the corpus's most frequent)")
        p.add_argument("--style", choices=("inline", "block"),
                       help="turns as 'NAME: line' or 'NAME:' then the speech (default: the corpus's)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on every /v1 request "
                                         "(default: the TRAINLAB_API_KEY environment variable, else none)")
    serve.add_argument("--slots", type=int, default=8, help="streams decoded together")
    serve.add_argument("--max-queue", type=int, default=16, help="requests that may wait for a slot; past that, 429")
    serve.add_argument("--max-prompt-chars", type=int, default=16384, help="longest prompt accepted")
    serve.add_argument("--max-tokens-cap", type=int, default=4096, help="largest max_tokens accepted")
    serve.add_argument("--stream-interval-ms", type=float, default=20.0, metavar="MS",
                       help="a stream's text goes out at most once in this many milliseconds, what came "
                            "meanwhile in one event (0: every character at once; default 20)")
    serve.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                       help="on SIGTERM or Ctrl+C, how long running requests may go on before they end with a "
                            "final event and the server exits (default 5)")
    serve.add_argument("--quiet", action="store_true", help="no access log (one line per request on stderr: "
                                                           "client, method, path, status, time; never a body)")
    exp = csub.add_parser("export", help="a trained model as a Hugging Face folder (transformers loads it), or "
                                         "its weights alone in safetensors")
    exp.add_argument("--out", required=True, metavar="DIR", help="the folder to write: new, empty, or (with --force) "
                                                                 "an earlier export")
    exp.add_argument("--format", choices=("hf", "safetensors"), default="hf",
                     help="hf: config, safetensors weights, tokenizer, model card; safetensors: weights, "
                          "model_config.json, vocab.json (default hf)")
    exp.add_argument("--force", action="store_true", help="replace an earlier export at --out (only once the new one "
                                                         "is complete); a folder holding anything else is never "
                                                         "replaced")
    for p in (gen, repl, serve):
        p.add_argument("--checkpoint", required=True, metavar="RUN_OR_PATH",
                       help="run id, run folder, checkpoint folder, or a folder `chat export` wrote")
    exp.add_argument("--checkpoint", required=True, metavar="RUN_OR_PATH", help="run id, run folder or checkpoint "
                                                                               "folder")
    for p in (gen, repl, serve, exp):
        p.add_argument("--best", action="store_true", help="use the run's best checkpoint (lowest val loss)")
        p.add_argument("--runs-dir", default="runs", help="root folder of all runs")
    for p in (gen, repl, serve):
        p.add_argument("--device", default="auto", help="auto|cpu|cuda|mps")
    for p in (gen, repl, serve):
        p.add_argument("--weights", choices=("fp32", "bf16"), default="fp32",
                       help="precision of the weights while decoding: fp32 (the trained numbers) or bf16 (half the "
                            "bytes a character reads: faster where the CPU has native bf16, other text; elsewhere "
                            "fp32 with a warning)")
    for p in (gen, repl):
        p.add_argument("--decode", choices=("auto", "kernels", "compiled", "plain"), default="auto",
                       help="each character's pass: kernels (the server's C++ row kernels, built once per machine "
                            "in 25-50 s and kept under the runs folder; compiled where they cannot be built), "
                            "compiled (torch.compile at start-up, about 3x faster than plain on a CPU; the first "
                            "start compiles for about half a minute, later ones reuse it) or plain; auto takes the "
                            "kernels for repl, and for generate when it asks for at least "
                            f"{AUTO_COMPILE_CHARS:,} characters (default auto)")
        add_flags(p, SamplingConfig, "sampling (in this order: repetition penalty, temperature, top-k, top-p)")


def chat_train(args: argparse.Namespace) -> int:
    return train_command(args, "chat")


def chat_checkpoint(args: argparse.Namespace):
    """The chat checkpoint ``--checkpoint`` names; a multiplication run is told that this
    command is for chat models."""
    from trainlab.config import UsageError
    from trainlab.engine.errors import CheckpointError
    from trainlab.engine.tracking import resolve_checkpoint
    from trainlab.multiply.config import TASK_NAME as MULTIPLY

    try:
        return resolve_checkpoint(args.runs_dir, "chat", args.checkpoint, best=args.best)
    except (UsageError, CheckpointError) as e:
        try:
            resolve_checkpoint(args.runs_dir, MULTIPLY, args.checkpoint, best=args.best)
        except (UsageError, CheckpointError):
            raise e from None
        raise UsageError(f"--checkpoint: {args.checkpoint} is a multiplication run; chat {args.command} is for chat "
                         f"models") from None


def load_model(args: argparse.Namespace):
    """(the chat model, what serve shows of it) from a run, a checkpoint or an exported folder."""
    from dataclasses import replace

    from trainlab.chat.export import is_export, load_exported
    from trainlab.chat.loading import checkpoint_info, load_chat_model, with_weights
    from trainlab.engine.device import resolve_device

    device = resolve_device(args.device)
    if is_export(args.checkpoint):
        if args.best:
            raise ConfigError("best", "takes a run, not an exported folder")
        cm, info = load_exported(args.checkpoint, device)
    else:
        ckpt = chat_checkpoint(args)
        cm, info = load_chat_model(ckpt, device), checkpoint_info(ckpt, run_name(ckpt.path))
    return replace(cm, model=with_weights(cm.model, args.weights, device, warn)), info


def _load_chat(args: argparse.Namespace):
    from trainlab.chat.sampling import make_generator

    sampling = build(SamplingConfig, vars(args))
    cm, _ = load_model(args)
    return cm, sampling, make_generator(sampling.seed)


def chat_export(args: argparse.Namespace) -> int:
    from trainlab.chat.export import export

    ckpt = chat_checkpoint(args)
    out = export(ckpt, args.out, args.format, force=args.force, run=run_name(ckpt.path))
    print(f"exported {run_name(ckpt.path)} (step {ckpt.step}) as {args.format} to {out}")
    if args.format == "hf":
        print(f"load it with transformers: AutoModelForCausalLM.from_pretrained({str(out)!r}); share it with "
              f"`huggingface-cli upload NAME {out}`")
    return 0


def chat_serve(args: argparse.Namespace) -> int:
    import os
    import socket
    from pathlib import Path

    from trainlab.chat.repl import default_dialogue
    from trainlab.chat.serve.app import Server, uvicorn_server
    from trainlab.chat.serve.engine import Limits

    for name in ("slots", "max_queue", "max_prompt_chars", "max_tokens_cap"):
        if getattr(args, name) < 1:
            raise ConfigError(name, f"must be at least 1, got {getattr(args, name)}")
    if not 0 <= args.stream_interval_ms <= 1000:  # NaN fails this too
        raise ConfigError("stream_interval_ms", f"must be 0..1000 milliseconds, got {args.stream_interval_ms}")
    if not 0 <= args.grace <= 3600:  # NaN fails this too
        raise ConfigError("grace", f"must be 0..3600 seconds, got {args.grace}")
    if not 0 < args.port < 65536:
        raise ConfigError("port", f"must be 1..65535, got {args.port}")
    api_key = args.api_key or os.environ.get("TRAINLAB_API_KEY") or None
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:  # bound before the model loads: a taken port is one line, at once
        sock.bind((args.host, args.port))
    except OSError as e:
        sock.close()
        raise ConfigError("port", f"cannot listen on {args.host}:{args.port} ({e.strerror})") from None
    cm, info = load_model(args)
    dialogue = default_dialogue(cm.dialogue, args.style, args.user_name, args.bot_name)
    where = f"http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port}"

    def ready(engine) -> None:  # from the engine's thread, once its warm-up is done
        for note in engine.notes:
            print(f"note: {note}", flush=True)
        trimmed = "; each pass computes the rows in use" if engine.kernels is not None else \
            "; passes trimmed to the rows and positions in use" if engine.cache.trimmed else ""
        print(f"ready: warm-up took {engine.warm_up_seconds:.2f} s ({args.weights} weights{trimmed}); "
              f"/health says ok", flush=True)

    def access(line: str) -> None:
        sys.stderr.write(line + "\n")

    print(f"serving {info['model']} (step {info.get('step')}) at {where}/ ; OpenAI API at {where}/v1 ; "
          f"/health, /metrics" + ("; API key required" if api_key else "") + " (warming up)", flush=True)
    server = Server(cm, dialogue, info, api_key,
                    Limits(args.slots, args.max_queue, args.max_prompt_chars, args.max_tokens_cap,
                           args.stream_interval_ms / 1000),
                    on_ready=ready, access_log=None if args.quiet else access,
                    kernels_root=Path(args.runs_dir) / ".compiled", engine_thread=False)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        warn(f"warning: listening on {args.host}: other machines can reach this server"
             + ("" if api_key else " and no --api-key is set"))
    # The decoding engine runs in this, the main thread (torch's products ran slower from
    # another), and uvicorn in a second one, where it installs no signal handlers: SIGTERM and
    # Ctrl+C are taken here and handed to it (a graceful shutdown; a second Ctrl+C forces it),
    # and SIGTERM is noted, so the process ends with a line and exit 0, not killed by it.
    import signal
    import threading

    uv = uvicorn_server(server, args.grace, log_level="warning")
    noted: list[int] = []

    def on_signal(signum, frame) -> None:
        if signum == signal.SIGTERM:
            noted.append(signum)
        uv.handle_exit(signum, frame)

    def http() -> None:
        try:
            uv.run(sockets=[sock])
        finally:
            server.engine.stop()  # the engine's loop, in the main thread, ends at its next turn

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    web = threading.Thread(target=http, name="trainlab-http", daemon=True)
    try:
        web.start()
        server.engine.run()
        web.join()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        server.engine.stop()
        sock.close()
    if noted:
        print(f"stopped on SIGTERM (running requests had {args.grace:g} s to finish)", flush=True)
    # the interpreter's last garbage collection walks every object the server made (over a
    # second measured after serving): frozen objects are left to the process's end instead
    import gc

    gc.freeze()
    return 0


def run_name(path) -> str:
    """The run a checkpoint folder belongs to (its model id on the API), else the folder's name."""
    from pathlib import Path

    p = Path(path).resolve()
    for parent in p.parents:
        if (parent / "run.json").is_file():
            return parent.name
    return p.name


def chat_generate(args: argparse.Namespace) -> int:
    from trainlab.chat.repl import complete, encode_warn
    from trainlab.engine.stopping import leave_on_signals

    leave_on_signals()  # SIGTERM and SIGHUP leave as Ctrl+C does, with one line
    cm, sampling, generator = _load_chat(args)
    ids = encode_warn(cm.vocab, args.prompt, warn)
    sys.stdout.write(cm.vocab.decode(ids))  # the prompt as the model reads it
    from trainlab.engine.threads import ThreadTuner

    decoder = make_decoder(args, cm, sampling.max_new_tokens)
    tuner = ThreadTuner(enabled=next(cm.model.parameters()).device.type == "cpu" and decoder.compiled is None)
    for piece in complete(cm, ids, sampling, generator, tuner, decoder):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def chat_repl(args: argparse.Namespace) -> int:
    from trainlab.chat.repl import default_dialogue, repl
    from trainlab.engine.stopping import leave_on_signals

    leave_on_signals()  # SIGTERM and SIGHUP leave as Ctrl+C does, with one line
    cm, sampling, generator = _load_chat(args)
    dialogue = default_dialogue(cm.dialogue, args.style, args.user_name, args.bot_name)
    return repl(cm, dialogue, sampling, generator, warn=warn, decoder=make_decoder(args, cm, None))


def make_decoder(args: argparse.Namespace, cm, chars: int | None):
    """The decoding pass ``--decode`` asks for (``chars``: the most characters this command will
    decode; None: a session), compiled at once where it is; one line on stderr says how it went."""
    from pathlib import Path

    from trainlab.chat.decoding import Decoder
    from trainlab.chat.kernels import kernels_dir

    long = args.decode == "auto" and (chars is None or chars >= AUTO_COMPILE_CHARS)
    wanted = args.decode in ("kernels", "compiled") or long
    root = Path(args.runs_dir) / ".compiled"
    decoder = Decoder(cm.model, compiled=wanted, cache_root=root, kernels=args.decode == "kernels" or long)
    if wanted:
        if decoder.wanted_kernels and not kernels_dir(root).exists():
            warn("decoding: building the row kernels (the first time on this machine takes 25-50 s; later starts "
                 "reuse them)")
        elif decoder.wanted and not decoder.wanted_kernels and not any(decoder.cache_dir.glob("*")):
            warn("decoding: compiling the decoding pass (the first time for this model shape on this machine takes "
                 "20-40 s; later starts reuse it)")
        warn(decoder.prepare())
    return decoder


COMMANDS = {("chat", "train"): chat_train, ("chat", "generate"): chat_generate, ("chat", "repl"): chat_repl,
            ("chat", "serve"): chat_serve, ("chat", "export"): chat_export}
