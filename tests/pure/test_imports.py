"""The import graph, read from the sources: no cycle, each layer imports only the
layers below it; an unknown public name is an AttributeError (what the modules
pull in when imported is tests/processes/test_imports_fresh.py, in a fresh
interpreter each)."""
from pathlib import Path

import pytest


def test_an_unknown_name_is_an_attribute_error():
    import wse_sync
    with pytest.raises(AttributeError):
        wse_sync.NoSuchThing  # noqa: B018


def _module_imports(path, package):
    """The wse_sync modules ``path`` imports anywhere: at module level, under
    TYPE_CHECKING and inside functions alike (a deferred import is still a
    dependency)."""
    import ast
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("wse_sync"):
                found.add(mod)
                found.update(f"{mod}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("wse_sync"))
    return found


def _graph():
    root = Path(__file__).resolve().parents[2] / "wse_sync"
    modules = {}
    for path in root.rglob("*.py"):
        rel = path.relative_to(root.parent).with_suffix("")
        name = ".".join(rel.parts)
        package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
        name = name[: -len(".__init__")] if path.stem == "__init__" else name
        modules[name] = path, package
    return {name: {m for m in _module_imports(path, package) if m in modules and m != name}
            for name, (path, package) in modules.items()}


def _cycle(graph):
    """One cycle of ``graph`` as a list of nodes, or None."""
    done, stack = set(), []

    def walk(node):
        if node in stack:
            return stack[stack.index(node):] + [node]
        if node in done:
            return None
        stack.append(node)
        for nxt in sorted(graph[node]):
            found = walk(nxt)
            if found:
                return found
        stack.pop()
        done.add(node)
        return None

    for node in sorted(graph):
        found = walk(node)
        if found:
            return found
    return None


def test_no_import_cycle_among_the_modules():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# the subpackages, lowest first: each may import its own and those before it
LAYERS = ["core", "socket", "cluster", "worker", "integrations", "serve"]


def _layer(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def test_every_subpackage_is_a_known_layer():
    root = Path(__file__).resolve().parents[2] / "wse_sync"
    found = {p.name for p in root.iterdir() if (p / "__init__.py").exists()}
    assert found == set(LAYERS)


def test_no_two_subpackages_depend_on_each_other():
    graph = _graph()
    packages = {layer: set() for layer in LAYERS}
    for name, imports in graph.items():
        layer = _layer(name)
        if layer is None:
            continue
        packages[layer].update(x for x in map(_layer, imports) if x not in (None, layer))
    cycle = _cycle(packages)
    assert cycle is None, "subpackages depend on each other: " + " -> ".join(cycle)


def test_each_layer_imports_only_the_layers_below_it():
    bad = []
    for name, imports in _graph().items():
        layer = _layer(name)
        if layer is None:
            # the top-level modules (wse_sync, the documented shims) may use any layer
            continue
        for m in imports:
            target = _layer(m)
            if target is None or LAYERS.index(target) > LAYERS.index(layer):
                bad.append(f"{name} imports {m}")
    assert not bad, bad


def test_the_checks_see_deferred_and_type_only_imports(tmp_path):
    """A cycle through an import inside a function or under TYPE_CHECKING is found."""
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\n"
                                   "if TYPE_CHECKING:\n    from wse_sync.x import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from wse_sync.x import a\n")
    found = {n: _module_imports(tmp_path / f"{n}.py", "wse_sync.x") for n in ("a", "b")}
    assert "wse_sync.x.b" in found["a"] and "wse_sync.x.a" in found["b"]
    graph = {"wse_sync.x.a": {"wse_sync.x.b"}, "wse_sync.x.b": {"wse_sync.x.a"}}
    assert _cycle(graph) is not None
