"""What the loop does every so often, besides stepping: log the interval's scalars, evaluate
every member (plateau cuts, the best checkpoint), show samples, save a checkpoint, and (a
``--minutes`` run) fit the step count to the time left. Each is a function of the
``Session``, the things one call of ``train()`` works with."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from trainlab.engine.budget import DRIFT, END_SECONDS, PROBE_PART, Budget, BudgetTooSmall
from trainlab.engine.distributed import Dist, all_sum, broadcast
from trainlab.engine.member import Member
from trainlab.engine.memory import memory_figures
from trainlab.engine.monitor import Eta, due, format_duration
from trainlab.engine.state import (
    LoopState,
    as_float,
    is_better,
    rng_state,
    save,
    set_rng_state,
)
from trainlab.engine.step import evaluate_member, evaluate_part
from trainlab.engine.task import Evaluation, Task
from trainlab.engine.tracking import Run
from trainlab.engine.train_config import TrainConfig


@dataclass
class Session:
    """What one call of ``train`` works with; the functions the loop calls take it."""

    task: Task
    cfg: TrainConfig
    run: Run
    config: dict[str, Any]
    members: list[Member]
    state: LoopState
    device: torch.device
    d: Dist
    say: Callable[[str], None]
    writers: dict[str, Any] = field(default_factory=dict)
    eta: Eta = field(default_factory=Eta)
    interval: dict[str, tuple[float, int]] = field(default_factory=dict)  # (train seconds, examples) at the last log
    last_eval: int = 0
    last_save: int = 0
    last_sample: int = 0
    t_saved: float = 0.0
    budget: Budget | None = None  # a --minutes run
    started: float = 0.0  # time.monotonic() the budget's clock counts from (the command's start)


def log_scalars(s: Session, bar) -> None:
    """The interval's mean losses and stats, LR, trend, health counters, memory and speed of
    every member to TensorBoard; the progress bar's losses and ETA."""
    state, cfg, step, post = s.state, s.cfg, s.state.step, {}
    memory = memory_figures(s.device)
    for m in s.members:
        w = s.writers[m.name]
        slot = state.acc.get(m.name, {})
        n = slot.get("n", 0)
        if s.d.active:  # the loss is already the global batch's; each rank holds its share of the stats
            shares = sorted(k for k in slot if k not in ("n", "loss", "grad_norm"))
            summed = all_sum([as_float(slot[k]) for k in shares], s.device).tolist()
            slot = {**slot, **dict(zip(shares, summed))}
        values = {k: as_float(v) / n for k, v in slot.items() if k != "n"} if n else {}
        for k, v in values.items():
            w.add_scalar(f"train/{k}", v, step)
        w.add_scalar("train/lr", m.lr, step)
        if m.trend.values:
            w.add_scalar("train/loss_avg", m.trend.mean, step)
            w.add_scalar("train/loss_ema", m.trend.ema, step)
        for k, v in s.task.scalars(step - 1).items():
            w.add_scalar(f"train/{k}", v, step)
        health = {"loss_spikes": m.trend.spikes, "skipped_nonfinite": m.health.skipped_nonfinite,
                  "skipped_spikes": m.health.skipped_spikes, "rollbacks": m.health.rollbacks,
                  "micro_batches": m.micro.count, "oom_retries": m.micro.ooms, "lr_scale": m.plateau.scale,
                  "fp32_fallback": float(m.precision.fell_back_at is not None)}
        for k, v in health.items():
            w.add_scalar(f"health/{k}", v, step)
        for k, v in memory.items():
            w.add_scalar(f"memory/{k}", v, step)
        secs, ex = s.interval[m.name]
        if m.train_seconds > secs:
            w.add_scalar("perf/examples_per_sec", (m.examples - ex) / (m.train_seconds - secs), step)
        s.interval[m.name] = (m.train_seconds, m.examples)
        if "loss" in values:
            m.losses.append([step, values["loss"]])
            post[m.name] = f"{values['loss']:.3f}"
        if cfg.on_spike == "rollback":
            m.take_snapshot()  # every update since the last one passed the spike check
    if s.budget is not None:
        post["left"] = format_duration(max(0.0, s.budget.left()))
    elif cfg.max_steps is None:
        post["rate"] = s.eta.rate()
    else:
        pauses = {"eval": due(step, cfg.max_steps, cfg.eval_every), "save": due(step, cfg.max_steps, cfg.save_every),
                  "sample": due(step, cfg.max_steps, cfg.sample_every)}
        post["eta"] = format_duration(s.eta.eta(cfg.max_steps - step, pauses))
    bar.set_postfix(post, refresh=False)
    state.acc, state.acc_steps = {}, 0


