"""``trainlab multiply compare``: does the latent bottleneck help? Simple against latent over
several seeds, scored on the same held-out test problems, with a paired test and a verdict.

Protocol. Seed k is an ordinary run, ``<id>-seed<k>``, trained with ``--seed`` base+k: both
members in lockstep on the same batches (one recipe for both), or, with ``--recipe-simple``
and ``--recipe-latent``, each member in a run of its own with its own recipe (found, say,
by ``trainlab tune --members ...`` with equal budgets; the report names the files). Every
seed trains to its ``--max-steps``; the comparison resumes where it stopped, seed by seed
(a finished seed is not trained again). ``--score-digits D`` scores only the DxD problems of
the held-out test split; it is not part of what the comparison is, so the same runs can be
scored again that way. ``--budget-minutes M`` instead gives every member M
minutes of its own training: its step count is fitted once from a short timing (as a tune
trial's is; every member's, one after the other, before any seed trains), recorded in
``compare.json`` and reused by every seed and by a resumed comparison, so members with
different recipes (a wider batch, a deeper model) get equal
time rather than equal steps. Then each seed's final models answer the same
``--test-n`` held-out test problems (all of them when the range has fewer), free-running.

What is reported (``trainlab/stats.py`` says why): exact-match with Wilson intervals,
overall and per operand-length class; per seed, the paired difference (latent minus
simple) with McNemar's exact test; over seeds, the mean difference (the effect size, in
points of exact-match) with a bootstrap interval over seeds and problems, and the exact
McNemar test of every seed's paired problems pooled, on which the verdict rests (with the
interval on one side of 0). A test split too small to tell the members apart gets no
verdict. ``--match-params`` widens the smaller
member's feed-forward layer until the parameter counts agree within 2%.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainlab.config import UsageError, build, load_yaml
from trainlab.multiply.config import MODEL_KINDS, MultiplyDataConfig
from trainlab.multiply.report import write_comparison_report
from trainlab.stats import over_seeds, paired, verdict, wilson_interval

MEMBERS = MODEL_KINDS
MATCH_TOLERANCE = 0.02
TEST_SUBSET_SEED = 0  # which --test-n problems of the test split every comparison scores


@dataclass
class Plan:
    id: str
    seeds: list[int]
    base: dict[str, Any]  # settings of both members (same recipe), or what the recipes start from
    recipes: dict[str, dict[str, Any]]  # member -> its own settings (empty: one recipe for both)
    recipe_files: dict[str, str]
    match_params: bool
    test_n: int
    folder: Path
    budget_minutes: float | None = None  # each member's training minutes (its steps fitted once)
    score_digits: int | None = None  # score only DxD test problems (None: the whole trained range)

    @property
    def same_recipe(self) -> bool:
        return not self.recipes

    def runs(self) -> list[tuple[int, str, list[str], dict[str, Any]]]:
        """(seed, run name, members it trains, its settings) for every run of the comparison."""
        out = []
        for seed in self.seeds:
            if self.same_recipe:
                out.append((seed, f"{self.id}-seed{seed}", list(MEMBERS),
                            {**self.base, "seed": seed, "members": ",".join(MEMBERS)}))
            else:
                for m in MEMBERS:
                    out.append((seed, f"{self.id}-{m}-seed{seed}", [m],
                                {**self.base, **self.recipes[m], "seed": seed, "members": m}))
        return out

    def identity(self) -> dict[str, Any]:
        return {"task": "multiply", "seeds": self.seeds, "mode": "same recipe" if self.same_recipe else "own recipes",
                "recipes": self.recipe_files, "match_params": self.match_params,
                "budget_minutes": self.budget_minutes,
                "settings": {k: v for k, v in sorted(self.base.items()) if k not in ("progress", "run_name")},
                "recipe_settings": self.recipes}


def read_recipe(path: str, sections: list[tuple[str, type]]) -> dict[str, Any]:
    from trainlab.config import check_known_keys

    values = load_yaml(path)
    check_known_keys(values, [cls for _, cls in sections], path)
    return values


# -- --match-params ----------------------------------------------------------------------------
def member_parameters(values: dict[str, Any], member: str) -> int:
    """Parameters of ``member`` as ``values`` would build it, the ones inference uses (the
    training-only running-sum head of --carry-loss does not count), counted without allocating."""
    from trainlab.engine.memory import parameter_count
    from trainlab.multiply.config import MultiplyDataConfig, Seq2SeqConfig
    from trainlab.multiply.models import build_model
    from trainlab.multiply.task import member_config

    cfg = member_config(build(Seq2SeqConfig, values), member, build(MultiplyDataConfig, values))
    n = parameter_count(lambda: build_model(cfg), lambda model: model.num_parameters())
    if n is None:
        raise UsageError("--match-params: cannot count the members' parameters")
    return n


def match_parameters(values_of: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], dict[str, int], str]:
    """Widen the smaller member's feed-forward layer (``ff_<member>``) until the counts agree
    within ``MATCH_TOLERANCE``; returns the members' settings, their counts, and what changed.
    The count is linear in the width, so two counts give the width that matches."""
    counts = {m: member_parameters(values_of[m], m) for m in MEMBERS}
    small, large = sorted(MEMBERS, key=lambda m: counts[m])
    if abs(counts[large] - counts[small]) <= MATCH_TOLERANCE * counts[large]:
        return values_of, counts, "already within 2%"
    v = values_of[small]
    width = int(v.get(f"ff_{small}") or v.get("dim_feedforward") or 4 * int(v.get("d_model", 128)))
    per_unit = (member_parameters({**v, f"ff_{small}": width + 64}, small) - counts[small]) / 64
    target = max(1, round(width + (counts[large] - counts[small]) / per_unit))
    matched = {**values_of, small: {**v, f"ff_{small}": target}}
    counts = {**counts, small: member_parameters(matched[small], small)}
    if abs(counts[large] - counts[small]) > MATCH_TOLERANCE * counts[large]:
        raise UsageError(f"--match-params: could not bring {small} within 2% of {large} ({counts[small]:,} against "
                         f"{counts[large]:,})")
    return matched, counts, f"{small}'s feed-forward widened from {width} to {target}"


# -- scoring -----------------------------------------------------------------------------------
@dataclass
class SeedScore:
    seed: int
    train_seconds: dict[str, float]
    parameters: dict[str, int]
    correct: dict[str, np.ndarray]  # member -> bool per test problem
    curves: dict[str, list[tuple[int, float]]]  # member -> (step, val exact-match)
    member_steps: dict[str, int]  # member -> the steps it trained (they differ under --budget-minutes)

    @property
    def steps(self) -> int:
        return max(self.member_steps.values())


def score_seed(plan: Plan, seed: int, runs: list[tuple[str, list[str]]], dataset, idx: np.ndarray) -> SeedScore:
    """Each member's final model from its run, on the test problems ``idx``."""
    import torch

    from trainlab.engine.checkpoint import latest_checkpoint
    from trainlab.engine.tracking import find_run
    from trainlab.multiply.inference import evaluation_dataset, load_members, trained_data_config
    from trainlab.multiply.config import TASK_NAME
    from trainlab.multiply.evaluation import decode_problems

    runs_dir = plan.base.get("runs_dir", "runs")
    correct, secs, params, curves, member_steps = {}, {}, {}, {}, {}
    for name, members in runs:
        run = find_run(runs_dir, TASK_NAME, name)
        ckpt = latest_checkpoint(run.checkpoints, TASK_NAME)
        if ckpt is None:
            raise UsageError(f"run {name} has no checkpoint to score")
        models = load_members(ckpt, torch.device("cpu"))
        # the problems are the same for every run; how they are written (answer order, padding)
        # is each run's own, as own recipes may differ there
        trained = trained_data_config(ckpt)
        if (trained.val_fraction, trained.test_fraction) != (dataset.cfg.val_fraction, dataset.cfg.test_fraction):
            raise UsageError(f"run {name} was trained on other val/test fractions than the comparison scores with")
        mine = evaluation_dataset(trained, dataset.cfg.min_digits, dataset.cfg.max_digits)
        for m in members:
            correct[m] = decode_problems(models[m], mine, idx).correct
            state = ckpt.tensors(f"{m}/train_state.pt")
            secs[m] = float(state["train_seconds"])
            member_steps[m] = int(ckpt.step)
            params[m] = models[m].num_parameters()
            curves[m] = [(int(e["step"]), float(e.get("exact_match", math.nan))) for e in state["evals"]]
    return SeedScore(seed, secs, params, correct, curves, member_steps)


