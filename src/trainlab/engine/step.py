"""One member's step on one batch: forward and backward in micro-batches (with out-of-memory
retries and, under torchrun, the agreement of every rank), then the update unless the loss
or gradients were not finite or spiked; a guarded evaluation; and the timing that settles
``--micro-batch auto`` and ``--precision auto`` at the start of a run."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, NamedTuple

import torch

from trainlab.engine import faults
from trainlab.engine.device import rewind_rng, rng_point, synchronize
from trainlab.engine.distributed import Dist, all_sum, broadcast
from trainlab.engine.errors import TrainingError
from trainlab.engine.member import Member
from trainlab.engine.memory import fastest, free_memory, is_out_of_memory, micro_batch_counts, split_batch
from trainlab.engine.optim import follow_precision, masked_step
from trainlab.engine.precision import BF16_MARGIN, pick_precision
from trainlab.engine.state import LoopState
from trainlab.engine.task import Evaluation, Task
from trainlab.engine.timings import load_timings, save_timings, timing_key
from trainlab.engine.train_config import TrainConfig

# timing fp32 against bf16 stops after a round where the modes passed over would lose even if
# this much faster: 2x apart on a bf16 CPU, more rounds would not change the choice
DECISIVE_SLACK = 0.25


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    return int(next(iter(batch.values())).shape[0])


@dataclass(frozen=True)
class StepContext:
    """What every step of a run shares, made once by the loop: its settings, the device, this
    process among the ranks, where lines go, the loop state the host's reads add to, and the
    faults a test planned (``engine/faults.py``; empty in real runs)."""

    cfg: TrainConfig
    device: torch.device
    echo: Callable[[str], None] = print
    d: Dist = field(default_factory=Dist)
    state: LoopState | None = None
    planned: dict[str, set[int]] = field(default_factory=dict)


class _AgreedOutOfMemory(MemoryError):
    """Another rank ran out of memory in this step: every rank retries, as one."""


def _close_ddp_round(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int) -> None:
    """After an out-of-memory agreed on, leave every rank's DDP idle and alike: a rank whose
    last forward pass succeeded is waiting for a backward pass that all-reduces, the rank
    that failed is not. Every rank runs one such round on a single example with a zero
    loss, and the gradients are thrown away."""
    m.optimizer.zero_grad(set_to_none=True)
    one = {k: v[:1] for k, v in batch.items()}
    with m.precision.autocast():
        out = task.loss(m.name, m.ddp, one, step)
    (out.loss * 0.0).backward()
    m.optimizer.zero_grad(set_to_none=True)


def forward_backward(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int, n_global: int,
                     ctx: StepContext, first_try: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Gradients of the whole global batch (``n_global`` examples) from this rank's slice
    ``batch``; returns the global batch's loss (detached) and this rank's share of the stats.
    One process and one micro-batch is one pass (``_one_pass``); anything else goes through
    ``_micro_batches``."""
    m.optimizer.zero_grad(set_to_none=True)
    if m.micro.count == 1 and not ctx.d.active:
        return _one_pass(m, task, batch, step, ctx, first_try)
    return _micro_batches(m, task, batch, step, n_global, ctx, first_try)