def evaluate_all(s: Session, track_best: bool = True) -> None:
    """Every member's evaluation, logged and printed, with its plateau LR cut and the best
    checkpoint. ``track_best`` False: for the user's eyes only, changing no state (no best
    checkpoint, no plateau count)."""
    state, metric, mode = s.state, *s.task.best_metric
    rng = rng_state()  # evaluation must not move the training RNG, or a resume would differ
    parts, scores = [], []
    for m in s.members:
        if s.d.main:
            with m.scoring():  # eval mode here, not every step: walking the modules costs ~1 ms
                ev = evaluate_member(s.task, m, state.step, s.cfg.batch_size, s.device, s.say)
        # every rank needs the metrics: they drive the plateau cuts and the best checkpoint
        metrics = broadcast(ev.metrics if s.d.main else None, s.d)
        if not s.d.main:
            ev = Evaluation(metrics)
        m.evals.append({"step": state.step, **ev.metrics})
        for k, v in ev.metrics.items():
            s.writers[m.name].add_scalar(f"val/{k}", v, state.step)
        if ev.lines:
            s.writers[m.name].add_text("val/mistakes", "\n\n".join(ev.lines), state.step)
        shown = ", ".join(f"{k} {v:.4g}" for k, v in list(ev.metrics.items())[:3])
        parts.append(f"{m.name}: {shown}" + "".join(f"\n    {line}" for line in ev.lines[:3]))
        scores.append(float(ev.metrics.get(metric, float("nan"))))
        old_lr = m.lr
        if track_best and "val_loss" in ev.metrics and m.plateau.observe(ev.metrics["val_loss"], old_lr):
            m.set_lr()
            parts.append(f"{m.name}: val loss flat for {m.plateau.patience} evaluations: LR {old_lr:.3g} -> "
                         f"{m.lr:.3g} (cut {m.plateau.cuts})")
    set_rng_state(rng)
    s.say(f"[step {state.step}] " + "\n           ".join(parts))
    s.last_eval = state.step
    score = sum(scores) / len(scores)
    if track_best and is_better(score, state.best_score, mode):
        state.best_score = score
        save(s.run, s.task, s.members, state, s.cfg, s.config, best={"metric": metric, "mode": mode, "value": score},
             d=s.d)


def sample_all(s: Session) -> None:
    """A sample of every member, printed and in TensorBoard's text tab (rank 0 only)."""
    s.last_sample = s.state.step
    if not s.d.main:
        return
    rng = rng_state()  # like evaluation, sampling must not move the training RNG
    for m in s.members:
        with m.scoring() as model, m.precision.autocast():
            sample = s.task.sample(m.name, model, s.state.step)
        for k, v in sample.metrics.items():
            if math.isfinite(v):  # a metric not defined for this sample (NaN) is left out, not drawn as 0
                s.writers[m.name].add_scalar(f"samples/{k}", v, s.state.step)
        if sample.text:
            s.writers[m.name].add_text("samples/text", sample.text, s.state.step)
        s.say(f"[step {s.state.step}] {m.name} sample" + "".join(f"\n    {line}" for line in sample.lines))
    set_rng_state(rng)


