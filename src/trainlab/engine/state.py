"""What a run is made of while it trains, and how it goes into and comes out of a checkpoint:
the members (``member.py``), the loop's own bookkeeping and the RNG states.

A checkpoint holds every piece of this, so a resumed run continues as if it had never
stopped (``save`` / ``restore``)."""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainlab.engine.checkpoint import Checkpoint, list_checkpoints, remove_checkpoint, save_checkpoint
from trainlab.engine.device import cuda_rng_states, set_cuda_rng_states
from trainlab.engine.distributed import Dist, gather
from trainlab.engine.errors import CheckpointError
from trainlab.engine.member import Member
from trainlab.engine.task import Task
from trainlab.engine.tracking import Run
from trainlab.engine.train_config import TrainConfig

TRAINED = "trained.pt"  # under --ema, the trained weights beside model.pt's average


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)), "pos": np_state["state"]["pos"],
                  "has_gauss": np_state["has_gauss"], "gauss": np_state["gauss"]},
        "torch": torch.get_rng_state(),
    }
    cuda = cuda_rng_states()
    if cuda is not None:
        state["cuda"] = cuda
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(state["torch"])
    set_cuda_rng_states(state.get("cuda"))



@dataclass
class LoopState:
    """The loop's own bookkeeping that a resume must continue, saved in trainer.pt."""

    step: int = 0
    # per member, sums since the last log step of the finite losses and stats, and their count "n"
    acc: dict[str, dict[str, float]] = field(default_factory=dict)
    acc_steps: int = 0
    eta: dict[str, Any] = field(default_factory=dict)  # Eta.state_dict() at the last save
    best_score: float | None = None
    budget: dict[str, Any] | None = None  # Budget.state_dict() at the last save (a --minutes run)

    def state_dict(self) -> dict[str, Any]:
        acc = {m: {k: as_float(v) for k, v in d.items()} for m, d in self.acc.items()}
        return {"step": self.step, "acc": acc, "acc_steps": self.acc_steps, "eta": self.eta,
                "best_score": self.best_score, "budget": self.budget}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "LoopState":
        acc = {m: dict(d) for m, d in state.get("acc", {}).items()}
        for d in acc.values():  # checkpoints written before "n" existed: every step counted
            d.setdefault("n", int(state.get("acc_steps", 0)))
        eta = state.get("eta") or {"times": state.get("step_times", [])}
        return cls(int(state["step"]), acc, int(state.get("acc_steps", 0)), eta, state.get("best_score"),
                   state.get("budget"))



def save(run: Run, task: Task, members: list[Member], state: LoopState, cfg: TrainConfig, config: dict[str, Any],
         best: dict[str, Any] | None = None, d: Dist = Dist()) -> None:
    """One checkpoint of everything; ``best`` set: the best-so-far copy in checkpoints/best.
    Under torchrun every rank calls it (each one's RNG state is kept); rank 0 writes."""
    rngs = gather(rng_state(), d)
    if not d.main:
        return
    trainer = {"step": state.step, "rng": rngs[0], "task": task.state_dict(), "loop": state.state_dict()}
    if d.active:
        trainer["rng_ranks"] = rngs
    tensors: dict[str, Any] = {"trainer.pt": trainer}
    texts = {"config.json": json.dumps(config, indent=2)}
    texts.update(task.checkpoint_texts())
    for m in members:
        tensors[f"{m.name}/model.pt"] = m.scored.state_dict()  # what inference loads: the average under --ema
        if m.average is not None:  # and the weights the optimizer trains, for a resume
            tensors[f"{m.name}/{TRAINED}"] = m.model.state_dict()
        tensors[f"{m.name}/train_state.pt"] = m.state_dict()
        if m.snapshot is not None:  # --on-spike rollback: a resume must roll back to the same state
            tensors[f"{m.name}/snapshot.pt"] = m.snapshot
        texts.update({f"{m.name}/{k}": v for k, v in task.member_texts(m.name).items()})
    if best is None:
        save_checkpoint(run.checkpoints, state.step, tensors, texts, task=task.name, keep=cfg.keep_checkpoints)
    else:
        # the best of the run as it stands is the one just written, whatever step others carry
        save_checkpoint(run.checkpoints / "best", state.step, tensors, texts, task=task.name, keep=-1,
                        extra_meta={"best": best})


