"""engine.train(): the one training loop every task runs on.

Each step: the task gives the batch for that step; every member (a model with its
own optimizer, LR schedule and step count) does forward, backward and update on
that same batch; then log, maybe evaluate, maybe save. Training stops exactly at
``max_steps`` optimizer updates, or on Ctrl+C at the next step boundary (so no
member is ever left half a step ahead), and then saves and reports.

Batches are a pure function of (seed, step), so the data position of a run is its
step count and a resumed run reads exactly the batches it would have read.

Where each concern lives:

    train_config.py   TrainConfig (the loop's flags), what a resume may change, the LR schedule
    task.py           the Task protocol, Evaluation, StepLoss: what a task gives the loop
    member.py         Member (model, optimizer, schedule, precision, counters), Summary
    state.py          LoopState, RNG capture, save/restore of a checkpoint
    step.py           one member's step (micro-batches, out-of-memory, skips, spikes, DDP
                      agreement), the guarded evaluation, the start-of-run speed choices
    periodic.py       what the loop does every so often: log, evaluate, sample, save
    stopping.py       Ctrl+C: stop at the next step boundary, or abort
    loop.py (here)    train(): set up, the steps, finish

A member's step is guarded: its forward pass runs under the precision's autocast, an
out-of-memory is retried in more micro-batches (``engine/memory.py``), and a loss or
gradient that is not finite, or a loss spike with ``--on-spike skip|rollback``, leaves
the weights and optimizer state untouched (the batch is still consumed, the step still
counts toward ``max_steps``, and the schedule, which follows the batches, moves on). The
skip of a non-finite step is decided on the device, so a step that neither logs,
evaluates, samples nor saves never waits for it; the host reads every step since its last
read at the next of those (``step.settle``), and counts, logs and says what it finds then.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any, Callable

import torch

from trainlab.engine import faults
from trainlab.engine.batches import Batches
from trainlab.engine.budget import Budget, BudgetTooSmall
from trainlab.engine.checkpoint import Checkpoint, latest_checkpoint
from trainlab.engine.device import deterministic_from_env, resolve_device, set_fp32_matmul
from trainlab.engine.distributed import (
    Dist,
    all_sum,
    broadcast,
    current,
    device_for,
    shard,
    wrap,
)
from trainlab.engine.member import Member, Summary, make_member
from trainlab.engine.periodic import (
    Session,
    checkpoint,
    evaluate_all,
    fit_budget,
    log_scalars,
    sample_all,
    timed,
)
from trainlab.engine.state import LoopState, restore, seed_everything, settle_best
from trainlab.engine.step import StepContext, batch_rows, choose_speed, member_step, settle
from trainlab.engine.stopping import StopSignals
from trainlab.engine.task import Task
from trainlab.engine.tracking import ReadOnlyRun, Run, remove_runs
from trainlab.engine.train_config import TrainConfig, lr_lambda

# after each scheduled evaluation: (step, {member: its metrics}) -> stop the run there?
Prune = Callable[[int, dict[str, dict[str, float]]], bool]


def train(task: Task, cfg: TrainConfig, run: Run, config: dict[str, Any], resume: Checkpoint | None = None,
          echo=print, restart: bool = False, prune: Prune | None = None, started: float | None = None,
          timed_precisions: dict[str, float] | None = None) -> Summary:
    """Train every member of ``task`` in lockstep; returns what the report needs.

    ``resume``: continue from this checkpoint exactly as if the run had never stopped.
    ``restart``: the run folder has logs of an earlier attempt (resumed without a usable
    checkpoint); they are purged from the step training starts at.
    ``prune``: called after every scheduled evaluation with the step and each member's
    metrics; True stops the run there, saved, with status ``pruned`` (``trainlab tune``).
    ``started``: the ``time.monotonic()`` a ``--minutes`` budget counts from (the CLI passes
    its process's start, ``budget.process_age``); default now.
    ``timed_precisions``: seconds a step of each precision ``--precision auto`` would time,
    measured just before on this machine (``--preset auto`` times the recipe it chooses): a
    new run decides by them instead of timing the same again.
    The run's status in run.json and the runs index follows: running, then finished,
    interrupted (a stop signal, ``engine/stopping.py``), pruned, or failed (an exception,
    re-raised). A new run stopped before its first step holds nothing and is removed.
    Under torchrun (``engine/distributed.py``) every rank calls this; only rank 0 speaks,
    locks the run and writes anything."""
    d = current()
    started = time.monotonic() if started is None else started
    if not d.main:
        with StopSignals(lambda line: None) as stop:
            return _train(task, cfg, ReadOnlyRun(run.id, run.task, run.dir), config, resume, lambda *a, **k: None,
                          False, contextlib.ExitStack(), stop, prune, d, started, timed_precisions)
    run.acquire()
    fresh = resume is None and not restart
    try:
        # the handlers are held through set-up and the final save: a signal at any moment is a
        # stop (or, the second time, an abort), never Python's default
        with StopSignals(echo) as stop, contextlib.ExitStack() as cleanup:  # writers closed however it ends
            summary = _train(task, cfg, run, config, resume, echo, not fresh, cleanup, stop, prune, d, started,
                             timed_precisions)
    except KeyboardInterrupt:
        if fresh and latest_checkpoint(run.checkpoints) is None:
            _remove_empty(run, echo)
        else:
            _mark(run, "interrupted")
        raise
    except BudgetTooSmall:
        if fresh:  # a few timed steps are all it holds
            run.release()
            remove_runs(run.root, [run])
        else:
            _mark(run, "interrupted")
        raise
    except BaseException:
        _mark(run, "failed")
        raise
    finally:
        run.release()
    if summary.step == 0 and summary.interrupted and fresh:
        _remove_empty(run, echo)
        return summary
    if summary.budget is not None:
        summary.budget["to_report"] = round(time.monotonic() - started, 3)
    task.report(run, summary)
    if summary.budget is not None:  # from the command's start (this attempt's) to the report written
        summary.budget["wall_seconds"] = round(time.monotonic() - started, 3)
        _mark_budget(run, summary.budget)
    return summary


def _mark_budget(run: Run, budget: dict[str, Any]) -> None:
    try:
        run.update(budget=budget)
    except OSError:
        pass


def _mark(run: Run, status: str) -> None:
    """The run's final status, if it can still be written (not when the disk is what failed)."""
    try:
        run.update(status=status)
    except OSError:
        pass


def _remove_empty(run: Run, echo) -> None:
    """A new run stopped before its first step: it holds nothing worth keeping."""
    run.release()
    remove_runs(run.root, [run])
    echo(f"stopped before the first step: run {run.id} held nothing and was removed")


def _train(task: Task, cfg: TrainConfig, run: Run, config: dict[str, Any], resume: Checkpoint | None,
           echo, purge: bool, cleanup: contextlib.ExitStack, stop: StopSignals, prune: Prune | None,
           d: Dist = Dist(), started: float = 0.0, timed_precisions: dict[str, float] | None = None) -> Summary:
    from tqdm import tqdm

    device = device_for(resolve_device(cfg.device), d)
    fp32_matmul = set_fp32_matmul(device, cfg.tf32)
    deterministic_from_env()
    if cfg.minutes is not None and cfg.max_steps is not None and resume is None:
        # a new run given both (a caller that set max_steps over a preset's budget): steps win, and
        # the run's record says so
        cfg.minutes = config["train"]["minutes"] = None
    members, state, budget = set_up(task, cfg, resume, device, d, echo, started, timed_precisions)
    if d.main:
        settle_best(run, state, echo)
    state.best_score = broadcast(state.best_score if d.main else None, d)  # every rank decides the best alike
    start_step = state.step
    if stop.requested and resume is None and state.step == 0:  # a stop signal during set-up
        return Summary(run, members, 0, 0.0, True, config, stop.signum, stop.reason)
    # everything logged at a checkpoint's step was written (and flushed) before the checkpoint,
    # so a resume keeps the events up to that step and purges the ones after it
    writers = {m.name: run.writer(m.name, purge_step=state.step + 1 if purge else None) for m in members}
    for w in writers.values():
        cleanup.callback(w.close)
    run.update(status="running", device=str(device), step=state.step, max_steps=cfg.max_steps,
               members=[m.name for m in members], config=config, pid=os.getpid(),
               **({"fp32_matmul": fp32_matmul} if fp32_matmul else {}))
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (cfg.progress and d.main), dynamic_ncols=True,
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]" if cfg.max_steps else None)
    s = Session(task, cfg, run, config, members, state, device, d, bar.write if d.main else echo, writers,
                budget=budget, started=started)
    s.eta.load_state_dict(state.eta)
    s.interval = {m.name: (m.train_seconds, m.examples) for m in members}
    s.last_eval = s.last_save = s.last_sample = state.step
    planned = faults.plan()  # {} unless a test asked for faults
    ctx = StepContext(cfg, device, s.say, d, state, planned)  # what every step shares
    t_start = s.t_saved = time.perf_counter()
    batches = Batches(task.batch, device)  # on an accelerator the next batch is made while a step trains
    cleanup.callback(batches.close)

    while (cfg.max_steps is None or state.step < cfg.max_steps) and not stop.requested:
        t0 = time.perf_counter()
        step = state.step
        full = batches(step)  # the global batch; under torchrun each rank trains on its slice
        n_examples = batch_rows(full)
        batch = {k: v.to(device, non_blocking=True) for k, v in shard(full, d).items()}
        for m in members:
            t_m = time.perf_counter()
            member_step(m, task, batch, step, n_examples, ctx)
            m.examples += n_examples
            m.train_seconds += time.perf_counter() - t_m
        state.step += 1
        state.acc_steps += 1
        s.eta.add_step(time.perf_counter() - t0)
        bar.update(1)
        kind = None
        if budget is not None:
            budget.add_step(time.perf_counter() - t0)
            kind = budget.due(state.step)
        if state.step in planned.get("interrupt", ()):
            stop.request("interrupt")
        faults.signal_if(planned, state.step)
        save_now = (cfg.save_every_minutes is not None
                    and time.perf_counter() - s.t_saved >= 60 * cfg.save_every_minutes)
        if d.active:  # a stop on any rank stops every rank after this step; rank 0's clock says when to save
            agreed = all_sum([float(stop.requested), float(save_now and d.main), float(stop.hurry)], device).tolist()
            if agreed[0] > 0:
                stop.request("another process stopped")
            save_now, stop.hurry = agreed[1] > 0, agreed[2] > 0
        log_now = state.step % cfg.log_every == 0 or state.step == cfg.max_steps
        eval_now = state.step % cfg.eval_every == 0
        sample_now = bool(cfg.sample_every) and state.step % cfg.sample_every == 0
        save_now = (state.step % cfg.save_every == 0 or save_now) and s.last_save != state.step
        if log_now or eval_now or sample_now or save_now or kind:
            # the host reads what the device decided since the last read: a quiet step never waits
            settle(members, cfg, state, s.say)
        if kind:
            fit_budget(s, kind, bar)
        if log_now:
            log_scalars(s, bar)
        if eval_now:
            timed(s, "eval", evaluate_all, s)
            if prune is not None and broadcast(prune(state.step, {m.name: m.evals[-1] for m in members})
                                               if d.main else None, d):
                stop.request("pruned")
        if sample_now:
            timed(s, "sample", sample_all, s)
        if save_now:
            timed(s, "save", checkpoint, s)
        if state.step in planned.get("kill", ()):
            faults.kill_now()
    bar.close()
    return finish(s, bar, stop, start_step, resume is None, t_start, echo)