def _one_pass(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int, ctx: StepContext,
              first_try: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The common case: the whole batch in one forward and backward pass, nothing to weigh or
    agree on."""
    faults.raise_if_out_of_memory(ctx.planned, step, batch_rows(batch), first_try)
    with m.precision.autocast():
        out = task.loss(m.name, m.ddp, batch, step)
    loss = faults.poison_loss(ctx.planned, step, out.loss)
    m.precision.scaler.scale(loss).backward()
    faults.poison_grads(ctx.planned, step, m.model)
    return loss.detach(), out.stats


def _micro_batches(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int, n_global: int,
                   ctx: StepContext, first_try: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``forward_backward`` in ``m.micro.count`` micro-batches, under torchrun with every rank
    agreeing on an out-of-memory.

    Micro-batch i is back-propagated as loss_i * w_i / ref, where w_i is its loss weight and
    ref = n_global / world is known to every rank in advance; DDP averages over ranks, so the
    gradient is sum(w_i g_i) * world / (n_global * world) and one multiplication by
    n_global / sum(w_i) (summed over ranks) makes it the whole batch's weighted mean. With
    unweighted losses that factor is exactly 1 and is skipped."""
    d, device, planned = ctx.d, ctx.device, ctx.planned
    scaler = m.precision.scaler
    chunks = split_batch(batch, m.micro.count)
    reference = n_global / d.world
    total: torch.Tensor | float = 0.0
    weight_sum: torch.Tensor | float = 0.0
    stats: dict[str, torch.Tensor] = {}
    last: torch.Tensor | None = None  # the last micro-batch's scaled loss: its backward syncs the ranks
    oom: BaseException | None = None
    weighted = False
    for i, chunk in enumerate(chunks):
        n = batch_rows(chunk)
        final = i == len(chunks) - 1
        try:
            faults.raise_if_out_of_memory(planned, step, n, first_try)
            # DDP decides in forward whether the backward all-reduces: only the last one does
            with (m.ddp.no_sync() if d.active and not final else contextlib.nullcontext()):
                with m.precision.autocast():
                    out = task.loss(m.name, m.ddp, chunk, step)
                loss = faults.poison_loss(planned, step, out.loss)
                w = n if out.weight is None else out.weight.detach()
                weighted = weighted or out.weight is not None
                scaled = scaler.scale(loss * (w / reference))
                if final:
                    last = scaled
                else:
                    scaled.backward()
        except Exception as e:  # noqa: BLE001 (only out-of-memory is handled; the rest re-raised)
            if not is_out_of_memory(e):
                raise
            oom = e
            break
        total = total + loss.detach() * w
        weight_sum = weight_sum + w
        for k, v in out.stats.items():
            stats[k] = stats.get(k, 0.0) + v * (n / n_global)
    if d.active:  # every rank learns whether one ran out of memory, and the batch's loss and weight
        agreed = all_sum(torch.cat([torch.as_tensor(x, device=device).double().reshape(1)
                                    for x in (float(oom is not None), weight_sum, total)]), device)
        if oom is None and agreed[0] > 0:
            oom = _AgreedOutOfMemory("another rank ran out of memory")
        total, weight_sum = agreed[2], agreed[1]
        if oom is not None:
            last = loss = out = None  # noqa: F841 (frees the graph before the round below)
            _close_ddp_round(m, task, batch, step)
    if oom is not None:
        raise oom
    try:
        last.backward()
    except Exception as e:  # noqa: BLE001
        if d.active and is_out_of_memory(e):
            # the other ranks are inside the gradient all-reduce by now; there is no agreeing any more
            raise TrainingError(f"{m.name}: out of memory on rank {d.rank} in the backward pass that all-reduces "
                                f"the gradients (step {step + 1}); resume with a smaller --micro-batch") from None
        raise
    if weighted:  # then the weights are tensors
        correction = (n_global / weight_sum).float()
        for p in m.params:
            if p.grad is not None:
                p.grad.mul_(correction)
    faults.poison_grads(planned, step, m.model)
    return (total / weight_sum).float(), stats


def member_step(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int, n_global: int,
                ctx: StepContext) -> None:
    """Forward, backward and (unless it must not happen) the update of one member on this
    rank's slice ``batch`` of a global batch of ``n_global``, without waiting for the device
    (with ``--on-spike log``): whether the loss and gradients were finite is decided there,
    and the step joins ``m.pending`` for ``settle`` to read later (into ``ctx.state``'s log
    sums). What went wrong, if anything, is said through ``ctx.echo`` then."""
    cfg, device, echo, d = ctx.cfg, ctx.device, ctx.echo, ctx.d
    n_local = batch_rows(batch)
    rng = rng_point(device)  # a retry after an out-of-memory draws the same dropout masks
    first_try = True
    while True:
        failed = False
        try:
            loss, stats = forward_backward(m, task, batch, step, n_global, ctx, first_try)
        except Exception as e:  # noqa: BLE001 (only out-of-memory is handled; the rest re-raised)
            if not is_out_of_memory(e):
                raise
            failed = True
        if not failed:
            break
        # out of the except block, so the failed attempt's tensors can be freed
        m.optimizer.zero_grad(set_to_none=True)
        free_memory(device)
        try:
            m.micro.on_oom(n_local, step)
        except RuntimeError as e:
            raise TrainingError(f"{m.name}: {e}") from None
        where = f" on one of the {d.world} processes; each one's slice" if d.active else "; the batch"
        echo(f"[step {step + 1}] {m.name}: out of memory{where} of {n_local} now runs as {m.micro.count} micro-batches")
        rewind_rng(rng, device)
        first_try = False
    m.micro.on_success()

    scaler = m.precision.scaler
    scaler.unscale_(m.optimizer)  # fp16: the true gradients (and the scaler notes an overflow, on the device)
    grads = [p.grad for p in m.params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    loss, norm = loss.float(), norm.float()
    observed: str | None = None
    if cfg.on_spike == "log":  # the device decides: a step is skipped when it is not finite
        skip = ~(torch.isfinite(loss) & torch.isfinite(norm))
        record = Pending(step, loss, norm, skip, stats, None, m.precision.mode)
    else:  # a spike skips or rolls back too, and the spike check needs the loss here: the step's one wait
        tensors = [k for k, v in stats.items() if isinstance(v, torch.Tensor)]
        loss_v, norm_v, *read = torch.stack([loss, norm, *(stats[k].float().reshape(()) for k in tensors)]).tolist()
        observed = m.trend.observe(loss_v) or ""
        bad = not (math.isfinite(loss_v) and math.isfinite(norm_v)) or bool(observed)
        skip = torch.full((), bad, dtype=torch.bool, device=loss.device)
        record = Pending(step, loss_v, norm_v, bad, {**stats, **dict(zip(tensors, read))}, observed, m.precision.mode)
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grads_with_norm_(m.params, cfg.grad_clip, norm)
    for g in grads:  # a skipped step's gradients become zeros: nothing non-finite reaches the optimizer
        g.masked_fill_(skip, 0.0)
    follow_precision(m.optimizer, m.precision.dtype)
    masked_step(m.optimizer, skip)
    if m.average is not None:  # a skipped step left the weights as they were; the average moves towards them alike
        m.average.update()
    m.scheduler.step()  # the schedule follows the batches, skipped or not: a run ends at its final LR
    scaler.update()  # lowers an fp16 loss scale after an overflow, raises it after a calm stretch (on the device)
    m.pending.append(record)
    if observed is not None:  # already read: the host's part now, before the next step
        settle([m], cfg, ctx.state, echo)


class Pending(NamedTuple):
    """A step whose outcome the host has not read yet: the device holds its loss, gradient
    norm and whether it was skipped. ``observed``: the spike check's verdict, when it was
    made before the update (``--on-spike skip|rollback``); None: still to be made."""

    step: int  # the loop's step (0-based) it was
    loss: torch.Tensor | float  # 0-dim on the device, or read: the whole batch's (nan or inf when not finite)
    grad_norm: torch.Tensor | float  # before clipping
    skipped: torch.Tensor | bool  # 0-dim bool
    stats: dict[str, torch.Tensor | float]
    observed: str | None
    mode: str  # the precision it ran in


def settle(members: list[Member], cfg: TrainConfig, state: LoopState | None, echo) -> None:
    """Read what the device decided in the steps since the last read, in one wait for all of
    them, and do the host's part of each in order: the loss trend and its spike check, the
    health counters and the update count, a rollback, the fall-back to fp32 after
    ``max_nonfinite`` non-finite steps in a row, and the sums the next log line is made of
    (``state``; None: leave them). The loop calls it only before it logs, evaluates, samples,
    saves, refits a budget or stops, so that a quiet step never waits for the device: its
    skip was decided there (``optim.masked_step``). What the host learns late is only when
    it is told: a spike or skip line, and a fall-back (at the next read, the next log step
    at the latest)."""
    todo = [(m, p) for m in members for p in m.pending]
    if not todo:
        return
    flat: list[torch.Tensor] = []
    for _, p in todo:
        flat += [t.float().reshape(()) for t in (p.loss, p.grad_norm, p.skipped, *p.stats.values())
                 if isinstance(t, torch.Tensor)]
    values = iter(torch.stack(flat).tolist() if flat else [])  # the one wait (none when all was read)

    def read(x: torch.Tensor | float | bool) -> float:
        return next(values) if isinstance(x, torch.Tensor) else float(x)

    for m in members:
        m.pending, pending = [], m.pending
        now = pending[-1].step + 1 if pending else 0  # the steps done: a fall-back takes effect after them
        for p in pending:
            loss_v, norm_v, skipped = read(p.loss), read(p.grad_norm), read(p.skipped) > 0
            stats = {k: read(v) for k, v in p.stats.items()}
            _conclude(m, p, loss_v, norm_v, skipped, cfg, echo, now)
            if state is None:
                continue
            slot = state.acc.setdefault(m.name, {"n": 0})
            if math.isfinite(loss_v):  # a non-finite one is counted in the health figures; it would poison the mean
                slot["n"] += 1
                for k, v in {"loss": loss_v, "grad_norm": norm_v, **stats}.items():
                    slot[k] = slot.get(k, 0.0) + v


def _conclude(m: Member, p: Pending, loss_v: float, norm_v: float, skipped: bool, cfg: TrainConfig, echo,
              now: int) -> None:
    """The host's part of one step, once its outcome is read (after step ``now``)."""
    step = p.step
    finite = math.isfinite(loss_v) and math.isfinite(norm_v)
    spike = p.observed if p.observed is not None else m.trend.observe(loss_v)
    if not finite:
        action = "nonfinite"
    elif spike and cfg.on_spike != "log":
        action = "spike"
    else:
        action = "update"
    assert skipped == (action != "update"), "the device and the host disagree on a skip"
    if action == "update":
        m.step += 1
        m.health.nonfinite_run = 0
    elif action == "nonfinite":
        m.health.skipped_nonfinite += 1
        m.health.nonfinite_run += 1
    else:
        m.health.skipped_spikes += 1
    # a non-finite loss is a spike too, and rolls back; a finite loss with overflowing
    # gradients (routine for fp16's loss scaler) is only skipped
    rolled = action != "update" and bool(spike) and cfg.on_spike == "rollback" and m.snapshot is not None
    if rolled:
        m.rollback()
        m.health.rollbacks += 1
    if spike or action != "update":
        what = f"spike, {spike}" if spike else f"gradient norm {norm_v}"
        done = "" if action == "update" else "; rolled back to the last good state" if rolled else "; update skipped"
        echo(f"[step {step + 1}] {m.name}: {what}{done}")
    if m.health.nonfinite_run >= cfg.max_nonfinite:
        if p.mode == "fp32":
            raise TrainingError(f"{m.name}: the loss or its gradients were not finite for {m.health.nonfinite_run} "
                                f"steps in a row in fp32 (up to step {step + 1}); training has diverged: lower --lr, "
                                f"or resume from an earlier checkpoint")
        if m.precision.mode != "fp32":  # (steps read after a fall-back ran before it: they do not repeat it)
            later = f" (from step {now + 1})" if now > step + 1 else ""
            echo(f"[step {step + 1}] {m.name}: {m.health.nonfinite_run} non-finite steps in a row under "
                 f"{p.mode}; falling back to fp32 for the rest of the run{later}")
            m.precision.fall_back(now)
        m.health.nonfinite_run = 0


def evaluate_member(task: Task, m: Member, step: int, batch_size: int, device: torch.device, echo) -> Evaluation:
    """``task.evaluate`` under the member's autocast; out of memory, it is run again in
    smaller batches: first the training micro-batch, then halves of it."""
    return _evaluating(lambda limit: task.evaluate(m.name, m.scored, step, limit), m, step, batch_size, device, echo)


def evaluate_part(task: Task, m: Member, step: int, batch_size: int, device: torch.device, part: float) -> float:
    """About ``part`` of an evaluation of ``m``, run only to time it (a budget's first fit): the
    share of a whole evaluation that ran (1.0 where the task cannot run a part: then it ran all
    of one). Under the member's autocast and the same out-of-memory retries as an evaluation."""
    if not hasattr(task, "evaluate_part"):
        evaluate_member(task, m, step, batch_size, device, lambda line: None)
        return 1.0
    return float(_evaluating(lambda limit: task.evaluate_part(m.name, m.scored, step, limit, part),  # type: ignore[attr-defined]
                             m, step, batch_size, device, lambda line: None))


def _evaluating(run: Callable[[int | None], Any], m: Member, step: int, batch_size: int, device: torch.device,
                echo) -> Any:
    while True:
        failed = False
        try:
            with m.precision.autocast():
                return run(m.micro.eval_limit)
        except Exception as e:  # noqa: BLE001 (only out-of-memory is handled; the rest re-raised)
            if not is_out_of_memory(e):
                raise
            failed = True
        if failed:
            free_memory(device)
            try:
                m.micro.on_eval_oom(batch_size, step)
            except RuntimeError as e:
                raise TrainingError(f"{m.name}: {e}") from None
            echo(f"[step {step}] {m.name}: out of memory in evaluation; evaluating {m.micro.eval_limit} at a time")


def decisive(timings: dict[str, float], slack: float = DECISIVE_SLACK) -> bool:
    """Whether ``pick_precision`` would choose the same even if every mode it passes over were
    ``slack`` faster than timed: a timing is only ever slowed by noise, so more passes could
    only make the losers faster, and by this much they cannot win."""
    if len(timings) < 2 or not all(math.isfinite(t) for t in timings.values()):
        return False
    chosen = pick_precision(timings)
    return pick_precision({mode: t if mode == chosen else t * (1 - slack) for mode, t in timings.items()}) == chosen


def time_pass(run: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of ``run`` takes, the device's queued work included."""
    synchronize(device)
    t = time.perf_counter()
    run()
    synchronize(device)
    return time.perf_counter() - t


def choose_speed(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int, n_global: int,
                 ctx: StepContext) -> None:
    """Settle what ``--micro-batch N|auto`` and ``--precision auto`` leave open, once per run
    (both choices are checkpointed). ``auto`` times a forward and backward pass of this batch
    for every pair of candidate precision (fp32 and bf16, on a CPU with native bf16) and
    micro-batch count (1, 2, 4, ...): the best micro-batch size can differ by precision, so
    they are chosen together. bf16 is kept only when its best time beats fp32's by
    ``BF16_MARGIN``; then the fastest count in that precision (``fastest``). On a CPU a
    smaller working set can beat one large matrix product. Weights, RNG and task state are
    left as they were; under torchrun rank 0's clock decides for all."""
    cfg, device, d, echo = ctx.cfg, ctx.device, ctx.d, ctx.echo
    n_local = batch_rows(batch)
    if cfg.micro_batch not in ("off", "auto"):
        m.micro.set_floor(min(n_local, -(-n_local // int(cfg.micro_batch))))
    time_counts = cfg.micro_batch == "auto" and not m.micro.tuned
    counts = micro_batch_counts(n_local) if time_counts else [m.micro.count]
    modes = m.precision.candidates if m.precision.undecided else (m.precision.mode,)
    if len(counts) * len(modes) == 1:
        m.micro.tuned = m.micro.tuned or time_counts
        return
    before = m.micro.count
    # what this machine measured for the same model, batch and candidates before (not under
    # torchrun, where rank 0's timing decides for every rank as it happens)
    key = None if d.active else timing_key(m.model, batch, modes, counts, device,
                                            {"task": type(task).__name__, "micro_batch": cfg.micro_batch,
                                             "compile": cfg.compile})
    kept = load_timings(cfg.runs_dir, key) if key is not None else None
    timings = kept if kept is not None else _time_candidates(m, task, batch, step, n_global, ctx, modes, counts)
    if kept is None and key is not None:
        save_timings(cfg.runs_dir, key, timings)
    m.micro.count = before
    when = "timed on this machine before" if kept is not None else "per pass of the first batch"
    if len(modes) > 1:
        per_mode = {mode: min(t for (mo, _), t in timings.items() if mo == mode) for mode in modes}
        chosen = m.precision.decide(per_mode)
        shown = ", ".join(f"{mode} {t:.3g} s" for mode, t in per_mode.items())
        echo(f"{m.name}: --precision auto: {chosen} ({shown} {when}; bf16 must be {BF16_MARGIN:.0%} faster)")
    else:
        m.precision.use(modes[0])
    if time_counts:
        mine = {count: t for (mo, count), t in timings.items() if mo == m.precision.mode}
        best = fastest(mine)
        m.micro.count = max(before, best)
        m.micro.set_floor(best)
        m.micro.tuned = True
        shown = ", ".join(f"{-(-n_local // c)}: {t:.3g} s" for c, t in mine.items())
        echo(f"{m.name}: --micro-batch auto: {-(-n_local // best)} examples at a time is the fastest "
             f"in {m.precision.mode} ({shown}{'; ' + when if kept is not None else ''})")


def _time_candidates(m: Member, task: Task, batch: dict[str, torch.Tensor], step: int, n_global: int,
                     ctx: StepContext, modes: tuple[str, ...], counts: list[int]) -> dict[tuple[str, int], float]:
    """Seconds of a forward and backward pass of ``batch`` per (precision, micro-batch count),
    the best of a few rounds; weights, RNG and task state left as they were."""
    device, d = ctx.device, ctx.d
    timing = StepContext(ctx.cfg, device, ctx.echo, d)  # no faults: a timed pass is not a step of the run
    rng, task_state = rng_point(device), task.state_dict()

    def timed_pass() -> float:
        return time_pass(lambda: forward_backward(m, task, batch, step, n_global, timing), device)

    def attempt(mode: str, count: int) -> float:
        m.precision.use(mode)
        m.micro.count = count
        try:
            return timed_pass()
        except Exception as e:  # noqa: BLE001 (a pair that does not fit is no candidate)
            if not is_out_of_memory(e):
                raise
            return math.inf
        finally:
            m.optimizer.zero_grad(set_to_none=True)

    # each precision's first pass builds its kernels and is not timed; quick passes are noisy,
    # so there are more of them (every rank must agree on how many)
    warm = min(attempt(mode, counts[0]) for mode in modes)
    reps = broadcast(5 if warm < 0.2 else 3 if warm < 1.0 else 2 if len(modes) > 1 else 1, d)
    tries: dict[tuple[str, int], list[float]] = {(mode, count): [] for mode in modes for count in counts}
    for _ in range(reps):  # in rounds, each pair once a round: a slow spell of a shared machine falls on all
        for (mode, count), seen in tries.items():
            if not seen or math.isfinite(seen[-1]):
                seen.append(attempt(mode, count))
        # precision alone, and far apart: more rounds cannot change the choice (1-2 s of a minute)
        if len(counts) == 1 and broadcast(decisive({mode: min(tries[mode, counts[0]]) for mode in modes}), d):
            break
    timings = {pair: min(seen) for pair, seen in tries.items()}  # noise only ever adds time
    free_memory(device)
    timings = broadcast(timings, d)
    rewind_rng(rng, device)
    task.load_state_dict(task_state)
    return timings


def seconds_per_step(task: Task, cfg: TrainConfig, device: torch.device | None = None, n: int = 12,
                     warmup: int = 3) -> float:
    """Mean seconds of one training step of all of ``task``'s members together, through the real
    step (``member_step``) on freshly built models: what fits a step count to a time budget
    (``trainlab tune --budget-minutes``, the benchmarks' ``--minutes``). The task's state and
    the RNG are left as they were."""
    from trainlab.engine.member import make_member

    device = device or torch.device("cpu")
    rng, task_state = rng_point(device), task.state_dict()
    members = [make_member(name, model.to(device), cfg, device) for name, model in task.build_models().items()]
    ctx = StepContext(cfg, device, lambda line: None)
    t0 = time.perf_counter()
    for i in range(n + warmup):
        if i == warmup:
            synchronize(device)
            t0 = time.perf_counter()
        full = task.batch(i)
        batch = {k: v.to(device) for k, v in full.items()}
        for m in members:
            member_step(m, task, batch, i, batch_rows(full), ctx)
    synchronize(device)
    seconds = (time.perf_counter() - t0) / n
    rewind_rng(rng, device)
    task.load_state_dict(task_state)
    return seconds


def fitted_seconds_per_step(task: Task, cfg: TrainConfig, device: torch.device | None = None, n: int = 10,
                            warmup: int = 5, known: str | None = None) -> tuple[float, str, dict[str, float]]:
    """(seconds a step, the precision it is for, the seconds of every precision timed) as the
    run will train: timed after ``warmup``
    steps, in the precision ``--precision auto`` will pick (every candidate timed and the same
    rule applied), else the one set. What fits a step count to minutes: a plain
    ``seconds_per_step`` under ``auto`` would time fp32, or bf16's slow first steps, and a
    trial or benchmark that then trains in bf16 would use only part of its budget.

    ``known``: a candidate the caller already knows ``auto`` picks here, timed alone (``--preset
    auto`` times a larger recipe in bf16 only, once bf16 beat fp32 on a smaller one)."""
    from dataclasses import replace

    from trainlab.engine.device import resolve_device
    from trainlab.engine.precision import pick_precision, precision_candidates

    device = device or resolve_device(cfg.device)
    candidates = precision_candidates(cfg.precision, device)
    if known in candidates:
        candidates = [known]
    if len(candidates) == 1:
        seconds = seconds_per_step(task, replace(cfg, precision=candidates[0]), device, n, warmup)
        return seconds, candidates[0], {candidates[0]: seconds}
    timings = {p: seconds_per_step(task, replace(cfg, precision=p), device, n, warmup) for p in candidates}
    choice = pick_precision(timings)
    return timings[choice], f"auto -> {choice} ({', '.join(f'{p} {t:.3f} s' for p, t in timings.items())})", timings
