"""ChatGoT's settings, as plain dataclasses: what the flags, config files and saved
``*_config.json`` files hold. Nothing here imports PyTorch, so the command line builds its
flags (and ``--help``) without loading it; ``data.py``, ``model.py``, ``task.py`` and
``sampling.py`` import them from here."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from trainlab.config import ConfigError, check_heads, check_seed, finite, in_range, non_negative, one_of, positive

TASK_NAME = "chat"
MEMBER = "gpt"
# settings a resumed run may change: none of them touches the training trajectory
# (the corpus may move; its content is checked against the checkpoint's corpus.json)
RESUMABLE_TASK_CHANGES = frozenset({"text", "eval_batches", "sample_tokens", "sample_temperature", "prompt_chars",
                                    "grad_checkpointing"})
STOP_AT = ("none", "line", "sentence", "paragraph")
POSITIONS = ("learned", "rotary")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "relu2", "swiglu")
WINDOWS = ("random", "shuffled")


# `--decode auto` compiles the decoding pass for a `generate` of at least this many characters:
# a start with the compiled code cached took about 5 s more than a plain one, and each
# character then saves about 6 ms of a plain pass's 9 (14M model, 2-core CPU), so shorter
# completions end sooner plain (chat/decoding.py)
AUTO_COMPILE_CHARS = 2000


@dataclass
class ChatDataConfig:
    text: str = field(default="", metadata={"help": "UTF-8 text file to train on (required)"})
    val_fraction: float = field(default=0.1, metadata={"help": "last fraction of the text held out for validation"})

    def __post_init__(self) -> None:
        if not self.text:
            raise ConfigError("text", "required: the UTF-8 text file to train on")
        # stored absolute, so a run resumed from another folder finds its corpus (the content
        # hash, not the path, is what says whether it is still the same text)
        self.text = os.path.abspath(os.path.expanduser(self.text))
        in_range("val_fraction", self.val_fraction, 0, 1, low_open=True, high_open=True)


@dataclass
class GPTConfig:
    """Dimensions of the model; saved beside its weights as model_config.json."""

    d_model: int = field(default=384, metadata={"help": "width of every layer"})
    nhead: int = field(default=6, metadata={"help": "attention heads (must divide d_model)"})
    num_layers: int = field(default=8, metadata={"help": "transformer blocks"})
    dim_feedforward: int = field(default=0, metadata={"help": "MLP hidden size; 0 means 4 * d_model"})
    context_len: int = field(default=256, metadata={"help": "characters the model sees at once"})
    dropout: float = field(default=0.1, metadata={"help": "dropout probability"})
    # a field of its own because attention's dropout decides the kernel: with any, a CPU runs the
    # written-out product (the fused kernels take none there), which made a fp32 step of
    # chat-1min-dropout 1.17x as long (results/dropout-mask/)
    attn_dropout: float | None = field(default=None, metadata={"help": "dropout on attention's probabilities "
                                                                        "(default: --dropout); 0 leaves a CPU the "
                                                                        "fused attention kernel in fp32"})
    tie_weights: bool = field(default=True, metadata={"help": "share the token embedding with the output head"})
    bias: bool = field(default=False, metadata={"help": "biases in linear layers and LayerNorms"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute each block's activations in the "
                                                                     "backward pass instead of keeping them: less "
                                                                     "memory for about a third more compute"})
    # the modern block, piece by piece; the defaults are GPT-2's block, so a model config saved
    # before these existed builds the same model
    positions: str = field(default="learned", metadata={"help": "learned (an embedding per position, GPT-2) or "
                                                                "rotary (RoPE on queries and keys; an even head "
                                                                "width)"})
    rope_base: float = field(default=10000.0, metadata={"help": "base of the rotary frequencies"})
    norm: str = field(default="layernorm", metadata={"help": "layernorm or rmsnorm"})
    qk_norm: bool = field(default=False, metadata={"help": "RMSNorm on each head's queries and keys"})
    mlp: str = field(default="gelu", metadata={"help": "gelu (exact), relu2 (ReLU squared) or swiglu (SiLU-gated; "
                                                       "--dim-feedforward is its hidden width)"})
    zero_init: bool = field(default=False, metadata={"help": "start each block's output projections (attention "
                                                             "and MLP) at zero"})
    logit_softcap: float = field(default=0.0, metadata={"help": "logits squashed as c * tanh(logits / c); 0: off"})
    pair_embedding: bool = field(default=False, metadata={"help": "add a learned vector for each (previous, "
                                                                  "current) character pair to the input; in no "
                                                                  "transformers family, so --format hf refuses it"})
    vocab_size: int = field(default=65, metadata={"cli": False})

    def __post_init__(self) -> None:
        for name in ("d_model", "nhead", "num_layers", "context_len", "vocab_size"):
            positive(name, getattr(self, name))
        non_negative("dim_feedforward", self.dim_feedforward)
        check_heads(self.d_model, self.nhead)
        in_range("dropout", self.dropout, 0, 1, high_open=True)
        if self.attn_dropout is not None:
            in_range("attn_dropout", self.attn_dropout, 0, 1, high_open=True)
        one_of("positions", self.positions, POSITIONS)
        one_of("norm", self.norm, NORMS)
        one_of("mlp", self.mlp, MLPS)
        positive("rope_base", self.rope_base)
        non_negative("logit_softcap", self.logit_softcap)
        if self.positions == "rotary" and (self.d_model // self.nhead) % 2:
            raise ConfigError("positions", f"rotary positions need an even head width; d_model {self.d_model} / "
                                           f"nhead {self.nhead} = {self.d_model // self.nhead}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.nhead

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    @property
    def d_ff(self) -> int:
        return self.dim_feedforward or 4 * self.d_model

    @property
    def classic_block(self) -> bool:
        """GPT-2's block: learned positions, LayerNorm, an exact-GELU MLP, no QK-norm."""
        return self.positions == "learned" and self.norm == "layernorm" and self.mlp == "gelu" and not self.qk_norm


