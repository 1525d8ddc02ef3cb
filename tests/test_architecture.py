"""The layers of the package: every import runs downwards, no module imports itself back, and
equiseg imports sit at the top of their module (only the CLI defers them, for its start-up time).

The order (docs/architecture.md): runtime, groups < nn < models < data < config < runs, presets,
datasets, pictures, scale < detection < inference < evaluation < training < report < study, demo, challenge < cli. A module may
import its own layer or lower ones.
"""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = [
    ("equiseg.runtime", "equiseg.groups", "equiseg.files"),
    ("equiseg.nn",),
    ("equiseg.models",),
    ("equiseg.data",),
    ("equiseg.config",),
    ("equiseg.runs", "equiseg.presets", "equiseg.datasets", "equiseg.pictures", "equiseg.scale"),
    ("equiseg.detection",),
    ("equiseg.inference",),
    ("equiseg.evaluation",),
    ("equiseg.training",),
    ("equiseg.report",),
    ("equiseg.study", "equiseg.demo", "equiseg.challenge", "equiseg.export", "equiseg.slide", "equiseg.tune"),
    ("equiseg.cli", "equiseg"),
]
DEFERRED_IMPORTS_ALLOWED = {"equiseg.cli"}  # start-up time of the command


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    """The index of the longest prefix in LAYERS that names ``module``."""
    best, index = "", None
    for k, names in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and len(name) > len(best):
                best, index = name, k
    assert index is not None, f"{module} is in no layer: add it to LAYERS"
    return index


def imports() -> list[tuple[str, str, bool, int]]:
    """(importer, imported, at module level, line) for every equiseg import in src."""
    found = []
    for path in sorted((SRC / "equiseg").rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        # `if TYPE_CHECKING:` at module level: imports for the type checker, which never run deferred
        top |= {id(inner) for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"
                for inner in node.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "equiseg":
                found.append((module_name(path), node.module, id(node) in top, node.lineno))
    return found


def test_every_import_runs_downwards():
    upward = [f"{a} (line {line}) imports {b}" for a, b, _, line in imports() if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_no_module_imports_itself_back():
    graph: dict[str, set[str]] = {}
    for a, b, at_top, _ in imports():
        if at_top:
            graph.setdefault(a, set()).add(b)
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(nxt):], nxt]))
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for start in sorted(graph):
        if start not in state:
            visit(start, [start])


def test_equiseg_imports_sit_at_the_top_of_their_module():
    deferred = [f"{a} (line {line}) imports {b} inside a function" for a, b, at_top, line in imports()
                if not at_top and a not in DEFERRED_IMPORTS_ALLOWED]
    assert not deferred, "\n".join(deferred)


def test_the_checks_see_a_violation():
    assert layer("equiseg.nn.bank") < layer("equiseg.models.unet") < layer("equiseg.data.context")
    assert layer("equiseg.inference.tiling") < layer("equiseg.training.fit") < layer("equiseg.cli")
    assert layer("equiseg.pictures") < layer("equiseg.inference.predict") < layer("equiseg.report.plots")


MAX_FUNCTION_LINES = 60  # signature, docstring and body: a function that reads on one screen


def long_functions(root: Path = SRC / "equiseg", limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """``path:line name (N lines)`` for every function or method in src longer than ``limit`` lines."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
                lines = node.end_lineno - start + 1
                if lines > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_60_lines():
    assert not long_functions(), "\n".join(long_functions())


def test_the_length_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{k} = {k}" for k in range(59))
    (tmp_path / "m.py").write_text(f"def fits():\n{body}\n\n\ndef long():\n{body}\n    x = 59\n")
    assert long_functions(tmp_path) == ["m.py:63 long (61 lines)"]
