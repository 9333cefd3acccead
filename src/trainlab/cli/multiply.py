"""``trainlab multiply train|ask|evaluate|compare|budgets``: the simple-vs-latent comparison."""

from __future__ import annotations

import argparse

from trainlab.cli.common import Parser, common_flags, settings_from, train_command, train_flags, without_budget
from trainlab.config import ConfigError, check_seed
from trainlab.runs import multiply_sections


def add_parser(sub) -> None:
    mul = sub.add_parser("multiply", help="simple vs latent transformer on multiplication")
    msub = mul.add_subparsers(dest="command", required=True, parser_class=Parser)
    train = msub.add_parser("train", help="train both models side by side")
    train_flags(train, "multiply", multiply_sections())

    ask = msub.add_parser("ask", help="ask a trained run a multiplication, e.g. 123*456")
    ask.add_argument("run", help="run id, run folder or checkpoint folder")
    ask.add_argument("problem", help="A*B")
    common_flags(ask)

    cmp = msub.add_parser("compare", help="simple vs latent over seeds: paired tests, a report and a verdict")
    cmp.add_argument("--id", help="comparison id (default: one derived from the settings); the same command "
                                  "again continues the comparison")
    cmp.add_argument("--seeds", type=int, default=3, help="seeds, each an ordinary run (--seed, --seed+1, ...)")
    cmp.add_argument("--match-params", action="store_true",
                     help="widen the smaller member's feed-forward so the parameter counts agree within 2%%")
    cmp.add_argument("--recipe-simple", metavar="FILE", help="settings of the simple member only (a config file, "
                                                            "e.g. a tune study's best.yaml); needs --recipe-latent")
    cmp.add_argument("--recipe-latent", metavar="FILE", help="settings of the latent member only")
    cmp.add_argument("--budget-minutes", type=float, metavar="M",
                     help="train each member M minutes of its own training instead of --max-steps: its step count "
                          "is fitted once from a short timing and kept for every seed (equal time, not equal steps, "
                          "for members with recipes of their own)")
    cmp.add_argument("--score-digits", type=int, metavar="D",
                     help="score only the DxD-digit problems of the held-out test split (default: the whole trained "
                          "range); the same runs can be scored again with another D")
    train_flags(cmp, "multiply", multiply_sections(), resume=False)

    bud = msub.add_parser("budgets", help="one figure and table over comparisons at several --budget-minutes")
    bud.add_argument("comparisons", nargs="+", metavar="RESULTS",
                     help="finished comparisons: their folders or results.json files (one per budget)")
    bud.add_argument("--out", required=True, metavar="FOLDER", help="where budgets.md, budgets.json and budgets.png go")
    bud.add_argument("--reach-minutes", type=float, default=3.0, metavar="M",
                     help="say at what budget latent reaches what simple reached at M minutes (default 3)")

    ev = msub.add_parser("evaluate", help="free-running exact-match with a 95%% confidence interval")
    ev.add_argument("run", help="run id, run folder or checkpoint folder")
    ev.add_argument("--min-digits", type=int, default=None)
    ev.add_argument("--max-digits", type=int, default=None)
    ev.add_argument("--n", type=int, default=10000, help="problems to evaluate (at most the whole split)")
    ev.add_argument("--split", default="test", help="train|val|test")
    common_flags(ev)


def multiply_train(args: argparse.Namespace) -> int:
    return train_command(args, "multiply")


def _load(args: argparse.Namespace):
    from trainlab.engine.device import resolve_device
    from trainlab.engine.tracking import resolve_checkpoint
    from trainlab.multiply.config import TASK_NAME
    from trainlab.multiply.inference import load_members, trained_data_config

    device = resolve_device(args.device)
    ckpt = resolve_checkpoint(args.runs_dir, TASK_NAME, args.run, best=args.best)
    return ckpt, load_members(ckpt, device), trained_data_config(ckpt)