def checkpoint(s: Session) -> None:
    """Everything to a new checkpoint folder, after the events up to this step reach the disk."""
    s.state.eta = s.eta.state_dict()
    if s.budget is not None:
        s.state.budget = s.budget.state_dict(s.started)
    for w in s.writers.values():
        w.flush()
    save(s.run, s.task, s.members, s.state, s.cfg, s.config, d=s.d)
    s.last_save, s.t_saved = s.state.step, time.perf_counter()
    s.run.update(step=s.state.step)


def timed(s: Session, kind: str, action: Callable[..., None], *args: Any) -> None:
    """``action(*args)``, its time counted as a pause for the ETA (not as step time)."""
    t = time.perf_counter()
    action(*args)
    s.eta.add_pause(kind, time.perf_counter() - t)


def mean_pause(s: Session, kind: str) -> float | None:
    total = s.eta.pauses.get(kind)
    return total[0] / total[1] if total and total[1] else None


def _probe(s: Session, kind: str) -> None:
    """Time one evaluation or sample of every member for the budget, its results thrown away:
    no log, no best checkpoint, no plateau count, the RNG as it was. An evaluation is timed on
    ``PROBE_PART`` of its batches where the task can run a part (``evaluate_part``), and scaled
    up: at one minute a whole one was 1-2% of the budget spent on a number thrown away."""
    if not s.d.main:
        return
    rng = rng_state()
    cost = 0.0
    for m in s.members:
        with m.scoring() as model:
            t = time.perf_counter()
            if kind == "eval":
                share = evaluate_part(s.task, m, s.state.step, s.cfg.batch_size, s.device, PROBE_PART)
            else:
                with m.precision.autocast():
                    s.task.sample(m.name, model, s.state.step)
                share = 1.0
            cost += (time.perf_counter() - t) / share
    s.eta.add_pause(kind, cost)
    set_rng_state(rng)


def _probe_report(s: Session) -> None:
    """Time ``PROBE_PART`` of the report's own scoring (``task.report_part``: chat's whole val
    span in fp32, multiply's held-out test problems) and keep it scaled up as the report's cost:
    estimated in evaluations instead, multiply's runs ended 2-5% early at one minute."""
    if not s.d.main:
        return
    rng = rng_state()
    with contextlib.ExitStack() as scoring:
        models = {m.name: scoring.enter_context(m.scoring()) for m in s.members}
        t = time.perf_counter()
        share = float(s.task.report_part(models, PROBE_PART))  # type: ignore[attr-defined]
        s.eta.add_pause("report", (time.perf_counter() - t) / share)
    set_rng_state(rng)


def fp32_slowdown(members: list[Member]) -> float:
    """How much slower a pass runs in fp32 than in the precision the members train in, from
    what ``--precision auto`` timed (1 where it timed nothing, or chose fp32)."""
    ratios = [m.precision.measured["fp32"] / m.precision.measured[m.precision.mode] for m in members
              if "fp32" in m.precision.measured and m.precision.measured.get(m.precision.mode)]
    return max(ratios, default=1.0)


