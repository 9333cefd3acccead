"""The engine's errors, in a module of their own that imports nothing: the command line
catches them without loading PyTorch, so ``--help`` and usage errors answer at once."""


class CheckpointError(Exception):
    """A checkpoint that is missing, damaged, or not what was asked for."""


class TrainingError(RuntimeError):
    """Training cannot go on (out of memory one example at a time, a diverged loss)."""
