"""Architecture rules, read from the source (``ast``), not from a running interpreter.

* fedlora's own modules import each other without cycles (module-level and function-level
  imports alike: a deferred import hides a cycle, it does not remove it);
* no module imports from a layer above its own (``LAYERS``, the order each package's
  docstring states);
* generic code never names a method: a method's name, its server and settings class names
  appear only in ``fedlora/strategies/`` (and in tests), so adding a method is one file there.
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the dotted package it installs as
PACKAGES = {"fedlora": "fedlora"}

# fedlora's layers, lowest first: a module may import from its own layer and the ones before
# it, never from a later one. A layer is named by module prefixes (a package or one module).
LAYERS = [
    ("core", ("fedlora.core",)),
    ("maths and privacy", ("fedlora.aggregation", "fedlora.privacy")),
    ("tasks", ("fedlora.tasks",)),
    ("model", ("fedlora.model",)),
    ("report", ("fedlora.report",)),
    ("config", ("fedlora.config",)),
    ("clients", ("fedlora.clients",)),
    ("strategies", ("fedlora.strategies",)),
    ("run", ("fedlora.run",)),
    ("entry points", ("fedlora.simulate", "fedlora.deploy", "fedlora.sweep", "fedlora.compare",
                      "fedlora")),
]


def source_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py of fedlora, strategies/ and clients/."""
    modules = {}
    for folder, package in PACKAGES.items():
        for directory, subdirs, files in os.walk(ROOT / folder, followlinks=False):
            here = Path(directory)
            subdirs[:] = sorted(d for d in subdirs if not (here / d).is_symlink()
                                and d != "__pycache__")
            parts = here.relative_to(ROOT / folder).parts
            for file in sorted(files):
                if not file.endswith(".py"):
                    continue
                stem = () if file == "__init__.py" else (file[:-3],)
                modules[".".join((package, *parts, *stem))] = here / file
    return modules