def settle_best(run: Run, state: LoopState, echo) -> None:
    """Before training (on), make ``checkpoints/best`` belong to the run as it now stands: a
    best saved after the step training starts from (an attempt that restarted from step 0, or
    resumed from an older checkpoint after newer ones were moved aside) is from a history that
    no longer exists, and is removed. Where that leaves no best while the loop state remembers
    a best score, the score is forgotten, so the next evaluation saves the best again."""
    root = run.checkpoints / "best"
    dead = []
    for path in list_checkpoints(root):
        try:
            if Checkpoint(path).step > state.step:
                dead.append(path)
        except CheckpointError:  # unreadable: nothing --best could serve
            dead.append(path)
    for path in dead:
        remove_checkpoint(path)
        echo(f"best checkpoint {path.name} removed: it belongs to an attempt that no longer exists (training "
             f"goes on from step {state.step})")
    if dead and state.best_score is not None and not list_checkpoints(root):
        state.best_score = None


def check_compatible(ckpt: Checkpoint, task: Task, member_names: list[str]) -> None:
    """Refuse a checkpoint of another task, vocabulary or set of members, before anything is written."""
    if ckpt.meta.get("task") != task.name:
        raise CheckpointError(f"{ckpt.path} belongs to task {ckpt.meta.get('task')!r}, not {task.name!r}")
    for name, text in task.checkpoint_texts().items():
        if name.endswith(".json") and (name not in ckpt.sums or ckpt.json(name) != json.loads(text)):
            raise CheckpointError(f"{ckpt.path}: its {name} differs from this run's now (another vocabulary, "
                                  f"format or corpus); refusing to continue from it")
    names = {n.split("/")[0] for n in ckpt.sums if n.endswith("/model.pt")}
    if names != set(member_names):
        raise CheckpointError(f"{ckpt.path}: holds members {sorted(names)}, this task trains {sorted(member_names)}")


def restore(ckpt: Checkpoint, task: Task, members: list[Member], device: torch.device, d: Dist = Dist()
            ) -> LoopState:
    """Load every piece of state from ``ckpt``; returns the loop state to continue from.
    Each rank takes back its own RNG state when the number of processes is the one saved;
    otherwise ranks past 0 keep the fresh seeding of their rank (only dropout differs)."""
    check_compatible(ckpt, task, [m.name for m in members])
    for m in members:
        ckpt.load_weights(m.scored, f"{m.name}/model.pt", map_location=device)
        if m.average is not None:
            if f"{m.name}/{TRAINED}" not in ckpt.sums:
                raise CheckpointError(f"{ckpt.path}: {m.name} keeps a moving average of its weights (--ema) but the "
                                      f"checkpoint holds no {TRAINED} to go on training from")
            ckpt.load_weights(m.model, f"{m.name}/{TRAINED}", map_location=device)
        m.load_state_dict(ckpt.tensors(f"{m.name}/train_state.pt", map_location=device))
        if f"{m.name}/snapshot.pt" in ckpt.sums:
            m.snapshot = ckpt.tensors(f"{m.name}/snapshot.pt", map_location=device)
    trainer = ckpt.tensors("trainer.pt")
    task.load_state_dict(trainer["task"])
    ranks = trainer.get("rng_ranks") or [trainer["rng"]]
    if len(ranks) == d.world:
        set_rng_state(ranks[d.rank])
    elif d.main:
        set_rng_state(trainer["rng"])
    return LoopState.from_state_dict(trainer.get("loop", {"step": trainer["step"]}))


def as_float(x: torch.Tensor | float) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def is_better(score: float, best: float | None, mode: str) -> bool:
    if math.isnan(score):
        return False
    return best is None or (score > best if mode == "max" else score < best)