def classes_of(dataset, idx: np.ndarray) -> np.ndarray:
    from trainlab.multiply.data import digit_count

    a, b = dataset.pairs(idx)
    return np.array([f"{x}x{y}" for x, y in zip(digit_count(a), digit_count(b))])


def summarize(plan: Plan, scores: list[SeedScore], dataset, idx: np.ndarray) -> dict[str, Any]:
    """Every figure of the report, as data (also written to results.json)."""
    classes = classes_of(dataset, idx)
    per_seed, pairs = [], []
    for s in scores:
        pr = paired(s.correct["simple"], s.correct["latent"])
        pairs.append(pr)
        row = {"seed": s.seed, "steps": s.steps, "n": pr.n, "paired": asdict(pr), "members": {},
               "curves": {m: [list(point) for point in s.curves.get(m, [])] for m in MEMBERS}}
        for m in MEMBERS:
            k = int(s.correct[m].sum())
            row["members"][m] = {"exact_match": k / pr.n, "ci": wilson_interval(k, pr.n), "correct": k,
                                 "steps": s.member_steps[m], "train_seconds": s.train_seconds[m],
                                 "parameters": s.parameters[m],
                                 "classes": {c: float(s.correct[m][classes == c].mean()) for c in sorted(set(classes))}}
        per_seed.append(row)
    seeds_test = over_seeds(pairs)
    p = seeds_test.p
    basis = (f"exact McNemar test on the paired problems of {len(scores)} seed{'s' if len(scores) > 1 else ''} "
             f"pooled (only simple right {seeds_test.b}, only latent right {seeds_test.c})")
    pooled = {}
    for m in MEMBERS:
        k = sum(r["members"][m]["correct"] for r in per_seed)
        n = sum(r["n"] for r in per_seed)
        pooled[m] = {"exact_match": k / n, "ci": wilson_interval(k, n),
                     "classes": {c: float(np.mean([r["members"][m]["classes"][c] for r in per_seed]))
                                 for c in sorted(set(classes))}}
    cfg = build(MultiplyDataConfig, plan.base)  # the range trained on; dataset's may be --score-digits' DxD
    protocol = {"min_digits": cfg.min_digits, "max_digits": cfg.max_digits, "test_n": plan.test_n,
                "same_recipe": plan.same_recipe, "recipes": plan.recipe_files, "match_params": plan.match_params,
                "batch_size": plan.base.get("batch_size"), "precision": plan.base.get("precision", "auto"),
                "budget_minutes": plan.budget_minutes, "score_digits": plan.score_digits,
                "val_fraction": cfg.val_fraction, "test_fraction": cfg.test_fraction, "test_subset_seed": TEST_SUBSET_SEED,
                "machine_class": fitted_class(plan),
                "members": {m: {"batch_size": plan.recipes.get(m, {}).get("batch_size", plan.base.get("batch_size")),
                                "precision": plan.recipes.get(m, {}).get("precision",
                                                                         plan.base.get("precision", "auto"))}
                            for m in MEMBERS}}
    return {"id": plan.id, "n": int(len(idx)), "seeds": plan.seeds, "protocol": protocol, "per_seed": per_seed,
            "pooled": pooled,
            "effect": {"mean_diff": seeds_test.mean, "sd": seeds_test.sd, "ci": seeds_test.ci, "p": p, "basis": basis,
                       "b": seeds_test.b, "c": seeds_test.c,
                       "interval": "two-stage bootstrap over seeds and problems (4,000 draws)"},
            "verdict": verdict("simple", "latent", p, seeds_test.mean, ci=seeds_test.ci, problems=int(len(idx)))}