def timings_decide(timed: dict[str, float], candidates: list[str]) -> bool:
    """Whether timings made before the run (``--preset auto``'s) settle its ``--precision auto``:
    every candidate timed, or a faster mode than fp32 timed alone (auto times a larger recipe in
    bf16 only once bf16 has beaten fp32 on a smaller one, whose matmuls gain less from it). fp32
    alone, or a mode this machine does not offer, settles nothing: the run times them itself."""
    if not set(timed) <= set(candidates):
        return False
    return set(timed) == set(candidates) or "fp32" not in timed


def set_up(task: Task, cfg: TrainConfig, resume: Checkpoint | None, device: torch.device, d: Dist, echo,
           started: float, timed_precisions: dict[str, float] | None = None
           ) -> tuple[list[Member], LoopState, Budget | None]:
    """The members built (and restored from ``resume``), wrapped for DDP and compile, and with
    their micro-batching and precision settled; the loop state to start from; a ``--minutes``
    run's budget."""
    models = task.build_models()  # the task seeds each member alike, so shared parts start equal
    members = [make_member(name, model.to(device), cfg, device) for name, model in models.items()]
    seed_everything(cfg.seed + 1 + 7919 * d.rank)  # dropout and anything else random in training
    state = restore(resume, task, members, device, d) if resume is not None else LoopState()
    budget = open_budget(cfg, state, started) if cfg.minutes is not None else None
    for m in members:  # after the restore: DDP starts every rank from rank 0's weights
        m.ddp = wrap(m.model, device, d)
        if cfg.compile:  # training only; evaluation, sampling and checkpoints use the plain module
            m.ddp = torch.compile(m.ddp)
    if cfg.max_steps is not None and state.step >= cfg.max_steps:
        echo(f"already at step {state.step} of --max-steps {cfg.max_steps}: nothing to train")
    for m in members:
        if timed_precisions and resume is None and m.precision.undecided \
                and timings_decide(timed_precisions, m.precision.candidates):
            chose = m.precision.decide(timed_precisions)
            shown = ", ".join(f"{p} {t:.3g} s" for p, t in timed_precisions.items())
            echo(f"{m.name}: --precision auto: {chose} (as timed a step before the run: {shown})")
        fell = f" (fell back from {cfg.precision} at step {m.precision.fell_back_at})" \
            if m.precision.fell_back_at is not None else ""
        mode = f"auto, timing {' and '.join(m.precision.candidates)}" if m.precision.undecided else m.precision.mode
        echo(f"{m.name}: {m.num_parameters:,} parameters, precision {mode}{fell}")
        m.model.train()  # evaluation and sampling put it back in train mode when they are done
        if cfg.on_spike != "rollback":
            m.snapshot = None
        elif m.snapshot is None:
            m.take_snapshot()
    if cfg.micro_batch == "off":
        for m in members:
            m.micro.set_floor(1)
    open_choice = cfg.micro_batch != "off" or any(m.precision.undecided for m in members)
    if open_choice and (cfg.max_steps is None or state.step < cfg.max_steps):
        full = task.batch(state.step)
        first = {k: v.to(device) for k, v in shard(full, d).items()}
        for m in members:
            choose_speed(m, task, first, state.step, batch_rows(full), StepContext(cfg, device, echo, d))
    return members, state, budget