def fit_budget(s: Session, kind: str, bar) -> None:
    """Fit (or check) the step count and the cadence of pauses to the time left: see
    ``engine/budget.py``. Every rank calls it at the same step; rank 0's clock decides."""
    b, cfg = s.budget, s.cfg
    asked = b.asked or {"eval": cfg.eval_every, "sample": cfg.sample_every, "save": cfg.save_every}
    b.asked = asked
    if kind == "fit":  # every pause measured before the plan depends on it
        for pause in ("eval", "sample"):
            if mean_pause(s, pause) is None and (pause == "eval" or cfg.sample_every):
                _probe(s, pause)
        if mean_pause(s, "report") is None and hasattr(s.task, "report_part"):
            _probe_report(s)
        timed(s, "save", checkpoint, s)
    plan = None
    if s.d.main:
        costs = {k: mean_pause(s, k) or 0.0 for k in ("eval", "sample", "save")}
        # a report that scores whole windows in fp32 (chat's span) costs what an evaluation in the
        # run's precision costs times the fp32 slowdown: 2.4x for chat-20min in bf16, whose report
        # took 6 s where 3 s were kept. Multiply's greedy decoding gains little from bf16: as is.
        report = mean_pause(s, "report")  # timed on a part of the report's own scoring
        if report is None:  # a task that cannot run a part of it: estimated in evaluations
            report = costs["eval"] * float(getattr(s.task, "report_cost", lambda: 0.0)())
            if getattr(s.task, "report_in_fp32", False):
                report *= fp32_slowdown(s.members)
        end = costs["eval"] + report + (costs["sample"] if cfg.sample_every else 0.0) + costs["save"] + END_SECONDS
        wsd = cfg.schedule == "wsd"

        def decay_from(steps: int) -> float:
            return cfg.warmup_steps + (1 - cfg.decay_fraction) * (steps - cfg.warmup_steps) if wsd else math.inf

        try:
            p = b.fit(kind, s.state.step, b.pace() or s.eta.seconds_per_step() or 0.0, costs, asked, end, cfg.max_steps,
                      cfg.warmup_steps, decay_from)
        except BudgetTooSmall as e:
            broadcast({"refused": str(e)}, s.d)  # every rank stops alike; this one says why
            raise
        plan = None if p is None else {"steps": p.steps, **{f"{k}_every": n for k, n in p.every.items()}}
        fit = b.fits[-1]
        shown = ", ".join(f"{k} {v:.2g} s" for k, v in costs.items() if v)
        if p is None:
            s.say(f"[step {s.state.step}] budget: pace {fit['pace']:.3g} s a step, within {100 * DRIFT:g}% of the "
                  f"fit: {cfg.max_steps:,} steps stand")
        else:
            s.say(f"[step {s.state.step}] budget {b.minutes:g} min: {'refitted' if kind == 'refit' else 'fitted'} "
                  f"to {p.steps:,} steps at {fit['pace']:.3g} s a step ({shown}; evaluate every "
                  f"{p.every['eval']:,}); {format_duration(b.left())} left")
    # every rank follows rank 0's plan and its schedule of checks (a rank that kept its own
    # would call for a fit the others never join)
    told = broadcast({"plan": plan, "fits": b.fits, "fit_at": b.fit_at, "refit_at": b.refit_at,
                      "checks": b.checks} if s.d.main else None, s.d)
    if told is not None and "refused" in told:
        raise BudgetTooSmall(told["refused"].split(": ", 1)[-1])
    plan = told["plan"]
    b.fits, b.fit_at, b.refit_at, b.checks = told["fits"], told["fit_at"], told["refit_at"], told["checks"]
    if plan is not None:
        apply_plan(s, plan, extension=b.extension)
        bar.total = cfg.max_steps
        bar.refresh()
    if s.d.main:
        s.run.update(max_steps=cfg.max_steps, budget=b.state_dict(s.started), config=s.config)


def apply_plan(s: Session, plan: dict[str, int], extension: bool) -> None:
    """The fitted numbers become the run's settings (so a resume continues to them), and the
    LR schedule ends at the last step (an extension keeps the schedule it finished, at its
    final LR)."""
    values = {"max_steps": plan["steps"], "eval_every": plan["eval_every"], "save_every": plan["save_every"],
              "sample_every": plan["sample_every"]}
    if not extension:  # the last step (index steps - 1) runs at the schedule's final LR
        values["lr_decay_steps"] = max(plan["steps"] - 1, s.cfg.warmup_steps + 1)
    for k, v in values.items():
        setattr(s.cfg, k, v)
        s.config["train"][k] = v
    for m in s.members:
        m.set_lr()  # the next step's LR under the new horizon
