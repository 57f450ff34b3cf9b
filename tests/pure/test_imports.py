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
    """wse_sync modules imported at module level (not under TYPE_CHECKING, not in functions)."""
    import ast
    tree = ast.parse(path.read_text())
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + node.orelse + getattr(node, "finalbody", []) +
                      [h for x in getattr(node, "handlers", []) for h in x.body])
            elif isinstance(node, ast.ImportFrom):
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
    visit(tree.body)
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


def test_no_import_cycle_among_the_modules():
    graph = _graph()
    done, stack = set(), []

    def walk(node):
        if node in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        stack.append(node)
        for nxt in sorted(graph[node]):
            walk(nxt)
        stack.pop()
        done.add(node)

    for node in sorted(graph):
        walk(node)


# what each layer may import at module level
LAYERS = {"core": {"core"}, "runtime": {"core", "runtime"},
          "cluster": {"core", "runtime", "cluster"}}


def test_each_layer_imports_only_the_layers_below_it():
    for name, imports in _graph().items():
        parts = name.split(".")
        if len(parts) < 3 or parts[1] not in LAYERS:
            continue
        for m in imports:
            layer = m.split(".")[1] if m.count(".") else ""
            assert layer in LAYERS[parts[1]], f"{name} imports {m}"
