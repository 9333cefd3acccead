"""``trainlab runs list|clean|rm``: the runs index and its cleanup."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from trainlab.cli.common import Parser
from trainlab.config import UsageError


def add_parser(sub) -> None:
    runs = sub.add_parser("runs", help="list and clean up runs")
    rsub = runs.add_subparsers(dest="command", required=True, parser_class=Parser)
    ls = rsub.add_parser("list", help="every run in the runs index")
    ls.add_argument("--task", dest="only_task", help="only this task")
    ls.add_argument("--tag", help="only runs with this tag")
    clean = rsub.add_parser("clean", help="remove runs tagged 'test' (never untagged runs)")
    clean.add_argument("--tests", action="store_true", help="required: remove runs tagged 'test'")
    clean.add_argument("--older-than", metavar="AGE", help="only runs untouched for AGE (e.g. 90m, 12h, 7d, 2w)")
    clean.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    rm = rsub.add_parser("rm", help="remove runs by id: events, checkpoints and index rows")
    rm.add_argument("ids", nargs="+", metavar="ID", help="run id, task/id, or run folder inside the runs folder")
    rm.add_argument("--dry-run", action="store_true", help="print what would be removed; remove nothing")
    for p in (ls, clean, rm):
        p.add_argument("--runs-dir", default="runs", help="root folder of all runs")


def runs_list(args: argparse.Namespace) -> int:
    from trainlab.engine.tracking import Run, RunsIndex, index_row, scan_runs

    index = RunsIndex(args.runs_dir)
    rows = index.rows()
    on_disk = {r.key: r for r in scan_runs(args.runs_dir)}
    if set(on_disk) != set(rows):  # a run folder without a row, or a row without a folder
        writable = os.access(args.runs_dir, os.W_OK)
        rows = index.rebuild() if writable else {k: index_row(r, r.info()) for k, r in on_disk.items()}
    shown = [r for r in rows.values() if (not args.only_task or r["task"] == args.only_task)
             and (args.tag is None or r.get("tag", "") == args.tag)]
    if not shown:
        print(f"no runs in {args.runs_dir}")
        return 0
    table = [("id", "task", "status", "step", "created", "tag", "settings")]
    for r in sorted(shown, key=lambda r: r.get("created", "")):
        run = Run(r["id"], r["task"], Path(args.runs_dir) / r["dir"])
        steps = f"{r.get('step', 0)}/{r['max_steps']}" if r.get("max_steps") else str(r.get("step", 0))
        table.append((r["id"], r["task"], run.effective_status(r), steps, r.get("created", "")[:19], r.get("tag", ""),
                      r.get("summary", "")))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + str(row[-1]))
    return 0


def runs_clean(args: argparse.Namespace) -> int:
    from trainlab.engine.tracking import clean_test_runs, parse_age

    if not args.tests:
        raise UsageError("runs clean: pass --tests; it only ever removes runs tagged 'test' "
                         "(remove any other run by id with `trainlab runs rm ID`)")
    age = parse_age(args.older_than) if args.older_than else None
    removed = clean_test_runs(args.runs_dir, age, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for run in removed:
        print(f"{verb} {run.key}")
    print(f"{verb} {len(removed)} test run{'s' if len(removed) != 1 else ''}")
    return 0


def runs_rm(args: argparse.Namespace) -> int:
    from trainlab.engine.tracking import find_run, remove_runs

    runs = [find_run(args.runs_dir, None, ref) for ref in args.ids]
    remove_runs(args.runs_dir, runs, dry_run=args.dry_run)
    for run in runs:
        print(f"{'would remove' if args.dry_run else 'removed'} {run.key}")
    return 0


COMMANDS = {("runs", "list"): runs_list, ("runs", "clean"): runs_clean, ("runs", "rm"): runs_rm}
