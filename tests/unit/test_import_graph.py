"""lorakit's modules form layers: no module imports one that imports it back, directly or through others.

Imports inside functions count too (they are how a cycle hides: the module loads, and the cycle bites whoever calls
the function first), and so do imports for type checking only. What both sides of a cycle need belongs in a module
below them both."""

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"


def modules() -> dict[str, Path]:
    """lorakit's modules by dotted name (a package by its own name, for its __init__.py)."""
    found = {}
    for path in (SRC / "lorakit").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """The lorakit modules `name` imports anywhere in its file: `from lorakit import plan` is lorakit.plan,
    `from lorakit.run_folder import latest` is lorakit.run_folder, relative imports resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            for alias in node.names:
                module = f"{base}.{alias.name}"
                out |= {module} if module in known else ({base} if base in known else set())
    return out - {name}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as the path around it (its first module again at the end), or None."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once all it reaches is checked

    def visit(module: str, path: list[str]) -> list[str] | None:
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return [*path[path.index(other) :], other]
            if other not in state and (found := visit(other, [*path, other])):
                return found
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return None


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imported(name, path, set(known)) for name, path in known.items()}


def test_the_reader_sees_every_kind_of_import_and_the_check_finds_a_cycle(tmp_path):
    source = tmp_path / "lorakit" / "serve" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text(
        "import lorakit.plan\nfrom lorakit import train as t\nfrom lorakit.run_folder import latest\n"
        "from . import engine\nfrom ..export import vllm\n"
        "def f():\n    from lorakit import checkpoint\n"
        "if TYPE_CHECKING:\n    from lorakit.config import RunConfig\n"
    )  # fmt: skip
    known = {"lorakit", "lorakit.plan", "lorakit.train", "lorakit.run_folder", "lorakit.serve", "lorakit.serve.engine",
             "lorakit.export", "lorakit.export.vllm", "lorakit.checkpoint", "lorakit.config"}  # fmt: skip
    assert imported("lorakit.serve.x", source, known) == known - {"lorakit", "lorakit.serve", "lorakit.export"}
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_imports_one_above_it():
    imports = graph()
    assert {"lorakit.plan", "lorakit.train", "lorakit.checkpoint", "lorakit.run_folder"} <= imports.keys()
    assert "lorakit.plan" in imports["lorakit.train"], "the reader follows `from lorakit import plan`"
    found = cycle(imports)
    if found:
        pytest.fail("import cycle: " + " -> ".join(found) + ". Move what both sides need into a module below them")
