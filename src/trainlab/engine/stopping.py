"""Stopping a run cleanly.

SIGINT (Ctrl+C), SIGTERM and SIGHUP are what people, schedulers and containers use to
stop a job (Kubernetes, SLURM, systemd, ``docker stop`` and torchrun's own shutdown send
SIGTERM and wait a grace period). The first one asks the loop to stop at the next step
boundary: it finishes the step, saves a checkpoint, marks the run interrupted, and the
command exits with 128 + the signal's number (130 for SIGINT, 143 for SIGTERM). A
second one aborts at once without saving (``Aborted``; the previous checkpoint stays).

The handlers are held for the whole of ``train()``, set-up and the final save included,
so a signal at any moment of it is one of these two, never Python's default.
"""

from __future__ import annotations

import signal

SIGNALS = tuple(s for s in (getattr(signal, "SIGINT", None), getattr(signal, "SIGTERM", None),
                            getattr(signal, "SIGHUP", None)) if s is not None)


class Aborted(KeyboardInterrupt):
    """A second stop signal: leave now, without saving. ``signum`` is that signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def exit_status(signum: int | None) -> int:
    """What a command that stopped on ``signum`` exits with (shells' convention 128 + n)."""
    return 128 + int(signum or signal.SIGINT)


class StopSignals:
    """While entered: the first stop signal sets ``requested`` (and ``signum``); a second raises
    ``Aborted``. ``request(reason)`` asks for the same stop from code (a planned fault, a pruned
    trial, another rank's signal)."""

    def __init__(self, say=None) -> None:
        self.requested = False
        self.signum: int | None = None
        self.reason = ""
        self.hurry = False  # SIGTERM or SIGHUP: a grace period is running, leave as soon as it is saved
        self._say = say or (lambda line: print(line, flush=True))
        self._previous: dict[int, object] = {}

    def request(self, reason: str) -> None:
        if not self.requested:
            self.requested, self.reason = True, reason

    def __enter__(self) -> "StopSignals":
        for s in SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave the signals alone
                break
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and self.signum is not None:
            raise Aborted(signum)
        self.requested, self.signum, self.reason = True, signum, name
        self.hurry = signum != signal.SIGINT
        again = "Ctrl+C" if signum == signal.SIGINT else name
        self._say(f"\n{name}: stopping after this step and saving ({again} again to abort without saving)")

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous.clear()


def leave_on_signals() -> None:
    """For commands that only read (generate, repl, serve): SIGTERM and SIGHUP end them as
    Ctrl+C does, through KeyboardInterrupt, so they leave cleanly instead of dying mid-write."""
    def handle(signum, frame):
        raise Aborted(signum)

    for s in SIGNALS[1:]:
        try:
            signal.signal(s, handle)
        except ValueError:  # not the main thread
            return
