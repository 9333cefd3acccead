"""`trainlab multiply compare` and the statistics under it: hand-made cases with known answers,
the verdict at its edges, matched parameter counts, and a comparison that resumes to the
same numbers as an unbroken one."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from trainlab.cli import main
from trainlab.engine import faults
from trainlab.stats import agresti_min, mcnemar_exact, min_problems, over_seeds, paired, verdict, wilson_interval

TINY = ["--min-digits", "1", "--max-digits", "1", "--d-model", "32", "--num-layers", "1", "--num-latent", "2",
        "--batch-size", "16", "--max-steps", "6", "--eval-every", "3", "--eval-samples", "20", "--save-every", "3",
        "--no-progress", "--tag", "test", "--device", "cpu", "--precision", "fp32", "--dropout", "0"]


def test_wilson_is_scipys_interval():
    from scipy.stats import binomtest

    for k, n in [(0, 1), (1, 1), (0, 10), (3, 40), (50, 100), (9993, 10000), (10000, 10000), (1, 7), (123, 4567)]:
        for conf in (0.9, 0.95, 0.99):
            ci = binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
            assert wilson_interval(k, n, conf) == pytest.approx((ci.low, ci.high), abs=1e-12), (k, n, conf)


def test_wilson_and_mcnemar_on_known_cases():
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-4) and hi == pytest.approx(0.5962, abs=1e-4)  # textbook value
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(3, 40) == pytest.approx((0.02582, 0.19861), abs=1e-4)  # Newcombe (1998), case 2
    # exact McNemar: all 10 discordant pairs one way: 2 * 0.5**10
    assert mcnemar_exact(0, 10) == pytest.approx(2 * 0.5**10)
    assert mcnemar_exact(5, 5) == 1.0 and mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(3, 12) == pytest.approx(0.03515625)  # 2 * P(X <= 3), X ~ Bin(15, 1/2)


def test_paired_difference_counts_only_the_disagreements():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], bool)
    b = np.array([1, 0, 1, 1, 1, 1, 0, 1], bool)
    p = paired(a, b)
    assert (p.n, p.b, p.c) == (8, 1, 2) and p.diff == pytest.approx(1 / 8)
    assert p.first == pytest.approx(5 / 8) and p.second == pytest.approx(6 / 8)
    assert p.p == mcnemar_exact(1, 2)
    # Agresti-Min: 1/2 added to each cell, so b 1.5, c 2.5 of 10: 0.1 +- 1.96 * sqrt(3.9) / 10
    half = 1.96 * math.sqrt(3.9) / 10
    assert p.ci == pytest.approx((0.1 - half, 0.1 + half))
    with pytest.raises(ValueError):
        paired(a, b[:3])


def test_the_paired_interval_stays_open_where_the_wald_one_collapses():
    lo, hi = agresti_min(0, 0, 10)  # no disagreement among 10: Wald's interval is the point 0
    assert lo < 0 < hi and hi == pytest.approx(1.96 * math.sqrt(1) / 12)
    lo, hi = agresti_min(0, 10, 10)  # every one went the second's way
    assert lo > 0 and hi == 1.0


def seeds_of(*counts, n=1000):
    """Paired results from (b, c) per seed, n problems each."""
    out = []
    for b, c in counts:
        first = np.zeros(n, bool)
        second = np.zeros(n, bool)
        first[:b] = True
        second[b:b + c] = True
        out.append(paired(first, second))
    return out


def test_two_seeds_that_miss_the_same_problem_are_no_evidence():
    """Issue 27: equal, non-zero differences on every seed made the t-test report p = 0."""
    s = over_seeds(seeds_of((1, 0), (1, 0)))
    assert s.diffs == [-0.001, -0.001] and s.sd == 0.0
    assert (s.b, s.c) == (2, 0) and s.p == pytest.approx(0.5)  # two discordant pairs: a coin
    assert "not distinguishable" in verdict("simple", "latent", s.p, s.mean, ci=s.ci, problems=1000)


def test_seeds_that_agree_give_a_verdict_and_seeds_that_disagree_do_not():
    agree = over_seeds(seeds_of((10, 40), (12, 38), (9, 45)))
    assert agree.p < 1e-6 and 0 < agree.ci[0] < agree.mean < agree.ci[1]
    assert verdict("simple", "latent", agree.p, agree.mean, ci=agree.ci).startswith("latent is better")
    split = over_seeds(seeds_of((0, 100), (60, 0)))
    assert split.p < 0.01 and split.ci[0] < 0 < split.ci[1]  # pooled, 100 against 60
    said = verdict("simple", "latent", split.p, split.mean, ci=split.ci)
    assert "not distinguishable" in said and "seeds disagree" in said
    assert over_seeds(seeds_of((10, 40), (12, 38))).ci == over_seeds(seeds_of((10, 40), (12, 38))).ci  # seeded
    one = over_seeds(seeds_of((3, 12), n=100))
    assert math.isnan(one.sd) and one.p == mcnemar_exact(3, 12) and one.ci[0] < 0.09 < one.ci[1]
    with pytest.raises(ValueError):
        over_seeds([])


def test_a_split_too_small_for_any_verdict_says_so():
    assert min_problems(0.05) == 6 and min_problems(0.01) == 8  # 2 / 2**6 < 0.05 <= 2 / 2**5
    assert mcnemar_exact(0, 5) >= 0.05 > mcnemar_exact(0, 6)
    said = verdict("simple", "latent", 0.001, 0.5, problems=1)
    assert said.startswith("no verdict: 1 test problem cannot tell latent and simple apart")
    assert verdict("simple", "latent", 0.001, 0.5, problems=6).startswith("latent is better")


def test_the_verdict_at_its_edges():
    assert verdict("simple", "latent", 0.049, 0.1).startswith("latent is better than simple at p < 0.05")
    assert verdict("simple", "latent", 0.049, -0.1).startswith("latent is worse than simple")
    assert "not distinguishable" in verdict("simple", "latent", 0.05, 0.1)  # p must be below 0.05
    assert "not distinguishable" in verdict("simple", "latent", math.nan, 0.1)
    assert "not distinguishable" in verdict("simple", "latent", 0.0, 0.0)


def test_match_params_brings_the_counts_within_two_percent():
    from trainlab.multiply.compare import match_parameters, member_parameters

    values = {"d_model": 64, "nhead": 4, "num_layers": 2, "num_latent": 8, "latent_layers": 2, "min_digits": 1,
              "max_digits": 2}
    before = {m: member_parameters(values, m) for m in ("simple", "latent")}
    assert abs(before["simple"] - before["latent"]) > 0.02 * max(before.values())
    matched, counts, note = match_parameters({"simple": values, "latent": values})
    assert abs(counts["simple"] - counts["latent"]) <= 0.02 * max(counts.values())
    assert "simple's feed-forward widened" in note and matched["simple"]["ff_simple"] > 4 * 64
    assert member_parameters(matched["simple"], "simple") == counts["simple"]


def compare(runs_dir, *flags) -> int:
    return main(["multiply", "compare", "--runs-dir", str(runs_dir), *TINY, *flags])


def final_weights(runs_dir, run: str) -> dict[str, dict[str, "torch.Tensor"]]:
    from trainlab.engine.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(runs_dir / "parallel_comparison" / run / "checkpoints")
    return {m: ckpt.tensors(f"{m}/model.pt") for m in ("simple", "latent")}


def test_a_comparison_interrupted_and_resumed_reports_what_an_unbroken_one_does(runs_dir, monkeypatch, capsys):
    """On 2-digit problems with 100 test problems, so that the counts and the verdict carry
    information (a 1-digit range has a single test problem)."""
    from trainlab.stats import verdict as verdict_of

    two = ["--min-digits", "2", "--max-digits", "2", "--test-n", "100"]
    assert compare(runs_dir, *two, "--seeds", "2", "--id", "whole", "--match-params") == 0
    out = capsys.readouterr().out
    folder = runs_dir / "compare" / "whole"
    whole = json.loads((folder / "results.json").read_text())
    assert whole["n"] == 100 and len(whole["per_seed"]) == 2
    e = whole["effect"]
    # the verdict printed is the one the saved p, mean difference and interval give, and reads as they say
    said = verdict_of("simple", "latent", e["p"], e["mean_diff"], ci=tuple(e["ci"]), problems=whole["n"])
    assert f"verdict: {said}" in out and whole["verdict"] == said
    assert (e["b"], e["c"]) == (sum(r["paired"]["b"] for r in whole["per_seed"]),
                                sum(r["paired"]["c"] for r in whole["per_seed"]))
    assert e["p"] == pytest.approx(mcnemar_exact(e["b"], e["c"]))
    word = ("not distinguishable" if not e["p"] < 0.05 or e["mean_diff"] == 0 or e["ci"][0] <= 0 <= e["ci"][1]
            else "better" if e["mean_diff"] > 0 else "worse")
    assert word in whole["verdict"]
    assert e["mean_diff"] == pytest.approx(np.mean([r["paired"]["diff"] for r in whole["per_seed"]]))
    for r in whole["per_seed"]:
        s, la = r["members"]["simple"]["correct"], r["members"]["latent"]["correct"]
        assert r["paired"]["c"] - r["paired"]["b"] == la - s and 0 <= s <= 100 and 0 <= la <= 100
    report = (folder / "report.md").read_text()
    for needle in ("Verdict:", "Protocol", "McNemar", "Per seed", "class 2x2", "matched with --match-params",
                   "accuracy_vs_steps.png", "accuracy_vs_time.png", "report:"):
        assert needle in report or needle in out, needle
    assert (folder / "accuracy_vs_time.png").stat().st_size > 1000
    index = json.loads((runs_dir / "index.json").read_text())["runs"]
    assert {"parallel_comparison/whole-seed0", "parallel_comparison/whole-seed1"} <= set(index)

    monkeypatch.setenv(faults.ENV, "interrupt=4")  # the first seed's run stops at step 4
    assert compare(runs_dir, *two, "--seeds", "2", "--id", "broken", "--match-params") == 130
    monkeypatch.delenv(faults.ENV)
    assert not (runs_dir / "compare" / "broken" / "results.json").exists()
    assert compare(runs_dir, *two, "--seeds", "2", "--id", "broken", "--match-params") == 0
    broken = json.loads((runs_dir / "compare" / "broken" / "results.json").read_text())
    assert len(whole["per_seed"]) == len(broken["per_seed"]) == 2
    for a, b in zip(whole["per_seed"], broken["per_seed"]):
        assert a["paired"] == b["paired"]
        for m in ("simple", "latent"):
            assert a["members"][m]["correct"] == b["members"][m]["correct"]
    assert whole["effect"]["mean_diff"] == broken["effect"]["mean_diff"] and whole["verdict"] == broken["verdict"]
    for seed in (0, 1):  # the resumed seed trained to the very same weights
        w, b = final_weights(runs_dir, f"whole-seed{seed}"), final_weights(runs_dir, f"broken-seed{seed}")
        for m in w:
            assert w[m].keys() == b[m].keys()
            for k in w[m]:
                assert torch.equal(w[m][k], b[m][k]), (seed, m, k)
    # run again once finished: nothing is trained, the same numbers come out
    capsys.readouterr()
    assert compare(runs_dir, *two, "--seeds", "2", "--id", "broken", "--match-params") == 0
    assert f"verdict: {broken['verdict']}" in capsys.readouterr().out


@pytest.mark.parametrize("flags, says", [
    (["--seeds", "0"], "--seeds"),
    (["--members", "simple,wizard"], "unknown member"),
    (["--members", "simple", "--match-params"], "--match-params"),
    (["--recipe-simple", "x.yaml"], "--recipe-latent"),
])
def test_bad_comparisons_are_one_line_and_write_nothing(runs_dir, capsys, flags, says):
    assert compare(runs_dir, *flags) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0], err
    assert not (runs_dir / "compare").exists()


def test_a_comparison_id_of_another_task_or_settings_is_refused(runs_dir, capsys):
    folder = runs_dir / "compare" / "taken"
    folder.mkdir(parents=True)
    (folder / "compare.json").write_text(json.dumps({"task": "chat"}))
    assert compare(runs_dir, "--id", "taken") == 2
    assert "belongs to another task" in capsys.readouterr().err


def test_the_single_run_report_prints_losses_as_numbers_and_scores_the_test_set(runs_dir):
    assert main(["multiply", "train", "--runs-dir", str(runs_dir), *TINY, "--run-name", "one"]) == 0
    run = runs_dir / "parallel_comparison" / "one"
    report = (run / "report.md").read_text()
    shown = re.search(r"val_loss ([^,\n]+)", report).group(1)
    assert not shown.endswith("%") and float(shown) > 0  # a loss, printed as a number
    assert re.search(r"exact_match \d+\.\d\d%", report)  # rates stay percentages
    assert "test exact-match (95% CI)" in report and "test problems" in report
    info = json.loads((run / "run.json").read_text())["config"]["model"]
    saved = json.loads(next((run / "checkpoints").glob("step_*/simple/model_config.json")).read_text())
    assert info["src_len"] == info["tgt_len"] == saved["src_len"] == saved["tgt_len"] == 3


def test_the_demo_preset_compares_in_a_tiny_form(runs_dir, capsys):
    assert main(["multiply", "compare", "--preset", "demo", "--runs-dir", str(runs_dir), "--max-steps", "4",
                 "--eval-every", "2", "--seeds", "1", "--no-progress", "--tag", "test", "--device", "cpu",
                 "--id", "demo"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("verdict: ")
    assert "simple: test exact-match" in out and "latent: test exact-match" in out


def test_a_one_digit_comparison_has_too_few_test_problems_for_a_verdict(runs_dir, capsys):
    """1-digit operands split into 79 train, 1 val and 1 test problem: no verdict from one problem."""
    assert compare(runs_dir, "--seeds", "2", "--id", "onedigit") == 0
    results = json.loads((runs_dir / "compare" / "onedigit" / "results.json").read_text())
    assert results["n"] == 1 and results["verdict"].startswith("no verdict: 1 test problem")
    assert f"verdict: {results['verdict']}" in capsys.readouterr().out
    assert "**Verdict: no verdict" in (runs_dir / "compare" / "onedigit" / "report.md").read_text()


def test_match_params_leaves_out_the_training_only_running_sum_head():
    import torch

    from trainlab.config import build
    from trainlab.multiply.compare import member_parameters
    from trainlab.multiply.config import MultiplyDataConfig, Seq2SeqConfig
    from trainlab.multiply.models import build_model
    from trainlab.multiply.task import member_config

    values = {"d_model": 32, "nhead": 2, "num_layers": 1, "num_latent": 4, "latent_layers": 1, "min_digits": 1,
              "max_digits": 2, "answer_order": "reversed"}
    for m in ("simple", "latent"):
        plain = member_parameters(values, m)
        assert member_parameters({**values, "carry_loss": 1.0}, m) == plain
        torch.manual_seed(0)
        model = build_model(member_config(build(Seq2SeqConfig, {**values, "carry_loss": 1.0}), m,
                                          build(MultiplyDataConfig, values)))
        head = sum(p.numel() for p in model.sum_head.parameters())
        assert head > 0 and sum(p.numel() for p in model.parameters()) == plain + head


def test_budget_minutes_gives_each_member_its_own_fitted_steps_once(runs_dir, tmp_path, monkeypatch, capsys):
    """Own recipes at equal time: each member's steps come from its own timing (faked here so
    the counts are known), are recorded once, and a resumed or repeated comparison reuses them."""
    import trainlab.engine.step as step

    timed = []

    def fake_timing(task, cfg, device=None, n=10, warmup=5):
        timed.append(cfg.batch_size)
        return cfg.batch_size / 400, "fp32", {"fp32": cfg.batch_size / 400}  # batch 16: 0.04 s a step, batch 32: 0.08 s

    monkeypatch.setattr(step, "fitted_seconds_per_step", fake_timing)
    simple, latent = tmp_path / "simple.yaml", tmp_path / "latent.yaml"
    simple.write_text("batch_size: 16\nmax_steps: 999\n")
    latent.write_text("batch_size: 32\nmax_steps: 999\n")
    flags = ["--min-digits", "2", "--max-digits", "2", "--test-n", "50", "--seeds", "2", "--id", "timed",
             "--recipe-simple", str(simple), "--recipe-latent", str(latent), "--budget-minutes", "0.01"]
    monkeypatch.setenv(faults.ENV, "interrupt=4")  # the first run stops early: the fit must survive that
    assert compare(runs_dir, *flags) == 130
    monkeypatch.delenv(faults.ENV)
    assert timed == [16, 32]  # both members timed before the first run trains, one after the other
    assert compare(runs_dir, *flags) == 0
    assert timed == [16, 32]  # each member timed once, not once a seed or once a resume
    folder = runs_dir / "compare" / "timed"
    fitted = json.loads((folder / "compare.json").read_text())["fitted_steps"]
    assert {k: v["steps"] for k, v in fitted.items()} == {"simple": 15, "latent": 7}  # 0.6 s / 0.04, / 0.08
    from trainlab.engine.precision import machine_class

    here = machine_class(torch.device("cpu"))
    assert {v["machine_class"] for v in fitted.values()} == {here}  # minutes buy steps by the machine
    results = json.loads((folder / "results.json").read_text())
    for r in results["per_seed"]:
        assert (r["members"]["simple"]["steps"], r["members"]["latent"]["steps"]) == (15, 7)
    assert results["protocol"]["budget_minutes"] == 0.01 and results["protocol"]["machine_class"] == here
    assert results["protocol"]["members"]["latent"]["batch_size"] == 32
    report = (folder / "report.md").read_text()
    assert "0.01 minutes of each member's own training" in report and "simple 15 steps of batch 16" in report
    capsys.readouterr()
    assert compare(runs_dir, *flags) == 0 and timed == [16, 32]  # done: nothing timed or trained again
    assert f"verdict: {results['verdict']}" in capsys.readouterr().out


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_budget_that_is_not_a_positive_number_is_refused(runs_dir, capsys, value):
    assert compare(runs_dir, "--budget-minutes", value) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--budget-minutes" in err[0], err
    assert not (runs_dir / "compare").exists()


def test_a_p_value_below_the_smallest_double_prints_as_a_bound_not_as_zero():
    from trainlab.stats import format_p

    p = mcnemar_exact(6413, 874)  # the 3-digit comparison's pooled disagreements
    assert p == 0.0  # it underflows
    said = verdict("simple", "latent", p, -0.18, ci=(-0.22, -0.13), problems=10000)
    assert "p < 1e-300" in said and "p = 0" not in said and "worse" in said
    assert format_p(0.0123) == "0.012" and format_p(2e-7) == "2.0e-07" and format_p(math.nan) == "n/a"


def test_score_digits_rescores_the_same_runs_on_one_class_each_in_its_own_answer_order(runs_dir, tmp_path,
                                                                                       monkeypatch, capsys):
    import sys

    import trainlab.multiply.evaluation as evaluation

    seen = []
    decode = evaluation.decode_problems

    def watching(model, dataset, idx, *a, **k):
        if sys._getframe(1).f_code.co_name == "score_seed":  # the comparison's scoring, not a run's own
            seen.append((dataset.cfg.answer_order, dataset.cfg.min_digits, dataset.cfg.max_digits, len(idx)))
        return decode(model, dataset, idx, *a, **k)

    monkeypatch.setattr(evaluation, "decode_problems", watching)
    simple, latent = tmp_path / "simple.yaml", tmp_path / "latent.yaml"
    simple.write_text("answer_order: reversed\n")
    latent.write_text("answer_order: natural\n")
    flags = ["--min-digits", "1", "--max-digits", "2", "--test-n", "40", "--seeds", "1", "--id", "rescored",
             "--recipe-simple", str(simple), "--recipe-latent", str(latent)]
    assert compare(runs_dir, *flags) == 0
    folder = runs_dir / "compare" / "rescored"
    whole = json.loads((folder / "results.json").read_text())
    assert seen == [("reversed", 1, 2, 40), ("natural", 1, 2, 40)]  # each run read in its own format
    assert {"1x2", "2x2"} <= set(whole["pooled"]["simple"]["classes"])
    runs = sorted(p.name for p in (runs_dir / "parallel_comparison").iterdir())
    stamps = {r: (runs_dir / "parallel_comparison" / r / "run.json").stat().st_mtime_ns for r in runs}
    seen.clear()
    capsys.readouterr()
    assert compare(runs_dir, *flags, "--score-digits", "2") == 0  # the same comparison, scored on 2x2 only
    two = json.loads((folder / "results.json").read_text())
    assert set(two["pooled"]["simple"]["classes"]) == {"2x2"} and two["protocol"]["score_digits"] == 2
    assert two["protocol"]["min_digits"] == 1 and two["protocol"]["max_digits"] == 2
    assert [s[:3] for s in seen] == [("reversed", 2, 2), ("natural", 2, 2)] and seen[0][3] == two["n"] <= 40
    assert sorted(p.name for p in (runs_dir / "parallel_comparison").iterdir()) == runs  # nothing trained again
    assert {r: (runs_dir / "parallel_comparison" / r / "run.json").stat().st_mtime_ns for r in runs} == stamps
    assert "2x2-digit test problems" in (folder / "report.md").read_text()
    assert compare(runs_dir, *flags, "--score-digits", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--score-digits" in err[0] and "1-2" in err[0], err


def test_budgets_makes_one_figure_and_table_from_comparisons_at_several_minutes(runs_dir, tmp_path, monkeypatch,
                                                                                capsys):
    """Two comparisons that differ only in --budget-minutes line up in one table and figure, made
    from their results.json alone; anything else that differs is refused in one line."""
    import shutil

    import trainlab.engine.step as step

    monkeypatch.setattr(step, "fitted_seconds_per_step",
                        lambda task, cfg, device=None, n=10, warmup=5: (0.04, "fp32", {"fp32": 0.04}))
    simple, latent = tmp_path / "simple.yaml", tmp_path / "latent.yaml"
    simple.write_text("batch_size: 16\n")
    latent.write_text("batch_size: 16\nnum_latent: 2\n")
    common = ["--min-digits", "2", "--max-digits", "2", "--test-n", "50", "--seeds", "2",
              "--recipe-simple", str(simple), "--recipe-latent", str(latent)]
    for minutes, cid in (("0.02", "b2"), ("0.01", "b1")):
        assert compare(runs_dir, *common, "--budget-minutes", minutes, "--id", cid) == 0
    folders = [runs_dir / "compare" / c for c in ("b2", "b1")]
    results = {c: json.loads((runs_dir / "compare" / c / "results.json").read_text()) for c in ("b1", "b2")}
    out = tmp_path / "budgets"
    capsys.readouterr()
    assert main(["multiply", "budgets", *map(str, folders), "--out", str(out), "--reach-minutes", "0.01"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "budgets.json").read_text())
    assert [r["minutes"] for r in summary["rows"]] == [0.01, 0.02] and [r["id"] for r in summary["rows"]] == ["b1", "b2"]
    for r in summary["rows"]:
        saved = results[r["id"]]
        for m in ("simple", "latent"):
            assert r["members"][m]["exact_match"] == saved["pooled"][m]["exact_match"]
            assert r["members"][m]["per_seed"] == [s["members"][m]["exact_match"] for s in saved["per_seed"]]
        assert r["members"]["simple"]["steps"] == [15 if r["minutes"] == 0.01 else 30]  # 0.6 s / 0.04 s, 1.2 s / 0.04
        assert r["effect"]["mean_diff"] == saved["effect"]["mean_diff"]
    assert summary["reach"]["target"] == results["b1"]["pooled"]["simple"]["exact_match"]
    table = (out / "budgets.md").read_text()
    assert table.count("\n| 0.0") == 2 and "What simple reached at 0.01 minutes" in table and "What simple" in printed
    assert (out / "budgets.png").stat().st_size > 5000

    def refused(*paths, says: str) -> None:
        capsys.readouterr()
        assert main(["multiply", "budgets", *map(str, paths), "--out", str(tmp_path / "refused")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
        assert not (tmp_path / "refused").exists()

    other = tmp_path / "other"
    shutil.copytree(folders[1], other)
    changed = json.loads((other / "results.json").read_text())
    changed["protocol"]["machine_class"] = "AMX" if changed["protocol"]["machine_class"] != "AMX" else "AVX2"
    (other / "results.json").write_text(json.dumps(changed))
    refused(folders[0], other, says="differ in machine_class")
    changed["protocol"]["machine_class"] = results["b1"]["protocol"]["machine_class"]
    changed["protocol"]["test_n"] = 40
    (other / "results.json").write_text(json.dumps(changed))
    refused(folders[0], other, says="differ in test_n")
    refused(folders[0], folders[1], folders[1], says="two comparisons at 0.01 minutes")
    refused(folders[0], says="two budgets at least")
    capsys.readouterr()
    assert main(["multiply", "budgets", *map(str, folders), "--out", str(tmp_path / "refused"),
                 "--reach-minutes", "nan"]) == 2
    assert "--reach-minutes" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    refused(folders[0], tmp_path / "nowhere", says="no results.json")
    (other / "results.json").write_text("{not json")
    refused(folders[0], other, says="not valid JSON")
    changed["protocol"]["budget_minutes"] = None
    (other / "results.json").write_text(json.dumps(changed))
    refused(folders[0], other, says="trained fixed steps")


def test_where_the_latent_curve_reaches_a_target():
    from trainlab.multiply.budgets import crossing

    assert crossing([1, 3, 10, 30], [0.1, 0.5, 0.7, 0.9], 0.05) == 1  # already at the smallest budget
    assert crossing([1, 3, 10, 30], [0.1, 0.5, 0.7, 0.9], 0.7) == pytest.approx(10)
    assert crossing([1, 3, 10, 30], [0.1, 0.5, 0.7, 0.9], 0.8) == pytest.approx(math.sqrt(300))  # half-way on log
    assert crossing([1, 3, 10, 30], [0.1, 0.5, 0.7, 0.9], 0.95) is None