def multiply_ask(args: argparse.Namespace) -> int:
    from trainlab.multiply.inference import answer, evaluation_dataset, parse_problem

    ckpt, models, trained = _load(args)
    a, b = parse_problem(args.problem, trained.max_digits)
    dataset = evaluation_dataset(trained, 1, trained.max_digits)
    truth = a * b
    print(f"{a}*{b} = {truth}  (checkpoint step {ckpt.step})")
    for name, got in answer(models, dataset, a, b).items():
        verdict = "right" if got == truth else "wrong"
        print(f"  {name:>8}: {'(no number)' if got is None else got}  {verdict}")
    if not (trained.min_digits <= len(str(a)) <= trained.max_digits and
            trained.min_digits <= len(str(b)) <= trained.max_digits):
        print(f"  note: outside the trained range of {trained.min_digits}-{trained.max_digits} digits")
    return 0


def multiply_evaluate(args: argparse.Namespace) -> int:
    from trainlab.multiply.config import SPLITS
    from trainlab.multiply.evaluation import evaluate_members
    from trainlab.multiply.inference import evaluation_dataset

    if args.split not in SPLITS:
        raise ConfigError("split", f"must be one of {'|'.join(SPLITS)}, got {args.split!r}")
    if args.n <= 0:
        raise ConfigError("n", f"must be positive, got {args.n}")
    check_seed("seed", args.seed)
    ckpt, models, trained = _load(args)
    dataset = evaluation_dataset(trained, args.min_digits, args.max_digits)
    results = evaluate_members(models, dataset, args.split, args.n, args.seed)
    cfg = dataset.cfg
    print(f"checkpoint step {ckpt.step}; {args.split} split, digits {cfg.min_digits}-{cfg.max_digits}, "
          f"free-running greedy decoding")
    for name, r in results.items():
        print(f"  {name:>8}: exact-match {r['exact_match']:.2%} (95% CI {r['ci_low']:.2%}-{r['ci_high']:.2%}, "
              f"{r['correct']}/{r['n']}), digit accuracy {r['digit_accuracy']:.2%}")
    return 0


