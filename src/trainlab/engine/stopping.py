"""Stopping a run cleanly: the first Ctrl+C asks the loop to stop at the next step boundary
(it then saves and reports); a second one aborts."""

from __future__ import annotations

import signal


class StopOnInterrupt:
    """First Ctrl+C asks the loop to stop at the next step boundary; a second one aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> "StopOnInterrupt":
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave SIGINT alone
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nstopping after this step (Ctrl+C again to abort without saving)", flush=True)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
