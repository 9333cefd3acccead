"""Build a second public-domain corpus for the chat benchmarks: the King James Bible (1611,
out of copyright), 4.3 MB of text, from Debian's own packages.

Where it comes from: Debian's ``bible-kjv-text`` package holds the text in a compressed
format of its ``bible`` program (Chip Chapin's Bible Retrieval System, 1989; the package's
copyright file: "The copyright for the King James Version text of the Bible is expired"),
and ``bible-kjv`` holds the program. Both are fetched with ``apt-get download`` (no root
needed, nothing installed), unpacked into a temporary folder, and the program prints every
verse from Genesis 1:1 to Revelation 22:21, one verse a line, under a heading per chapter:

    Genesis 1

      1 In the beginning God created the heaven and the earth.

Nothing of it is committed: run this once per machine and pass ``--text PATH`` to the
benchmarks. Not derived from tinyshakespeare; 73 distinct characters.

    python benchmarks/make_kjv.py --out build/corpora/kjv.txt
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PACKAGES = ("bible-kjv-text", "bible-kjv")
ALL_VERSES = "gen1:1-rev22:21"


def run(cmd: list[str], cwd: Path) -> str:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"make_kjv: {' '.join(cmd)} failed: {out.stderr.strip()[-300:]}")
    return out.stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="build/corpora/kjv.txt", help="where to write the text")
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        print(f"{out} exists ({out.stat().st_size:,} bytes): nothing to do")
        return
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise SystemExit("make_kjv: needs Debian's apt-get and dpkg-deb (the text comes from Debian's packages)")
    with tempfile.TemporaryDirectory(prefix="kjv-") as tmp:
        work = Path(tmp)
        run(["apt-get", "download", *PACKAGES], work)
        for deb in sorted(work.glob("*.deb")):
            run(["dpkg-deb", "-x", str(deb), "root"], work)
        root = work / "root"
        program = next((p for p in (root / "usr/bin/bible", root / "usr/games/bible") if p.is_file()), None)
        data = next(root.rglob("bible.data"), None)
        if program is None or data is None:
            raise SystemExit("make_kjv: the packages did not hold the bible program and its bible.data")
        # -l: a line as wide as the longest verse, so each verse is one line
        text = run([str(program), "-p", str(data.parent), "-l1000", ALL_VERSES], work)
    text = text.lstrip("\n")
    if len(text) < 3_000_000:
        raise SystemExit(f"make_kjv: only {len(text):,} characters came out; expected about 4.3 million")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    partial.replace(out)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    print(f"wrote {out}: {len(text):,} characters, {len(set(text))} distinct, sha256 {digest}...", file=sys.stdout)


if __name__ == "__main__":
    main()
