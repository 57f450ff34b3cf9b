"""The pure modules import nothing of gevent or ZeroMQ; the public names still work."""
import subprocess
import sys
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "wse_sync" / "core"
PURE = sorted("wse_sync.core." + p.stem for p in CORE.glob("*.py") if p.stem != "__init__")


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_pulls_in_no_io_library(module):
    code = (f"import sys, {module}; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('gevent', 'zmq', 'geventwebsocket'));"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_public_names_are_there():
    code = ("import wse_sync; "
            "missing = [n for n in wse_sync.__all__ if getattr(wse_sync, n, None) is None]; "
            "print(missing); from wse_sync import WseServer, WSE_REASON; "
            "assert WSE_REASON.BY_CLIENT == 'wse.by-client'; "
            "import sys; sys.exit(1 if missing else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_an_unknown_name_is_an_attribute_error():
    import wse_sync
    with pytest.raises(AttributeError):
        wse_sync.NoSuchThing  # noqa: B018


def test_mount_stays_the_function_after_the_runtime_modules_are_imported():
    code = ("import wse_sync.gunicorn, wse_sync.wsgi, wse_sync.gunicorn_conf; "
            "from wse_sync import mount; import wse_sync; "
            "assert callable(mount) and callable(wse_sync.mount), mount")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


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
    root = Path(__file__).resolve().parent.parent / "wse_sync"
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