def is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The fedlora modules ``name`` imports anywhere in its file (module or function level).

    ``import a.b.c`` and ``from a.b.c import x`` are edges to ``a.b.c`` (or its nearest known
    ancestor); ``from pkg import x`` is an edge to the submodule ``pkg.x`` when there is one,
    else to the package ``pkg`` itself. Relative imports are resolved against ``name``."""
    package = name if is_package(path) else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                targets.add(submodule if submodule in known else module)
    edges = set()
    for target in targets:
        while target and target not in known:
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.add(target)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = source_modules()
    known = set(modules)
    return {name: imported_modules(name, path, known) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The shortest cycle through each module that lies on one, as ``[a, b, ..., a]``
    (strongly connected components by Tarjan, then breadth first), sorted for a stable
    message."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    found = set()
    for component in components:
        for start in component:
            cycle = shortest_cycle(graph, component, start)
            turn = cycle.index(min(cycle))  # one rotation per cycle, so each prints once
            found.add(tuple(cycle[turn:] + cycle[:turn]))
    return sorted([*cycle, cycle[0]] for cycle in found)


def shortest_cycle(graph: dict[str, set[str]], component: set[str], start: str) -> list[str]:
    """The shortest path start -> ... -> start inside a strongly connected component
    (breadth first), without repeating start at its end."""
    parents, frontier = {start: None}, [start]
    while True:
        following = []
        for node in frontier:
            if start in graph[node]:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return path[::-1]
            for succ in sorted(graph[node] & component):
                if succ not in parents:
                    parents[succ] = node
                    following.append(succ)
        frontier = following


def layer_of(module: str, layers=LAYERS) -> int:
    """The index in ``layers`` of the layer ``module`` belongs to (its longest prefix)."""
    best, depth = None, -1
    for index, (_, prefixes) in enumerate(layers):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > depth:
                best, depth = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer: add it to LAYERS")
    return best


def upward_imports(graph: dict[str, set[str]], layers=LAYERS) -> list[str]:
    """``a (layer) -> b (higher layer)`` for each import of a module from a layer above."""
    found = []
    for module, targets in sorted(graph.items()):
        here = layer_of(module, layers)
        for target in sorted(targets):
            there = layer_of(target, layers)
            if there > here:
                found.append(f"{module} ({layers[here][0]}) -> {target} ({layers[there][0]})")
    return found


def test_upward_import_finder_flags_a_bad_graph():
    # Prepare: a three-layer toy; the low layer imports the top one
    layers = [("low", ("p.low",)), ("mid", ("p.mid",)), ("top", ("p.top", "p"))]
    good = {"p.low.a": set(), "p.mid.b": {"p.low.a"}, "p.top.c": {"p.mid.b", "p.low.a"},
            "p.d": {"p.top.c"}}
    bad = {**good, "p.low.a": {"p.top.c"}, "p.mid.b": {"p.low.a", "p.mid.e"}, "p.mid.e": set()}

    # Execute / Assert
    assert upward_imports(good, layers) == []
    assert upward_imports(bad, layers) == ["p.low.a (low) -> p.top.c (top)"]


def test_no_module_imports_from_a_layer_above():
    # Execute
    found = upward_imports(import_graph())

    # Assert
    assert not found, "imports from a higher layer:\n" + "\n".join(found)


def test_every_package_docstring_names_its_layer():
    # Each layer package says what it holds and what it may import.
    for name, prefixes in LAYERS[:-1]:
        for prefix in prefixes:
            path = ROOT / (prefix.replace(".", "/") + "/__init__.py")
            if not path.exists():
                path = ROOT / (prefix.replace(".", "/") + ".py")
            assert "Layer" in (ast.get_docstring(ast.parse(path.read_text())) or ""), f"{path} does not say which layer it is"


def test_import_graph_is_read_from_every_module():
    # Execute
    graph = import_graph()

    # Assert: the reader sees the three source folders and both kinds of import
    assert {"fedlora.config", "fedlora.strategies", "fedlora.strategies.base",
            "fedlora.clients.app"} <= set(graph)
    assert "fedlora.aggregation.maths" in graph["fedlora.strategies.base"]  # module level
    assert "fedlora.strategies.base" in graph["fedlora.strategies.fedsb"]


def test_cycle_finder_reports_every_cycle():
    # Prepare: a -> b -> c -> a, d <-> e, f alone
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"e"}, "e": {"d"}, "f": {"a"}}

    # Execute / Assert
    assert cycles(graph) == [["a", "b", "c", "a"], ["d", "e", "d"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_fedlora_imports_are_acyclic():
    # Execute
    found = cycles(import_graph())

    # Assert
    assert not found, "import cycles (module- or function-level imports):\n" + "\n".join(
        " -> ".join(cycle) for cycle in found)


# --------------------------------------------------------------------------------------------
# Generic code never names a method


def method_names() -> set[str]:
    """Every registered method's name and its classes' names, lower case: the string
    arguments of ``register_strategy(...)`` calls in strategies/*.py and the classes passed to
    it, plus each registered class's ``name = "..."`` attribute (the pre-registry spelling)."""
    names, classes, class_names = set(), set(), {}
    for path in sorted((ROOT / "fedlora" / "strategies").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) \
                    == "register_strategy":
                for arg in node.args:
                    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                        names.add(arg.value)
                    elif isinstance(arg, (ast.Name, ast.Attribute)):
                        classes.add(getattr(arg, "id", getattr(arg, "attr", "")))
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, ast.Assign) and [getattr(t, "id", "") for t in item.targets] \
                            == ["name"] and isinstance(item.value, ast.Constant):
                        class_names[node.name] = item.value.value
    # The regex form the registry promises: register_strategy("<name>", ...)
    for path in sorted((ROOT / "fedlora" / "strategies").glob("*.py")):
        names.update(re.findall(r'register_strategy\(\s*["\'](\w+)["\']', path.read_text()))
    names.update(class_names[c] for c in classes if class_names.get(c))
    return {n.lower() for n in names | classes if n}


def docstring_nodes(tree: ast.AST) -> set[int]:
    """ids of the Constant nodes that are docstrings (module, class, function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.add(id(body[0].value))
    return found


def identifiers(node: ast.AST) -> list[str]:
    """The names a node introduces or uses (variables, attributes, arguments, imports, defs)."""
    if isinstance(node, ast.Name):
        return [node.id]
    if isinstance(node, ast.Attribute):
        return [node.attr]
    if isinstance(node, ast.arg):
        return [node.arg]
    if isinstance(node, ast.keyword):
        return [node.arg] if node.arg else []
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [node.name]
    if isinstance(node, ast.alias):
        return [node.name, node.asname] if node.asname else [node.name]
    if isinstance(node, ast.ImportFrom):
        return [node.module] if node.module else []
    return []


def method_mentions(path: Path, names: set[str]) -> list[str]:
    """``file:line: 'text'`` for each identifier containing a method name (case-insensitive)
    and each string literal holding one as a token (not comments, not docstrings)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = docstring_nodes(tree)
    token = re.compile(r"(?<![a-z0-9])(" + "|".join(sorted(map(re.escape, names))) + r")(?![a-z0-9])")
    found = []
    for node in ast.walk(tree):
        texts = [t for t in identifiers(node) if any(n in t.lower() for n in names)]
        if isinstance(node, ast.Constant) and isinstance(node.value, str) \
                and id(node) not in docstrings and token.search(node.value.lower()):
            texts.append(node.value)
        line = getattr(node, "lineno", 0)
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
        found += [f"{where}:{line}: {text!r}" for text in texts]
    return sorted(set(found))


def generic_files() -> list[Path]:
    """Code outside strategies/ and tests/: the fedlora package and the client side."""
    modules = source_modules()
    return sorted(p for name, p in modules.items() if not name.startswith("fedlora.strategies"))


def test_method_names_are_found():
    # Execute
    names = method_names()

    # Assert: every registered method contributes its name and its class
    from fedlora.strategies import STRATEGIES

    assert set(STRATEGIES) <= names
    assert {cls.__name__.lower() for cls in STRATEGIES.values()} <= names


def test_mention_finder_sees_identifiers_and_strings_but_not_comments_or_docstrings(tmp_path):
    # Prepare
    path = tmp_path / "sample.py"
    path.write_text('"""Uses fedsb."""\n# fedsb in a comment\nclass FedSBConfig:\n'
                    '    """fedsb docstring"""\n    x = "fedsb.init"\n    y = "fedsbb"\n')

    # Execute
    found = method_mentions(path, {"fedsb"})

    # Assert
    lines = sorted(int(f.split(":")[1]) for f in found)
    assert lines == [3, 5], found


def test_generic_code_never_names_a_method():
    # Prepare
    names = method_names()

    # Execute
    found = [m for path in generic_files() for m in method_mentions(path, names)]

    # Assert
    assert names and not found, (f"{len(found)} mentions of methods {sorted(names)} outside "
                                 "strategies/ (move them into the method's file):\n" + "\n".join(found))