def finish(s: Session, bar, stop: StopSignals, start_step: int, fresh: bool, t_start: float, echo) -> Summary:
    """After the last step: the last log, evaluation and sample an unbroken run ends with, the
    final checkpoint, and the run's status."""
    state, cfg, interrupted = s.state, s.cfg, stop.requested
    # the plateau scale the last step ran at: the final evaluation below may cut it after that step
    last_scale = min((m.plateau.scale for m in s.members), default=1.0)
    settle(s.members, cfg, state, s.say)
    trained = state.step > start_step
    if not interrupted:
        if state.acc_steps:
            log_scalars(s, bar)
        if trained and s.last_eval != state.step:
            evaluate_all(s)
        if cfg.sample_every and trained and s.last_sample != state.step:
            sample_all(s)
    # an interrupted run keeps its partial log sums in the checkpoint, so a resume logs
    # exactly what an unbroken run would have
    t_save = time.perf_counter()
    if s.last_save != state.step or (fresh and state.step == 0):
        checkpoint(s)
    saved_in = time.perf_counter() - t_save
    status = "pruned" if stop.reason == "pruned" else "interrupted" if interrupted else "finished"
    s.run.update(status=status, step=state.step)  # before anything optional: a grace period may end soon
    if interrupted and trained and s.last_eval != state.step and stop.reason != "pruned" and not stop.hurry:
        # for the eyes of whoever pressed Ctrl+C (a scheduler's SIGTERM wants the process gone):
        # the checkpoint is written, so a resume continues as if this evaluation never happened
        # (and it cannot become the best checkpoint)
        evaluate_all(s, track_best=False)
    for w in s.writers.values():
        w.close()
    for m in s.members:
        # DDP's reducer holds the process group: a wrapper that outlived the run kept it alive
        # past destroy_process_group, and gloo's threads then aborted the process at exit.
        # torch.compile's module around the plain model holds none: it stays, to be looked at
        if getattr(m.ddp, "_orig_mod", m.ddp) is not m.model:
            m.ddp = m.model
    wall = time.perf_counter() - t_start
    if interrupted:
        why = f" ({stop.reason})" if stop.reason else ""
        echo(f"{'pruned' if status == 'pruned' else 'interrupted'} at step {state.step}{why}; checkpoint saved "
             f"in {s.run.checkpoints} ({saved_in:.1f} s); continue with --resume {s.run.id}")
    budget = None
    if s.budget is not None:
        budget = s.budget.state_dict(s.started)
        budget["steps"] = state.step
        budget["train_seconds"] = round(sum(m.train_seconds for m in s.members), 3)  # every attempt's
        # where the LR stood at the last step: 1.0 is the schedule's peak, min_lr_ratio its end; a
        # plateau cut (the lowest member's) shows as less than the end, not hidden behind the schedule
        budget["last_lr_factor"] = round(lr_lambda(cfg)(max(0, state.step - 1)) * last_scale, 6)
    return Summary(s.run, s.members, state.step, wall, interrupted, s.config, stop.signum, stop.reason, budget)


def open_budget(cfg: TrainConfig, state: LoopState, started: float) -> Budget:
    """The budget of a ``--minutes`` run at the step it starts from: new, continued from the
    checkpoint, or (new minutes given to a finished run; ``runs.prepare`` lets them through
    only then) an extension. Until its first fit the run has no end step."""
    saved = state.budget
    if (saved and float(saved["minutes"]) != cfg.minutes) or (not saved and state.step > 0):  # a finished run's
        b = Budget.start(float(saved["minutes"]), state.step, saved, started) if saved else \
            Budget.start(cfg.minutes, state.step, None, started)
        b.extend(cfg.minutes, state.step, started)
        cfg.max_steps = None  # the schedule ended where the run did: it stays at its final LR
        return b
    b = Budget.start(cfg.minutes, state.step, saved, started)
    if b.fit_at is not None:
        cfg.max_steps = cfg.lr_decay_steps = None
    return b