# -- the command -------------------------------------------------------------------------------
def check_or_record(plan: Plan) -> None:
    """A new comparison records what it is; an existing one must be the same comparison."""
    path = plan.folder / "compare.json"
    if path.exists():
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise UsageError(f"--id: {path} is damaged; pick another --id") from None
        if not isinstance(saved, dict) or saved.get("task") != "multiply":
            raise UsageError(f"--id: {plan.id!r} belongs to another task ({str(saved.get('task'))[:40]!r})")
        mine = plan.identity()
        if {k: saved.get(k) for k in mine} != json.loads(json.dumps(mine)):
            raise UsageError(f"--id: comparison {plan.id!r} exists with other settings; pick another --id "
                             f"(or run it with its own settings to continue it)")
        return
    plan.folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**plan.identity(), "id": plan.id, "created": time.time()}, indent=2, default=str),
                    encoding="utf-8")


def budget_steps(plan: Plan, members: list[str], values: dict[str, Any], say=print) -> int:
    """The step count that fills ``plan.budget_minutes`` of training for the run of ``members``
    with ``values``: fitted from a short timing the first time (in the precision the run will
    train in) and recorded in ``compare.json``, so every seed and a resumed comparison train the
    same steps; the seeds' paired test needs them equal."""
    from trainlab.engine.tracking import write_json_atomic
    from trainlab.runs import steps_for_minutes

    path = plan.folder / "compare.json"
    saved = json.loads(path.read_text(encoding="utf-8"))
    key = "+".join(members)
    fitted = saved.get("fitted_steps") or {}
    if key not in fitted:
        steps, sps, how = steps_for_minutes("multiply", values, plan.budget_minutes)
        fitted[key] = {"steps": steps, "seconds_per_step": sps, "precision": how, **machine_of(values)}
        write_json_atomic(path, {**saved, "fitted_steps": fitted})
        say(f"comparison {plan.id}: {key} timed at {sps:.3f} s a step ({how}): {steps:,} steps fill "
            f"{plan.budget_minutes:g} minutes")
    return int(fitted[key]["steps"])


