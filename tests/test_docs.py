"""The docs: README short, the site builds with `mkdocs build --strict` (a broken link or a
missing page fails it), the CLI reference is the parsers' own help, and every results/ path
that README and docs name exists."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, env=env, timeout=300)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_the_site_builds_strict_with_the_cli_reference_generated(tmp_path):
    from trainlab.cli import build_parser
    from trainlab.cli.reference import commands, reference_markdown

    done = build(ROOT, tmp_path / "site")
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    names = [" ".join(("trainlab", *path)) for path, _ in commands(build_parser())]
    assert {"trainlab multiply budgets", "trainlab chat serve", "trainlab tune multiply"} <= set(names)
    for name in names:
        assert f"<code>{name}</code>" in page
    text = reference_markdown()
    for path, parser in commands(build_parser()):  # every flag of every command, as its --help shows it
        for action in parser._actions:
            if action.help == argparse.SUPPRESS:  # hidden on purpose (a worker's own index)
                continue
            for flag in action.option_strings:
                assert flag in text, (path, flag)
    for page_name in ("results/auto/index.html", "results/multiply-3digit/m3-simple.best.yaml"):
        assert (tmp_path / "site" / page_name).exists()  # results join the site, so links to them resolve


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "repo"
    for name in ("docs", "results"):
        shutil.copytree(ROOT / name, copy / name)
    for name in ("mkdocs.yml", "CHANGELOG.md"):
        shutil.copy2(ROOT / name, copy / name)
    page = copy / "docs" / "tuning.md"
    page.write_text(page.read_text(encoding="utf-8") + "\n[gone](../results/no-such-folder/README.md)\n",
                    encoding="utf-8")
    done = build(copy, tmp_path / "site")
    assert done.returncode != 0 and "no-such-folder" in done.stderr


RESULTS_PATH = re.compile(r"(?<![\w./-])(?:\.\./)*(results/[\w./-]*[\w/])")


def test_every_results_path_the_docs_name_exists():
    named = 0
    for f in DOC_FILES:
        for m in RESULTS_PATH.finditer(f.read_text(encoding="utf-8")):
            path = m.group(1)
            if "*" in path or "<" in path:
                continue
            named += 1
            assert (ROOT / path).exists(), f"{f.relative_to(ROOT)} names {path}, which does not exist"
    assert named > 20


def test_every_benchmark_is_in_the_docs():
    pages = "\n".join(f.read_text(encoding="utf-8") for f in DOC_FILES)
    missing = [p.name for p in sorted((ROOT / "benchmarks").glob("*.py")) if p.name != "common.py" and p.name not in pages]
    assert not missing, f"benchmarks no page names: {missing}"
