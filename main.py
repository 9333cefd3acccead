"""The classic command of the original project, kept working as written:

    python main.py --d-model 64 --num-layers 2 --num-latent 4 --min-digits 1 --max-digits 1 \
        --batch-size 16 --max-steps 200 --save-every 10

Every flag is passed to ``trainlab multiply train``.
"""

import os
import signal
import sys
from pathlib import Path


def _abort_at_start(signum, frame) -> None:
    os.write(2, b"trainlab: aborted\n")  # Ctrl+C while PyTorch loads: one line, not a traceback
    os._exit(130)


def main() -> int:
    try:
        from trainlab.allocator import use_tcmalloc
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
        from trainlab.allocator import use_tcmalloc
    use_tcmalloc()  # may start this command again, with tcmalloc: before PyTorch loads
    previous = signal.signal(signal.SIGINT, _abort_at_start)
    try:
        import torch  # noqa: F401
    except ImportError:
        signal.signal(signal.SIGINT, previous)
        sys.stderr.write("trainlab: error: PyTorch is not installed for this Python; run `make setup` and use "
                         ".venv/bin/python main.py ...\n")
        return 2
    try:
        from trainlab.cli import main as cli_main
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))
        from trainlab.cli import main as cli_main
    signal.signal(signal.SIGINT, previous)
    return cli_main(["multiply", "train", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
