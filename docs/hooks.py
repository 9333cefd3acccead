"""mkdocs hooks (mkdocs.yml names this file): the command-line reference is generated from
trainlab's parsers at every build, and the files under results/ join the site, so a docs link
to a results file that does not exist fails `mkdocs build --strict` (each results folder's
README.md becomes a page; other Markdown there, the runs' own reports, does not).

Pages link results as ``../results/...`` and results link pages as ``../../docs/...`` (right
when read on GitHub); in the site both live under one root, so those links are rewritten to
match."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]


def on_files(files: Files, config) -> Files:
    from trainlab.cli.reference import reference_markdown

    for path in sorted((ROOT / "results").rglob("*")):
        # a run's own report.md, copied beside its log, links the run folder's plots: kept as
        # a file of the repository, not made a page of the site
        if path.is_file() and (path.suffix != ".md" or path.name == "README.md"):
            files.append(File(str(path.relative_to(ROOT)), src_dir=str(ROOT), dest_dir=config["site_dir"],
                              use_directory_urls=config["use_directory_urls"]))
    files.append(File.generated(config, "cli.md", content=reference_markdown()))
    files.append(File.generated(config, "changelog.md", content=(ROOT / "CHANGELOG.md").read_text(encoding="utf-8")))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    depth = page.file.src_uri.count("/")
    if page.file.src_uri.startswith("results/"):  # results/x/README.md -> ../../docs/page.md: the page is at the root
        return markdown.replace("](" + "../" * depth + "docs/", "](" + "../" * depth)
    return markdown.replace("](" + "../" * (depth + 1) + "results/", "](" + "../" * depth + "results/")