def multiply_compare(args: argparse.Namespace) -> int:
    import hashlib
    import json
    import math
    from pathlib import Path

    from trainlab.engine.tracking import RUN_NAME, check_runs_dir
    from trainlab.multiply.compare import MEMBERS, Plan, plan_members, read_recipe, run
    from trainlab.runs import checked_task, known_settings

    sections = multiply_sections()
    values = known_settings("multiply", without_budget(args, settings_from(args, "multiply"),
                                                       "a comparison takes --budget-minutes (each member's training)"))
    if args.seeds < 1:
        raise ConfigError("seeds", f"must be at least 1, got {args.seeds}")
    members = [m.strip() for m in str(values.get("members", "simple,latent")).split(",") if m.strip()]
    if sorted(members) != sorted(MEMBERS):
        unknown = [m for m in members if m not in MEMBERS]
        if unknown:
            raise ConfigError("members", f"unknown member {unknown[0]!r} (have: {', '.join(MEMBERS)})")
        raise ConfigError("match_params" if args.match_params else "members",
                          "a comparison needs both members, simple and latent" +
                          (": there is nothing to match one member's parameters against" if args.match_params else ""))
    if bool(args.recipe_simple) != bool(args.recipe_latent):
        raise ConfigError("recipe_simple", "give both --recipe-simple and --recipe-latent, or neither")
    recipes, files = {}, {}
    if args.recipe_simple:
        files = {"simple": str(Path(args.recipe_simple).resolve()), "latent": str(Path(args.recipe_latent).resolve())}
        recipes = {m: {k: v for k, v in read_recipe(f, sections).items()
                       if k not in ("members", "seed", "run_name", "runs_dir", "tag")} for m, f in files.items()}
    budget = args.budget_minutes
    if budget is not None and not (math.isfinite(budget) and budget > 0):
        raise ConfigError("budget_minutes", f"must be a positive number of minutes, got {budget}")
    if budget is None and values.get("max_steps") is None:
        raise ConfigError("max_steps", "a comparison trains every seed to a fixed step count: set --max-steps "
                                       "(or a preset that does), or --budget-minutes")
    score = args.score_digits
    if score is not None:
        lo = max(int({**values, **r}.get("min_digits", 1)) for r in [{}, *recipes.values()])
        hi = min(int({**values, **r}.get("max_digits", 3)) for r in [{}, *recipes.values()])
        if not lo <= score <= hi:
            raise ConfigError("score_digits", f"must be within the trained digit range {lo}-{hi}, got {score}")
    base, recipes, counts, note = plan_members(values, recipes, args.match_params)
    seed0 = int(values.get("seed", 0))
    seeds = list(range(seed0, seed0 + args.seeds))
    fixed = {"max_steps": 1} if budget is not None else {}
    for m in MEMBERS:  # every run's settings pass the flags' own checks before anything is written
        checked_task("multiply", {**base, **recipes.get(m, {}), **fixed,
                                  "members": ",".join(MEMBERS) if not recipes else m})
    digest = hashlib.sha256(json.dumps([base, recipes, seeds, args.match_params] + ([budget] if budget else []),
                                       sort_keys=True, default=str).encode()).hexdigest()[:8]
    cid = args.id or f"cmp-{values.get('min_digits', 1)}-{values.get('max_digits', 3)}d-{digest}"
    if not RUN_NAME.fullmatch(cid) or len(cid) > 48:
        raise ConfigError("id", f"{cid!r} must be 1-48 letters, digits, '.', '_' or '-', not starting with a symbol")
    runs_dir = Path(base.get("runs_dir", "runs"))
    check_runs_dir(runs_dir)
    plan = Plan(cid, seeds, base, recipes, files, args.match_params, int(values.get("test_n", 10000)),
                runs_dir / "compare" / cid, budget, score)
    print(f"comparison {cid}: {len(seeds)} seed(s), {'one recipe for both' if not recipes else 'own recipes'}"
          + (f", {budget:g} minutes of each member's training" if budget is not None else "") + "; "
          f"parameters simple {counts['simple']:,}, latent {counts['latent']:,}" + (f" ({note})" if note else ""))
    out = run(plan)
    if out is None:
        print(f"stopped; run the same command (--id {cid}) to continue the comparison")
        return 130
    results, report = out
    for m in MEMBERS:
        p = results["pooled"][m]
        print(f"  {m:>7}: test exact-match {p['exact_match']:.2%} (95% CI {p['ci'][0]:.2%}-{p['ci'][1]:.2%}) over "
              f"{len(seeds)} seed(s) x {results['n']:,} problems")
    e = results["effect"]
    print(f"  latent - simple: {100 * e['mean_diff']:+.2f} points (95% CI {100 * e['ci'][0]:+.2f} to "
          f"{100 * e['ci'][1]:+.2f}); {e['basis']}")
    print(f"report: {report}")
    print(f"verdict: {results['verdict']}")
    return 0


def multiply_budgets(args: argparse.Namespace) -> int:
    import math
    from pathlib import Path

    from trainlab.multiply.budgets import load_comparison, reach_sentence, summarize_budgets, table, write_budgets

    if not (math.isfinite(args.reach_minutes) and args.reach_minutes > 0):
        raise ConfigError("reach_minutes", f"must be a positive number of minutes, got {args.reach_minutes}")
    summary = summarize_budgets([load_comparison(p) for p in args.comparisons], args.reach_minutes)
    written = write_budgets(Path(args.out), summary)
    print(table(summary))
    print(reach_sentence(summary))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


COMMANDS = {("multiply", "train"): multiply_train, ("multiply", "ask"): multiply_ask,
            ("multiply", "evaluate"): multiply_evaluate, ("multiply", "compare"): multiply_compare,
            ("multiply", "budgets"): multiply_budgets}
