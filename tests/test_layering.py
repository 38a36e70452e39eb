"""The package is layered: imports point only down (docs/architecture.md). Checked statically
from the source's import statements and dynamically by importing core on its own."""
import ast
import pathlib
import subprocess
import sys

SRC = pathlib.Path(__file__).resolve().parents[1] / "src" / "deltatune"

# lower number = lower layer; a module may import from its own layer's package or lower ones
LAYERS = {
    "core": 0,
    "extras": 1,
    "methods": 2,
    "compose": 3, "prune": 3, "surgery": 3, "train": 3, "arithmetic": 3,
    "ensembles": 4, "eval": 4,
    "data": 5,
    "recipes": 6,
    "config_file": 7, "demo": 7, "merged": 7, "serve": 7,
    "compare": 8,
    "cli": 9,
    "": 10,  # deltatune/__init__.py: the public API, and where built-in methods get registered
}
# the CLI imports its commands lazily so that `deltatune --help` stays fast
LAZY_OK = {"deltatune.cli"}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path):
    """(imported module, ast node, inside a function?) for every import of our own package."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if n is not f}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[:len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            targets = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("deltatune"):
            targets = [node.module]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("deltatune")]
        else:
            continue
        for t in targets:
            yield t, node, id(node) in in_function


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _sources():
    return sorted(SRC.rglob("*.py"))


def test_imports_point_down():
    upward = []
    for path in _sources():
        here = _module_name(path)
        for target, node, _ in _imports(path):
            a, b = _layer(here), _layer(target)
            assert a in LAYERS and b in LAYERS, f"{here} or {target}: add its package to LAYERS"
            if a != b and LAYERS[b] >= LAYERS[a]:
                upward.append(f"{path.relative_to(SRC)}:{node.lineno} ({a}) imports {target} ({b})")
    assert not upward, "imports pointing up or sideways:\n" + "\n".join(upward)


def test_no_imports_inside_functions_to_dodge_cycles():
    inside = [f"{path.relative_to(SRC)}:{node.lineno} imports {target}"
              for path in _sources() if _module_name(path) not in LAZY_OK
              for target, node, in_function in _imports(path) if in_function]
    assert not inside, "function-level imports of our own modules:\n" + "\n".join(inside)


def test_module_graph_has_no_cycles():
    graph = {}
    for path in _sources():
        graph.setdefault(_module_name(path), set()).update(t for t, _, lazy in _imports(path) if not lazy)
    # an edge to "pkg.name" that names an attribute of a package points at that package
    known = set(graph)
    graph = {m: {t if t in known else t.rpartition(".")[0] for t in ts} for m, ts in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            # a package's __init__ importing its own submodules is how registration works
            if t.startswith(m + "."):
                continue
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_core_imports_alone_and_registers_nothing():
    # load deltatune.core without running deltatune/__init__.py (which registers the methods)
    code = f"""
import sys, types
pkg = types.ModuleType("deltatune"); pkg.__path__ = [{str(SRC)!r}]; sys.modules["deltatune"] = pkg
import deltatune.core.model, deltatune.core.files, deltatune.core.setup, deltatune.core.registry as registry
loaded = sorted(m for m in sys.modules if m.startswith("deltatune.") and not m.startswith("deltatune.core"))
assert not loaded, loaded
assert registry.method_names() == [], registry.method_names()
import deltatune.methods
assert "lora" in registry.method_names()
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
