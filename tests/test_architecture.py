"""The package's shape, read from its source: no import cycles, no module reaching into another's private
names, every deliberate exception a TLDevinterpError.

Catches: a new `import` (lazy, in a function, or under TYPE_CHECKING: all count) that closes a cycle; a
module importing `_helper` from a sibling; `raise ValueError(...)` in new code instead of the library's
error types (the command line would show a bug's traceback, or hide a bug as a one-line error).
"""

import ast
import builtins
from pathlib import Path

import pytest

import tl_devinterp

ROOT = Path(tl_devinterp.__file__).parent
PACKAGE = "tl_devinterp"


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = ast.parse(path.read_text(), str(path))
    return found


def imports(name: str, tree: ast.Module, known: set[str]) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every import anywhere in the module (functions, TYPE_CHECKING
    blocks included); `from .pkg import sub` counts as importing `pkg.sub` when that is a module."""
    package = name if (ROOT / Path(*name.split(".")[1:]) / "__init__.py").exists() else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.startswith(PACKAGE)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and node.module.startswith(PACKAGE):
                target = node.module
            else:
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
            found += [(s, []) for s in subs]
            found.append((target, [n for n in names if f"{target}.{n}" not in known]))
    return found


def graph() -> dict[str, set[str]]:
    trees = modules()
    known = set(trees)
    return {name: {t for t, _ in imports(name, tree, known) if t in known and t != name}
            for name, tree in trees.items()}


def test_no_import_cycles():
    """Tarjan's strongly connected components of the import graph: each must be one module. A package's
    `__init__` importing its own submodules is not a cycle unless a submodule imports the package back."""
    edges = graph()
    index, low, stack, on, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_another_modules_private_names():
    trees = modules()
    known = set(trees)
    reaching = [(name, target, n) for name, tree in trees.items() for target, names in imports(name, tree, known)
                for n in names if n.startswith("_") and not n.startswith("__") and target != name]
    assert not reaching, f"(importer, module, private name): {reaching}"


def test_every_deliberate_exception_is_a_tl_devinterp_error():
    """`raise SomeBuiltinError(...)` in the package (a bare re-raise, or raising a caught error, is fine)."""
    builtin_errors = {n for n in dir(builtins) if isinstance(getattr(builtins, n), type)
                      and issubclass(getattr(builtins, n), BaseException)} - {"SystemExit", "StopIteration", "AssertionError"}  # an assertion is a bug
    raw = [f"{name}:{node.lineno} raise {node.exc.func.id}"
           for name, tree in modules().items() for node in ast.walk(tree)
           if isinstance(node, ast.Raise) and isinstance(node.exc, ast.Call)
           and isinstance(node.exc.func, ast.Name) and node.exc.func.id in builtin_errors]
    assert not raw, raw
    errors = [getattr(tl_devinterp.errors, n) for n in dir(tl_devinterp.errors)]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, Exception)]
    assert all(issubclass(e, tl_devinterp.TLDevinterpError) for e in errors)
    assert all(len(e.__mro__) > 3 for e in errors if e is not tl_devinterp.TLDevinterpError)  # a builtin parent too


def test_the_command_line_shows_our_errors_in_one_line_and_bugs_with_their_traceback(monkeypatch, capsys):
    """Catches: a CLI that catches builtin errors (an internal TypeError shown as if it were the user's
    mistake) or misses one of ours (WorkersLostError printed as a traceback)."""
    from tl_devinterp import analysis, cli
    from tl_devinterp.errors import WorkersLostError

    def lost(*args, **kwargs):
        raise WorkersLostError("Worker processes died before steps [3] were computed; rerun.")

    monkeypatch.setattr(analysis, "demo", lost)
    with pytest.raises(SystemExit) as stop:
        cli.main(["demo", "--quick", "--quiet"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err == "tl-devinterp demo: error: Worker processes died before steps [3] " \
                                           "were computed; rerun.\n"

    def bug(*args, **kwargs):
        return None + 1

    monkeypatch.setattr(analysis, "demo", bug)
    with pytest.raises(TypeError, match="unsupported operand"):
        cli.main(["demo", "--quick", "--quiet"])
