"""The layering of ARCHITECTURE.md, read from the code's own imports: imports run down the
stack, never up and never in a circle; only the command line imports argparse or launcher;
only rundir.py names a run's files."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

from helpers import REPO

# ARCHITECTURE.md's layers, bottom to top: module prefixes of each.
LAYERS = [
    ["sparsity_scaling.errors", "sparsity_scaling.files", "sparsity_scaling.formatting"],
    ["sparsity_scaling.config", "sparsity_scaling.costs", "sparsity_scaling.parallel", "sparsity_scaling.figures", "sparsity_scaling.laws"],
    ["sparsity_scaling.rundir", "sparsity_scaling.model", "sparsity_scaling.data", "sparsity_scaling.ranks"],
    ["sparsity_scaling.metrics", "sparsity_scaling.hf", "sparsity_scaling.train", "sparsity_scaling.sparse_ffn"],
    ["sparsity_scaling.evaluation"],
    ["sparsity_scaling.analysis", "sparsity_scaling.downstream"],
    ["launcher"],
    ["sparsity_scaling.cli"],
]
def _run_files() -> set[str]:
    """Every file name `RunDir` and `Checkpoint` give a run: their path properties (read on a
    run that does not exist) and their name constants; not its folders (`checkpoints`, `jobs`
    are JSON keys too), nor `tokenizer.model`, which is also what sentencepiece writes and
    what a prepared corpus and a model directory hold."""
    from sparsity_scaling import rundir

    run, names = rundir.RunDir(Path("/nonexistent/run")), {rundir.MANIFEST}
    for name, member in inspect.getmembers(rundir.RunDir):
        if isinstance(member, property):
            value = getattr(run, name)
            if isinstance(value, Path) and value.parent == run.path:
                names.add(value.name)
    for cls in (rundir.RunDir, rundir.Checkpoint):
        names |= {v for k, v in vars(cls).items() if k.isupper() and isinstance(v, str) and "." in v}
    return {name for name in names if "." in name} - {"tokenizer.model"}


RUN_FILES = _run_files()
NOT_RUN_FILES = {("launcher.report", "pareto.png")}  # the report's own picture, in WORKDIR/report_files/


def _modules() -> dict[str, Path]:
    files = [*REPO.glob("sparsity_scaling/**/*.py"), *REPO.glob("launcher/**/*.py")]
    names = {}
    for file in files:
        parts = list(file.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = file
    return names


MODULES = _modules()


def _imports(name: str, file: Path) -> set[str]:
    """Every project module (or outside top-level package) the file imports, anywhere in it."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


GRAPH = {name: _imports(name, file) for name, file in MODULES.items()}


def _layer(name: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return None


def test_every_module_has_a_layer():
    assert [name for name in MODULES if name != "sparsity_scaling" and _layer(name) is None] == []


def test_imports_never_run_up_the_stack():
    upward = [(a, b) for a, targets in GRAPH.items() for b in targets
              if b in MODULES and _layer(a) is not None and _layer(b) is not None and _layer(b) > _layer(a)]
    assert upward == []


def test_only_the_command_line_imports_argparse_or_launcher():
    offenders = [(a, b) for a, targets in GRAPH.items() for b in targets
                 if (b == "argparse" or b.split(".")[0] == "launcher") and a.split(".")[0] == "sparsity_scaling"
                 and not a.startswith("sparsity_scaling.cli")]
    assert offenders == []


def test_there_are_no_import_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for target in sorted(t for t in GRAPH[name] if t in MODULES):
            if state.get(target) == 1:
                return path + [name, target]
            if target not in state:
                cycle = visit(target, path + [name])
                if cycle:
                    return cycle
        state[name] = 2
        return None

    for name in sorted(MODULES):
        if name not in state:
            assert visit(name, []) is None


def test_only_rundir_names_the_files_of_a_run():
    named = []
    for name, file in MODULES.items():
        if name == "sparsity_scaling.rundir":
            continue
        for node in ast.walk(ast.parse(file.read_text())):
            text = node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""
            if text and not any(c.isspace() for c in text) and text.rsplit("/", 1)[-1] in RUN_FILES:
                named.append((name, text))
    assert [n for n in named if n not in NOT_RUN_FILES] == []


def test_the_launcher_and_the_settings_do_not_import_torch_at_import_time():
    """A Ray worker imports the launcher's modules (to unpickle its function) before Ray sets
    its thread count in OMP_NUM_THREADS, which torch reads once, when it is first imported:
    torch brought in with them would use every core in every worker and evaluation task.
    Settings and their checks (ARCHITECTURE.md) import none either: the command line starts fast."""
    launcher = sorted(f"launcher.{f.stem}" for f in (REPO / "launcher").glob("*.py") if f.stem != "__init__")
    settings = ["sparsity_scaling.config", "sparsity_scaling.evaluation.settings", "sparsity_scaling.analysis.settings",
                "sparsity_scaling.metrics"]
    assert len(launcher) >= 14
    code = (f"import sys, {', '.join(launcher + settings)}; "
            "print(sorted(m for m in sys.modules if m == 'torch'))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_tests_take_helpers_from_helpers_not_from_conftest():
    """conftest.py holds fixtures; a test importing from it couples to pytest's loading of it."""
    importing = [f.name for f in sorted((REPO / "tests").glob("*.py"))
                 if any(isinstance(node, ast.ImportFrom) and node.module == "conftest"
                        for node in ast.walk(ast.parse(f.read_text())))]
    assert importing == []
