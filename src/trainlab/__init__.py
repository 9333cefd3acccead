"""trainlab: train small transformers reliably, fast, with results you can trust."""

__version__ = "0.1.0"
