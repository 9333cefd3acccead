"""Using a trained ChatGoT (loaded by ``chat/loading.py``): complete a prompt, chat.

The chat follows the dialogue style of the corpus it was trained on (found at training
time and saved in ``corpus.json``):

    inline:  ``NAME: line`` per turn (TV transcripts); a reply ends at the newline
    block:   ``NAME:`` on a line, the speech below, a blank line after (plays,
             tinyshakespeare); a reply ends at the blank line

The user's lines and the model's replies accumulate as the context, of which the model
sees the last ``context_len`` characters. Characters the vocabulary lacks are dropped
with a one-line warning.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Callable, Iterator, TextIO

import torch

from trainlab.chat.config import SamplingConfig
from trainlab.chat.data import CharVocab
from trainlab.chat.loading import ChatModel
from trainlab.chat.sampling import generate
from trainlab.config import ConfigError
from trainlab.engine.stopping import Aborted
from trainlab.engine.threads import ThreadTuner

STYLES = ("inline", "block")


def encode_warn(vocab: CharVocab, text: str, warn: Callable[[str], None]) -> list[int]:
    ids, lacking = vocab.encode_known(text)
    if lacking:
        warn(f"warning: dropped {len(lacking)} character{'s' if len(lacking) > 1 else ''} the model never saw: "
             f"{lacking!r}")
    return ids.tolist()


def complete(cm: ChatModel, ids: list[int], cfg: SamplingConfig, generator: torch.Generator,
             tuner: ThreadTuner | None = None, decoder=None) -> Iterator[str]:
    """Stream a completion of ``ids``; an empty prompt starts from a new line. ``decoder``: a
    ``chat.decoding.Decoder`` (default: the plain pass)."""
    start = cm.vocab.encode_known("\n")[0]
    return generate(cm.model, ids, cfg, lambda i: cm.vocab.chars[i], generator,
                    fallback_start=int(start[0]) if len(start) else 0, tuner=tuner, decoder=decoder)


@dataclass
class Dialogue:
    """How turns are written, in the corpus's own style."""

    style: str
    user: str
    bot: str

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ConfigError("style", f"must be one of {'|'.join(STYLES)}, got {self.style!r}")
        for name, value in (("user_name", self.user), ("bot_name", self.bot)):
            if not value.strip() or "\n" in value or ":" in value:
                raise ConfigError(name, f"must be a non-empty name without ':' or newlines, got {value!r}")

    def cue(self, speaker: str) -> str:
        """What opens a turn; the speech follows, then ``end``."""
        return f"{speaker}: " if self.style == "inline" else f"{speaker}:\n"

    @property
    def end(self) -> str:
        return "\n" if self.style == "inline" else "\n\n"

    @property
    def stop_at(self) -> str:
        return "line" if self.style == "inline" else "paragraph"


def default_dialogue(saved: dict, style: str | None, user: str | None, bot: str | None) -> Dialogue:
    """Flags win; else the corpus's style and its two most frequent speakers (bot first)."""
    speakers = [s for s in saved.get("speakers", []) if isinstance(s, str)]
    style = style or (saved.get("style") if saved.get("style") in STYLES else "inline")
    bot = bot or (speakers[0] if speakers else "Bot")
    user = user or next((s for s in speakers if s != bot), "You")
    return Dialogue(style, user, bot)


def repl(cm: ChatModel, dialogue: Dialogue, cfg: SamplingConfig, generator: torch.Generator,
         inp: TextIO | None = None, out: TextIO | None = None, warn: Callable[[str], None] | None = None,
         decoder=None) -> int:
    """Chat until end of input, ``/quit`` or Ctrl+C at the prompt; ``/reset`` forgets the
    conversation. Ctrl+C during an answer stops that answer (it is left out of the
    conversation) and returns to the prompt. ``decoder``: a ``chat.decoding.Decoder``
    (default: the plain pass); a compiled one is specialised to the thread count, so the
    thread count is then not tuned."""
    compiled = decoder is not None and decoder.compiled is not None
    tuner = ThreadTuner(enabled=next(cm.model.parameters()).device.type == "cpu" and not compiled)
    inp, out = inp or sys.stdin, out or sys.stdout
    warn = warn or (lambda line: print(line, file=sys.stderr))
    if cfg.stop_at == "none":
        cfg = replace(cfg, stop_at=dialogue.stop_at)
    ctx = cm.model.cfg.context_len
    out.write(f"chatting as {dialogue.user} with {dialogue.bot} ({dialogue.style} turns); "
              f"/reset forgets, /quit or end of input leaves\n")
    user_cue, bot_cue, end = (encode_warn(cm.vocab, t, warn) for t in
                              (dialogue.cue(dialogue.user), dialogue.cue(dialogue.bot), dialogue.end))
    history: list[int] = []
    while True:
        out.write(f"{dialogue.user}: ")
        out.flush()
        try:
            line = inp.readline()
        except KeyboardInterrupt as e:
            if isinstance(e, Aborted):  # SIGTERM: leave as the command does
                raise
            out.write("\n")
            return 0
        if not line or line.strip() == "/quit":
            out.write("\n" if not line else "")
            return 0
        line = line.rstrip("\r\n")
        if line.strip() == "/reset":
            history = []
            out.write("(conversation forgotten)\n")
            continue
        if not line.strip():
            continue
        history += user_cue + encode_warn(cm.vocab, line, warn) + end
        prompt = (history + bot_cue)[-ctx:]
        out.write(f"{dialogue.bot}: ")
        reply = ""
        try:
            for piece in generate(cm.model, prompt, cfg, lambda i: cm.vocab.chars[i], generator, tuner=tuner,
                                  decoder=decoder):
                reply += piece
                out.write(piece)
                out.flush()
        except KeyboardInterrupt as e:
            if isinstance(e, Aborted):
                raise
            out.write(" [stopped]\n")
            history = history[-ctx:]  # the cut answer is not part of the conversation
            continue
        out.write("\n")
        history = (history + bot_cue + cm.vocab.encode(reply.strip()).tolist() + end)[-ctx:]
