"""The house rules of the package's imports, read from the code with ``ast``: no module imports
one of a higher layer, no import cycles, no ``_private`` name taken from another module.
Every import counts, function-local and type-only (``if TYPE_CHECKING:``) ones included:
a lazy import hides a cycle from Python at import time, not from a reader.

Layers, from the bottom (a module may import its own layer and those below):

    0  trainlab, config, stats, presets, allocator
    1  engine/
    2  the tasks' own modules: multiply/, chat/
    3  runs (the run path)
    4  what drives runs: tune, auto, multiply/compare, chat/serve/ (the server: engine, API, app)
    5  cli/
    6  __main__
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"

DRIVERS = {"trainlab.tune", "trainlab.auto", "trainlab.multiply.compare", "trainlab.chat.serve"}


def layer(module: str) -> int:
    if module == "trainlab.__main__":
        return 6
    if module.startswith("trainlab.cli"):
        return 5
    if module in DRIVERS or module.startswith("trainlab.chat.serve."):
        return 4
    if module == "trainlab.runs":
        return 3
    if module.startswith(("trainlab.multiply", "trainlab.chat")):
        return 2
    if module.startswith("trainlab.engine"):
        return 1
    return 0


def modules(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py under ``root`` (a folder holding packages)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import statement of the file
    that reaches a module of ``known``; relative imports are resolved against ``module``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in known:
                    found.append((alias.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            names = []
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in known:  # `from pkg import module`
                    found.append((sub, [], node.lineno))
                else:
                    names.append(alias.name)
            if names and base in known:
                found.append((base, names, node.lineno))
    return found


def violations(root: Path, layer_of=layer) -> list[str]:
    """Every upward import, cycle and private name taken across modules under ``root``."""
    mods = modules(root)
    known = set(mods)
    graph: dict[str, set[str]] = {m: set() for m in mods}
    problems = []
    for mod, path in mods.items():
        for target, names, line in imports_of(mod, path, known):
            if target == mod:
                continue
            graph[mod].add(target)
            if layer_of(target) > layer_of(mod):
                problems.append(f"upward: {mod} (layer {layer_of(mod)}) imports {target} "
                                f"(layer {layer_of(target)}) at line {line}")
            for name in names:
                if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):  # __version__ is public
                    problems.append(f"private: {mod} imports {name} from {target} at line {line}")
    problems += [f"cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph) + 100))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_keeps_its_layers_and_has_no_cycles_or_private_imports():
    problems = violations(SRC)
    assert not problems, "\n".join(problems)


def test_the_checker_finds_each_kind_of_violation(tmp_path):
    """The rules above, on a made-up package that breaks each one once."""
    pkg = tmp_path / "trainlab"
    files = {
        "__init__.py": "",
        "config.py": "",
        "engine/__init__.py": "",
        # upward: the engine reaches into the CLI (function-local, still counted)
        "engine/loop.py": "def f():\n    from trainlab.cli import main\n",
        # a cycle through a type-only import, and a private name taken across modules
        "engine/state.py": "from trainlab.engine.task import Task, _helper\n",
        "engine/task.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import state\n",
        "cli/__init__.py": "def main():\n    pass\n",
    }
    for name, text in files.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(textwrap.dedent(text))
    problems = violations(tmp_path)
    assert any(p.startswith("upward: trainlab.engine.loop") and "trainlab.cli" in p for p in problems), problems
    assert any(p.startswith("private: trainlab.engine.state imports _helper") for p in problems), problems
    assert "cycle: trainlab.engine.state -> trainlab.engine.task" in problems, problems
    assert len(problems) == 3, problems


def _modules_loaded_by(argv: list[str]) -> tuple[int, str, set[str]]:
    code = textwrap.dedent(f"""
        import json, sys
        from trainlab.cli import main
        try:
            rc = main({argv!r})
        except SystemExit as e:
            rc = e.code
        sys.stdout.flush()
        sys.stderr.write("MODULES " + json.dumps(sorted(sys.modules)) + "\\n")
        sys.exit(rc or 0)
    """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    marker = [line for line in p.stderr.splitlines() if line.startswith("MODULES ")]
    import json

    return p.returncode, p.stdout + p.stderr, set(json.loads(marker[-1][len("MODULES "):]))


def test_help_and_usage_errors_answer_without_loading_torch():
    for argv, rc, says in ((["--help"], 0, "multiply"), (["multiply", "train", "--help"], 0, "--num-latent"),
                           (["chat", "train", "--help"], 0, "--context-len"),
                           (["tune", "chat", "--help"], 0, "--budget-minutes"),
                           (["chat", "serve", "--help"], 0, "--max-queue"),
                           (["multiply", "train", "--no-such-flag"], 2, "unrecognized arguments: --no-such-flag"),
                           (["chat", "generate", "--top-k", "many"], 2, "--top-k")):
        code, out, loaded = _modules_loaded_by(argv)
        assert code == rc, (argv, out)
        assert says in out, (argv, out)
        assert "torch" not in loaded, f"{argv} loaded torch"


def defined_at_top(path: Path) -> set[str]:
    """The names a module defines itself at its top level (functions, classes, assignments,
    also inside top-level ``if`` and ``try``), not the ones it imports."""
    names: set[str] = set()

    def visit(body) -> None:
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(n.name)
            elif isinstance(n, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                for target in (n.targets if isinstance(n, ast.Assign) else [n.target]):
                    names.update(x.id for x in ast.walk(target) if isinstance(x, ast.Name))
            elif isinstance(n, (ast.If, ast.Try)):
                for block in (n.body, n.orelse, getattr(n, "finalbody", []), *(h.body for h in getattr(n, "handlers", []))):
                    visit(block)

    visit(ast.parse(path.read_text(encoding="utf-8")).body)
    return names


def test_every_import_of_a_trainlab_name_names_the_module_that_defines_it():
    """Function-local imports run only when their function does: a name moved to another
    module (make_member, once, inside seconds_per_step) would fail only in that call. And a
    name is imported from where it is defined, never through a module that re-exports it, so
    a reader who follows an import finds the definition (and no shim outlives a refactor)."""
    import importlib

    root = SRC.parent
    missing, indirect = [], []
    for path in sorted([*SRC.rglob("*.py"), *(root / "benchmarks").glob("*.py"), *(root / "tests").glob("*.py")]):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith("trainlab"):
                module = importlib.import_module(node.module)
                own = defined_at_top(Path(module.__file__))
                for alias in node.names:
                    where = f"{path.relative_to(root)}:{node.lineno}: {node.module}.{alias.name}"
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                        continue  # a submodule
                    except ImportError:
                        pass
                    if not hasattr(module, alias.name):
                        missing.append(where)
                    elif alias.name not in own:
                        obj = getattr(module, alias.name)
                        home = getattr(obj, "__module__", None) if callable(obj) else None
                        indirect.append(f"{where} (defined in {home or 'another module'})")
    assert not missing, missing
    assert not indirect, indirect