@dataclass
class ChatTaskConfig:
    eval_batches: int = field(default=20, metadata={"help": "batches of windows per evaluation, the same ones "
                                                            "every time (val, and as many from train)"})
    sample_tokens: int = field(default=200, metadata={"help": "characters per sample during training"})
    sample_temperature: str = field(default="auto", metadata={"help": "temperature of training samples: a number, "
                                                                      "or auto (cooler as val loss falls)"})
    prompt_chars: int = field(default=48, metadata={"help": "characters of val text that prompt each sample"})
    # "random" is what every run before this setting trained with, so a saved task config
    # without it resumes as it began
    windows: str = field(default="random", metadata={"help": "how training windows are drawn: random (each "
                                                             "anywhere in the text, independently) or shuffled "
                                                             "(each pass cuts the text into windows at a random "
                                                             "offset and reads every one once, in random order)"})

    def __post_init__(self) -> None:
        for name in ("eval_batches", "sample_tokens", "prompt_chars"):
            positive(name, getattr(self, name))
        one_of("windows", self.windows, WINDOWS)
        if self.sample_temperature != "auto":
            try:
                t = float(self.sample_temperature)
            except ValueError:
                t = -1.0
            if not t >= 0:
                raise ConfigError("sample_temperature", f"must be auto or a number >= 0, got {self.sample_temperature!r}")


@dataclass
class SamplingConfig:
    temperature: float = field(default=0.8, metadata={"help": "softmax temperature; 0: greedy"})
    top_k: int = field(default=0, metadata={"help": "sample among the k most likely characters; 0: off"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass in (0, 1]; 1: off"})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL penalty >= 1 on recent characters; 1: off"})
    repetition_window: int = field(default=64, metadata={"help": "recent characters the penalty looks at"})
    max_new_tokens: int = field(default=400, metadata={"help": "most characters to generate"})
    min_new_tokens: int = field(default=1, metadata={"help": "characters before --stop-at may end the text"})
    stop_at: str = field(default="none", metadata={"help": "end at the first none|line|sentence|paragraph boundary"})
    seed: int | None = field(default=None, metadata={"help": "seed of the sampler (default: a fresh one)"})

    def __post_init__(self) -> None:
        non_negative("temperature", self.temperature)
        non_negative("top_k", self.top_k)
        in_range("top_p", self.top_p, 0, 1, low_open=True)
        finite("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty < 1.0:
            raise ConfigError("repetition_penalty", f"must be at least 1 (1: off), got {self.repetition_penalty}")
        non_negative("repetition_window", self.repetition_window)
        positive("max_new_tokens", self.max_new_tokens)
        non_negative("min_new_tokens", self.min_new_tokens)
        one_of("stop_at", self.stop_at, STOP_AT)
        if self.seed is not None:
            check_seed("seed", self.seed)
