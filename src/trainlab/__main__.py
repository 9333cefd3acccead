"""``python -m trainlab`` and the ``trainlab`` command.

Importing PyTorch takes a second or two. A Ctrl+C in that time would interrupt an extension
module half-way through its import and end in a traceback (sometimes an ImportError, not
even a KeyboardInterrupt), so until the CLI is loaded SIGINT simply ends the process with
one line and exit 130: nothing has been written yet."""

import os
import signal
import sys


def _abort_at_start(signum, frame) -> None:
    os.write(2, b"trainlab: aborted\n")
    os._exit(130)


def main() -> int:
    previous = signal.signal(signal.SIGINT, _abort_at_start)
    try:
        from trainlab.cli import main as cli_main
    finally:
        signal.signal(signal.SIGINT, previous)
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
