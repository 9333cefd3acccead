"""The multiplication task's settings and token format, as plain dataclasses: what the
flags, config files and saved ``*_config.json`` files hold. Nothing here imports PyTorch,
so the command line builds its flags (and ``--help``) without loading it; the modules that
use these (``data.py``, ``models.py``, ``loss.py``, ``task.py``) import them from here.
``data.py``'s docstring explains the format."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trainlab.config import ConfigError, check_heads, in_range, non_negative, one_of, positive

PAD, BOS, EOS, TIMES = 0, 1, 2, 3
DIGIT0 = 4
TOKENS = ["<pad>", "<bos>", "<eos>", "*"] + [str(d) for d in range(10)]
VOCAB_SIZE = len(TOKENS)
SPLITS = ("train", "val", "test")
ANSWER_ORDERS = ("reversed", "natural")
ANSWER_PLACES = ("none", "msd", "lsd")
MAX_SUPPORTED_DIGITS = 9  # operands must fit the 32-bit halves of the hash key
MODEL_KINDS = ("simple", "latent")
TASK_NAME = "parallel_comparison"
TF_SCHEDULES = ("none", "linear", "exp", "cosine")
# settings a resumed run may change (evaluation never touches the training trajectory)
RESUMABLE_TASK_CHANGES = frozenset({"eval_samples", "eval_batch_size", "grad_checkpointing", "test_n"})


@dataclass(frozen=True)
class MultiplyDataConfig:
    min_digits: int = 1
    max_digits: int = 3
    answer_order: str = "natural"
    answer_pad: bool = field(default=False, metadata={
        "help": "write every product with 2 * max-digits digits, leading zeros included (12*345 -> 004140), "
                "so each answer position always holds the same place value"})
    class_power: float = field(default=1.0, metadata={
        "help": "training draws each operand-length class (a's digits x b's digits) with probability "
                "proportional to its size to this power: 1 draws every problem equally (most then have "
                "max-digit operands), 0 every class equally, in between the shorter ones more often"})
    val_fraction: float = 0.01
    test_fraction: float = 0.02

    def __post_init__(self) -> None:
        if not 1 <= self.min_digits <= MAX_SUPPORTED_DIGITS:
            raise ConfigError("min_digits", f"must be between 1 and {MAX_SUPPORTED_DIGITS}, got {self.min_digits}")
        if not 1 <= self.max_digits <= MAX_SUPPORTED_DIGITS:
            raise ConfigError("max_digits", f"must be between 1 and {MAX_SUPPORTED_DIGITS}, got {self.max_digits}")
        if self.min_digits > self.max_digits:
            raise ConfigError(
                "min_digits", f"must not exceed --max-digits (got {self.min_digits} > {self.max_digits})"
            )
        if self.answer_order not in ANSWER_ORDERS:
            raise ConfigError("answer_order", f"must be one of {'|'.join(ANSWER_ORDERS)}, got {self.answer_order!r}")
        for name in ("val_fraction", "test_fraction"):
            in_range(name, getattr(self, name), 0, 1, high_open=True)
        in_range("class_power", self.class_power, 0, 1)
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError("val_fraction", "val_fraction + test_fraction must be below 1")


@dataclass
class Seq2SeqConfig:
    """Dimensions of one member; saved beside its weights as model_config.json."""

    d_model: int = field(default=128, metadata={"help": "width of every layer"})
    nhead: int = field(default=4, metadata={"help": "attention heads (must divide d_model)"})
    num_layers: int = field(default=2, metadata={"help": "encoder layers, and as many decoder layers unless "
                                                         "--decoder-layers says otherwise"})
    decoder_layers: int = field(default=0, metadata={"help": "decoder layers; 0: as many as --num-layers"})
    dim_feedforward: int = field(default=0, metadata={"help": "MLP hidden size; 0 means 4 * d_model"})
    ff_simple: int = field(default=0, metadata={"help": "MLP hidden size of the simple member only; 0: as "
                                                        "--dim-feedforward (compare --match-params sets it)"})
    ff_latent: int = field(default=0, metadata={"help": "MLP hidden size of the latent member only; 0: as "
                                                        "--dim-feedforward"})
    dropout: float = field(default=0.0, metadata={"help": "dropout probability"})
    num_latent: int = field(default=8, metadata={"help": "latent vectors of the latent model"})
    latent_layers: int = field(default=1, metadata={"help": "latent cross-attention blocks"})
    bottleneck_factor: float = field(
        default=1.0, metadata={"help": "1: decoder sees latents only; below 1 it also sees (1-f) * encoder memory"}
    )
    abacus: bool = field(default=False, metadata={
        "help": "place-value embeddings (McLeish et al. 2024's Abacus): every operand digit and every answer "
                "position also gets the embedding of its place value, one table shared by a, b and the answer; "
                "needs --answer-pad or --answer-order reversed, where each answer position has one place"})
    carry_loss: float = field(default=0.0, metadata={
        "help": "weight of a training-only auxiliary loss: a linear head on the decoder's last states names "
                "each answer column's running sum (its partial products plus the carry in; Bai et al. 2025); "
                "0 is off. Inference and the answer format are unchanged"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute each block's activations in the "
                                                                     "backward pass instead of keeping them: less "
                                                                     "memory for about a third more compute"})
    kind: str = field(default="simple", metadata={"cli": False})
    vocab_size: int = field(default=VOCAB_SIZE, metadata={"cli": False})
    src_len: int = field(default=7, metadata={"cli": False})
    tgt_len: int = field(default=7, metadata={"cli": False})
    # what --abacus embeds at answer position k (set from the data settings, never a flag):
    # none, msd (position k holds place 2W-1-k: natural order, padded) or lsd (place k: reversed)
    answer_places: str = field(default="none", metadata={"cli": False})

    def __post_init__(self) -> None:
        for name in ("d_model", "nhead", "num_layers", "num_latent", "latent_layers", "vocab_size", "src_len", "tgt_len"):
            positive(name, getattr(self, name))
        for name in ("dim_feedforward", "ff_simple", "ff_latent"):
            non_negative(name, getattr(self, name))
        non_negative("decoder_layers", self.decoder_layers)
        check_heads(self.d_model, self.nhead)
        in_range("dropout", self.dropout, 0, 1, high_open=True)
        in_range("bottleneck_factor", self.bottleneck_factor, 0, 1)
        one_of("kind", self.kind, MODEL_KINDS)
        one_of("answer_places", self.answer_places, ANSWER_PLACES)
        in_range("carry_loss", self.carry_loss, 0, 100)

    @property
    def operand_width(self) -> int:
        """W: the digits of each operand in the source (``W * W``'s product has at most 2W)."""
        return (self.src_len - 1) // 2

    @property
    def running_sum_classes(self) -> int:
        """Values a column's running sum can take: at most 81 W from the partial products plus
        a carry of at most 9 W."""
        return 90 * self.operand_width + 1

    @property
    def d_ff(self) -> int:
        return self.dim_feedforward or 4 * self.d_model

    @property
    def n_dec(self) -> int:
        return self.decoder_layers or self.num_layers


@dataclass
class LossConfig:
    label_smoothing: float = field(default=0.0, metadata={"help": "label smoothing of the token cross-entropy"})
    seq_weight: float = field(
        default=1.0, metadata={"help": "extra weight of a sequence per unit of its token error: 1 + w * (1 - acc)"}
    )

    def __post_init__(self) -> None:
        in_range("label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        non_negative("seq_weight", self.seq_weight)


@dataclass
class TeacherForcingConfig:
    """Probability that a batch is teacher-forced; otherwise the decoder reads its own guesses.

    ``p(step)`` is 1 before ``tf_start_step``; after it, it falls from 1 to ``tf_floor``
    over ``tf_decay_steps`` steps: linearly, as exp(-5t) (about 1% of the way left at
    the end), or along a half cosine. ``none`` keeps p = 1 (plain teacher forcing).
    """

    tf_schedule: str = field(default="none", metadata={"help": "teacher-forcing decay: none|linear|exp|cosine"})
    tf_start_step: int = field(default=0, metadata={"help": "step at which teacher forcing starts to decay"})
    tf_floor: float = field(default=0.0, metadata={"help": "lowest teacher-forcing probability"})
    tf_decay_steps: int = field(default=5000, metadata={"help": "steps from p = 1 down to the floor"})

    def __post_init__(self) -> None:
        one_of("tf_schedule", self.tf_schedule, TF_SCHEDULES)
        non_negative("tf_start_step", self.tf_start_step)
        positive("tf_decay_steps", self.tf_decay_steps)
        in_range("tf_floor", self.tf_floor, 0, 1)

    def prob(self, step: int) -> float:
        if self.tf_schedule == "none" or step < self.tf_start_step:
            return 1.0
        t = min(1.0, (step - self.tf_start_step) / self.tf_decay_steps)
        if self.tf_schedule == "linear":
            frac = 1.0 - t
        elif self.tf_schedule == "exp":
            frac = math.exp(-5.0 * t)
        else:
            frac = 0.5 * (1.0 + math.cos(math.pi * t))
        return self.tf_floor + (1.0 - self.tf_floor) * frac


@dataclass
class MultiplyTaskConfig:
    members: str = field(default="simple,latent", metadata={"help": "models to train side by side: simple,latent"})
    eval_samples: int = field(default=1000, metadata={"help": "held-out val problems per evaluation"})
    eval_batch_size: int = field(default=1024, metadata={"help": "problems decoded at once when evaluating"})
    test_n: int = field(default=10000, metadata={"help": "held-out test problems the report scores at the end "
                                                        "(all of them when the range has fewer)"})

    def __post_init__(self) -> None:
        names = self.member_list()
        if not names or any(n not in MODEL_KINDS for n in names) or len(set(names)) != len(names):
            raise ConfigError("members", f"must be a comma-separated subset of {','.join(MODEL_KINDS)}, got {self.members!r}")
        for name in ("eval_samples", "eval_batch_size", "test_n"):
            positive(name, getattr(self, name))

    def member_list(self) -> list[str]:
        return [n.strip() for n in self.members.split(",") if n.strip()]
