"""``python -m trainlab`` and the ``trainlab`` command.

Until the CLI is loaded, SIGINT simply ends the process with one line and exit 130: nothing
has been written yet. The CLI itself loads without PyTorch; it imports PyTorch under the
same rule once the command line is parsed, for the commands that need it
(``cli.load_torch``)."""

import os
import signal
import sys

from trainlab.allocator import use_tcmalloc


def _abort_at_start(signum, frame) -> None:
    os.write(2, b"trainlab: aborted\n")
    os._exit(130)


def main() -> int:
    use_tcmalloc()  # may start this command again, with tcmalloc (allocator.py): before PyTorch loads
    previous = signal.signal(signal.SIGINT, _abort_at_start)
    try:
        from trainlab.cli import main as cli_main
    finally:
        signal.signal(signal.SIGINT, previous)
    return cli_main()


if __name__ == "__main__":
    sys.exit(main())
