"""``--preset auto --minutes M``: the shipped chat recipe that trains best in M minutes on
this machine, chosen by measuring it.

The studies (results/chat-tune/, results/auto/) found that the best shape depends on how
much text the budget lets a model read: a minute of training favours two layers of 192,
from 4M characters four of 192 (20 minutes in fp32 too), twenty minutes on a bf16 CPU four
of 256 with a window of 256 characters, and the same recipe given more time than it was
made for can end worse (chat-1min's two layers, without dropout, overfit tinyshakespeare at
5 minutes; with dropout they are the better choice where a larger model reads too little).
What a budget
affords differs threefold between a CPU with native bf16 and one without, and a
hundredfold on a GPU, so minutes alone cannot choose: characters can.

The rule, in one place (``CANDIDATES``): each recipe, from the smallest to the largest, is
taken once the characters it would train on in this budget reach its ``from_chars`` (the
fewest at which it was measured to beat the recipe before it). Its pace is measured here, a
few real training steps after warm-up in the precision ``--precision auto`` would pick (the
same timing a budget's fit and ``tune --budget-minutes`` use; once bf16 has won for one recipe,
the larger ones are timed in bf16 alone), and the characters are
``steps that fit x batch x context``. Probing goes up the list and stops at the first recipe
that falls short: a larger one reads fewer characters in the same time. A recipe whose
bound (the last measured pace scaled by the model's FLOPs per character, and allowed to run
twice as efficiently) already falls short is not timed at all, so a one-minute budget does
not spend seconds timing a 20-minute model. A recipe with ``after_passes`` is passed over
(and the probing goes on) until the recipe chosen before it would read the training text
that many times.

The probe's seconds count against the budget (the run's clock started with the process);
the choice, and every pace measured, go into the run's ``run.json`` (``auto``). The run's
``--precision auto`` decides by its recipe's timings (``runs.train`` hands them to the loop)
rather than timing the same two again.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from trainlab.config import ConfigError, preset_names

Echo = Callable[[str], None]

# share of what is left of the budget that a fitted run spends in training steps (the rest:
# set-up, evaluations, the report); measured 82-96% (results/minutes/), the low end taken
TRAIN_SHARE = 0.85
# how much faster per FLOP a larger model may run than the one measured before it (larger
# matmuls use the cores better); a bound, so generous: a recipe is skipped untimed only when
# even this cannot bring it to its threshold
EFFICIENCY_ALLOWANCE = 2.0
PROBE_STEPS, PROBE_WARMUP = 3, 2


@dataclass(frozen=True)
class Candidate:
    preset: str
    from_chars: float  # the fewest characters of training at which it beat the recipe before it
    why: str  # where that number comes from
    # ... and only once the recipe chosen before it would read its training text this many
    # times; until then it is passed over, not the end of the list: chat-1min without dropout
    # is the better model while it has text left, and overfits once it has read it 5-10 times
    after_passes: float = 0.0


CANDIDATES: dict[str, tuple[Candidate, ...]] = {
    "chat": (
        Candidate("chat-quick", 0.0, "the smallest: best of the chat-9s study (about 0.5M characters)"),
        Candidate("chat-1min", 0.6e6, "best at 1 minute in bf16 (1.9M characters) and in fp32 (0.97M; "
                                      "results/auto/); chat-quick best at 10 s (about 0.26M)"),
        Candidate("chat-1min-dropout", 0.6e6, "chat-1min's model with dropout 0.05, context 256 at batch 8 and "
                                              "shuffled windows: at 5 minutes in fp32 on tinyshakespeare (4.6-4.8 "
                                              "passes) 1.4725-1.4785 at batch 16, where context 128 reached "
                                              "1.4844-1.4856; batch 8 level there (1.4721) and ahead at the steps "
                                              "of 20 AVX2 minutes (1.4737-1.4751 against 1.4803-1.4818); "
                                              "its first version (dropout 0.1, context 64) 1.5258 and chat-1min "
                                              "1.5512; behind chat-1min at 2 passes (bf16 steps: 1.5575 against "
                                              "1.5193-1.5220)",
                  after_passes=4.0),
        Candidate("chat-5min", 5.0e6, "4 x 192 (then with dropout 0.1, now chat-5min-dropout; 0.05 is ahead "
                                      "at 6 passes), against chat-1min-dropout at context 128 (2026-12-05), at "
                                      "the steps each gets: behind at 2.5M characters (1.5560 against "
                                      "1.4835), ahead at 5.9M (1.4655 against 1.4868); the threshold "
                                      "interpolated between (it was 3.7M against the first chat-1min-dropout). "
                                      "Context 256 took chat-1min-dropout 0.007-0.012 further at 4-5 passes, "
                                      "short of moving it. "
                                      "Behind chat-1min on the Bible at 5 minutes, where chat-1min read the "
                                      "text 3.2 times (1.2390 against 1.2053)",
                  after_passes=4.0),
        Candidate("chat-5min-dropout", 5.0e6, "chat-5min with dropout 0.1 (not 0.05): at 12 passes of "
                                              "tinyshakespeare (2,800 bf16 steps) 1.4357 against 1.4445, level at 11 "
                                              "(20 fp32 minutes, the same day: 1.4523 against 1.4528), behind at 6 "
                                              "(1,327-1,438 steps: 1.4655-1.4730 against 1.4463-1.4478). 8 as "
                                              "estimated here is about 9 as read (TRAIN_SHARE's low end; runs "
                                              "train 95-96% of their time). results/auto/",
                  after_passes=8.0),
        Candidate("chat-20min", 7.0e6, "4 x 256: behind chat-5min at 3.5M characters (5 minutes, bf16: 1.4950 "
                                       "against 1.4637) and at 4.7-7.2M (20 minutes, fp32: 1.4483-1.4725, where "
                                       "chat-5min-dropout reached 1.4390 on 10.8M); taken where it reads more than "
                                       "measured so far, for chat-20min-ctx256 after it (bf16 at 20 minutes: "
                                       "7.6-14M)"),
        Candidate("chat-20min-ctx256", 6.0e6, "ahead of chat-20min at 20 minutes in bf16 on tinyshakespeare "
                                              "(7.4-8.5M characters: 1.4407, 1.4421 against 1.4501-1.4586) and on the "
                                              "Bible (7.8M, 2 passes: 1.1841 against 1.2010), level "
                                              "in fp32 (5.1M: 1.4743 against 1.4725-1.4780), far behind at 5 "
                                              "minutes in bf16 (1.6M: 1.6137 against 1.5347)"),
        Candidate("chatgot-14m", 40e6, "not measured: an extrapolation from nanoGPT's 6 x 384 (1.4697 on "
                                       "82M characters); past 40M characters a 2.5M-parameter model is "
                                       "many passes over a small corpus"),
    ),
}


def flops_per_char(values: dict[str, Any]) -> float:
    """Training FLOPs (forward and backward, 3x the forward) per character of a chat model
    built from ``values``: the matmul weights twice each, plus attention's two products over
    the context. Embedding lookups cost no FLOPs."""
    from trainlab.chat.config import GPTConfig
    from trainlab.config import build

    m = build(GPTConfig, values)
    ff = m.d_ff * (3 if m.mlp == "swiglu" else 2)
    weights = m.num_layers * (4 * m.d_model ** 2 + ff * m.d_model) + m.d_model * m.vocab_size
    attention = 2 * m.num_layers * m.context_len * m.d_model
    return 3 * 2 * (weights + attention)


@dataclass
class Probe:
    preset: str
    chars: float  # characters it would train on in what is left of the budget
    seconds_per_step: float | None  # None: not timed (its bound fell short)
    precision: str
    from_chars: float
    timings: dict[str, float] | None = None  # seconds a step of every precision timed

    def record(self) -> dict[str, Any]:
        return {"preset": self.preset, "chars": round(self.chars), "from_chars": self.from_chars,
                "seconds_per_step": self.seconds_per_step and round(self.seconds_per_step, 5),
                "precision": self.precision}


def chars_per_step(values: dict[str, Any]) -> int:
    return int(values.get("batch_size") or 0) * int(values.get("context_len") or 0)


def choose(command: str, config_file: str | Path | None, flags: dict[str, Any], started: float,
           echo: Echo = print) -> tuple[str, dict[str, Any]]:
    """(the preset ``--preset auto`` stands for here, what to record in run.json). ``started``:
    the ``time.monotonic()`` the budget counts from."""
    from trainlab import runs
    from trainlab.engine.precision import pick_precision
    from trainlab.engine.step import fitted_seconds_per_step

    if command not in CANDIDATES:
        raise ConfigError("preset", f"auto chooses among chat's recipes; {command}'s presets name what they "
                                    f"train: pick one ({', '.join(preset_names(command))})")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("preset", "auto times this machine in one process; under torchrun name the preset")
    base = runs.settings(command, None, config_file, flags, default_preset=False)
    minutes = base.get("minutes")
    if minutes is None:
        raise ConfigError("preset", "auto picks the recipe for a time budget: give --minutes M")
    if not (math.isfinite(float(minutes)) and float(minutes) > 0):
        raise ConfigError("minutes", f"must be a positive number of minutes, got {minutes}")
    budget = float(minutes) * 60

    probes: list[Probe] = []
    chosen: tuple[Candidate, dict[str, Any]] | None = None
    last: tuple[float, float] | None = None  # (seconds a step, FLOPs a step) of the last recipe timed
    text_chars: float | None = None  # characters of training text (the corpus's train split)
    passed_over: list[dict[str, Any]] = []  # recipes skipped because the one chosen so far has text left
    known: str | None = None  # the precision auto picks here, once a recipe's timings have settled it
    for cand in CANDIDATES[command]:
        if chosen is not None and text_chars and probes[-1].chars / text_chars < cand.after_passes:
            # the recipe chosen so far has not run out of text in this budget; a larger recipe
            # after this one may still be taken by its own characters
            passed_over.append({"preset": cand.preset, "after": chosen[0].preset, "after_passes": cand.after_passes,
                                "passes": round(probes[-1].chars / text_chars, 2)})
            continue
        values = runs.settings(command, cand.preset, config_file, flags)
        per_step = chars_per_step(values)
        left = max(0.0, budget - (time.monotonic() - started))
        flops = flops_per_char(values) * per_step
        if last is not None:
            bound = last[0] * flops / last[1] / EFFICIENCY_ALLOWANCE
            bound_chars = TRAIN_SHARE * left / bound * per_step
            if bound_chars < cand.from_chars:
                probes.append(Probe(cand.preset, bound_chars, None, "-", cand.from_chars))
                break
        cfgs, task = runs.checked_task(command, {**values, "max_steps": 1, "minutes": None})
        text_chars = text_chars or len(getattr(getattr(task, "corpus", None), "train", ()))
        sps, how, timings = fitted_seconds_per_step(task, cfgs["train"], None, n=PROBE_STEPS, warmup=PROBE_WARMUP,
                                                    known=known)
        if known is None and len(timings) > 1 and (picked := pick_precision(timings)) != "fp32":
            # bf16's gain grows with the matmuls (1.7x for chat-quick, 2.7x for chat-20min on an
            # AVX-512-BF16 EPYC): once it wins, the larger recipes are timed in it alone. There
            # it chose in 2.9 s at 5 minutes where timing both took 7.9 (benchmarks/auto_probe.py)
            known = picked
        left = max(0.0, budget - (time.monotonic() - started))
        chars = TRAIN_SHARE * left / sps * per_step
        probes.append(Probe(cand.preset, chars, sps, how, cand.from_chars, timings))
        if chars < cand.from_chars and chosen is not None:
            break
        chosen, last = (cand, values), (sps, flops)
    assert chosen is not None  # the first candidate needs no characters
    cand, values = chosen
    took = next(p for p in probes if p.preset == cand.preset)
    after = probes[-1] if probes[-1].preset != cand.preset else None
    why = (f"; {after.preset} would train on {after.chars / 1e6:.2g}M of the {after.from_chars / 1e6:.2g}M it "
           f"needs{'' if after.seconds_per_step else ' (bound, not timed)'}" if after else "")
    why += "".join(f"; {p['preset']} only once {p['after']} would read its text {p['after_passes']:g} times "
                   f"({p['passes']:.2g} here)" for p in passed_over)
    took_seconds = time.monotonic() - started
    echo(f"--preset auto: {cand.preset} for {float(minutes):g} minutes ({values['num_layers']} x {values['d_model']}, "
         f"context {values['context_len']}): about {took.chars / 1e6:.2g}M characters of training at "
         f"{1000 * (took.seconds_per_step or 0):.0f} ms a step ({took.precision}){why}; "
         f"chose in {took_seconds:.1f} s from launch")
    # the run's --precision auto decides by its recipe's timings: timing fp32 against bf16 again
    # would cost a second of a one-minute budget to learn the same
    return cand.preset, {"auto": {"preset": cand.preset, "minutes": float(minutes), "chosen_at": round(took_seconds, 2),
                                  "timings": took.timings, "text_chars": text_chars,
                                  "probes": [p.record() for p in probes], "passed_over": passed_over}}