def machine_of(values: dict[str, Any]) -> dict[str, str]:
    """The machine a step count was fitted on: its class decides what minutes buy."""
    from trainlab.engine.device import resolve_device
    from trainlab.engine.precision import cpu_summary, machine_class

    device = resolve_device(str(values.get("device", "auto")))
    return {"machine_class": machine_class(device), "machine": cpu_summary() if device.type == "cpu" else device.type}


def fitted_class(plan: Plan) -> str | None:
    """The machine class the comparison's budget was fitted on (None without a budget): as
    compare.json records it, or, for a fit made before it was recorded, this machine's."""
    if plan.budget_minutes is None:
        return None
    saved = json.loads((plan.folder / "compare.json").read_text(encoding="utf-8"))
    classes = sorted({f.get("machine_class") or machine_of(plan.base)["machine_class"]
                      for f in (saved.get("fitted_steps") or {}).values()})
    return " + ".join(classes) or None


def run(plan: Plan, say=print) -> tuple[dict[str, Any], Path] | None:
    """Train (or resume) every seed, then score and report; None when a stop signal ended a run."""
    from trainlab.runs import run_to_end
    from trainlab.multiply.config import MultiplyDataConfig
    from trainlab.multiply.data import MultiplicationDataset
    from trainlab.multiply.inference import evaluation_dataset

    check_or_record(plan)
    runs = plan.runs()
    fitted: dict[str, int] = {}
    if plan.budget_minutes is not None:
        # every member fitted before any seed trains, one right after the other: fitted each
        # before its own first run, the members were timed a whole run apart, and a shared
        # machine's drift over those minutes decided their steps (19% apart at 30 minutes,
        # results/multiply-budgets/README.md)
        for _, _, members, values in runs:
            if "+".join(members) not in fitted:
                fitted["+".join(members)] = budget_steps(plan, members, values, say)
    by_seed: dict[int, list[tuple[str, list[str]]]] = {}
    for seed, name, members, values in runs:
        if plan.budget_minutes is not None:
            steps = fitted["+".join(members)]
            values = {**values, "max_steps": steps, "lr_decay_steps": steps}
        say(f"comparison {plan.id}: seed {seed}, run {name} ({'+'.join(members)})")
        _, summary = run_to_end("multiply", values, name, extra={"comparison": plan.id, "seed": seed}, echo=say)
        if summary is not None and summary.interrupted:
            return None
        by_seed.setdefault(seed, []).append((name, members))
    data = build(MultiplyDataConfig, plan.base)
    if plan.score_digits is None:
        dataset = MultiplicationDataset(data)
    else:  # the DxD problems of the same held-out test split
        dataset = evaluation_dataset(data, plan.score_digits, plan.score_digits)
    idx = dataset.subset("test", plan.test_n, seed=TEST_SUBSET_SEED)
    if len(idx) == 0:
        raise UsageError("this digit range has no test problems to score")
    scores = [score_seed(plan, seed, runs, dataset, idx) for seed, runs in by_seed.items()]
    results = summarize(plan, scores, dataset, idx)
    (plan.folder / "results.json").write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
    return results, write_comparison_report(plan.folder, results)


def plan_members(base: dict[str, Any], recipes: dict[str, dict[str, Any]], match: bool
                 ) -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, int], str]:
    """Apply --match-params to the plan's settings: (base, recipes, counts, what changed)."""
    values_of = {m: {**base, **recipes.get(m, {})} for m in MEMBERS}
    if not match:
        return base, recipes, {m: member_parameters(values_of[m], m) for m in MEMBERS}, ""
    matched, counts, note = match_parameters(values_of)
    if recipes:
        recipes = {m: {**recipes[m], **{k: v for k, v in matched[m].items() if k.startswith("ff_")}} for m in MEMBERS}
    else:
        base = {**base, **{k: v for m in MEMBERS for k, v in matched[m].items() if k == f"ff_{m}"}}
    return base, recipes, counts, note

