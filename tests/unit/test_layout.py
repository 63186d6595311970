"""The package's import rules, read from the source.

- Layers, lowest first (`LAYERS` below): a module imports only modules of its own layer or lower, function
  bodies and `__main__` guards included; job/, serve/ and tools/ share a layer but never import each other. Each `__init__.py` sits with its package, the top-level
  `notellm_jax/__init__.py` on the ground floor, and every `__main__.py` (an entry point) with main.
- The import graph (module level and lazy imports alike) has no cycle.
- The model depends on nothing above it, not even the run config; no module imports an entry point.
- An import inside a function says why on its line (TensorFlow, Beam, ScaNN, torch ... : a trailing #).
- No function is longer than a screen.
"""
import ast
import io
import tokenize
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "notellm_jax"
MODEL_MAY_NOT_IMPORT = ("notellm_jax.config", "notellm_jax.data", "notellm_jax.weights", "notellm_jax.eval",
                        "notellm_jax.train", "notellm_jax.job")
ENTRY_POINTS = ("notellm_jax.main", "notellm_jax.__main__")
# (layer, rooms), lowest first; a room is a module or a package (with everything below it)
LAYERS = (
    ("errors/runtime", ("notellm_jax.errors", "notellm_jax.runtime")),
    ("sharding/distributed", ("notellm_jax.sharding", "notellm_jax.distributed")),
    ("config", ("notellm_jax.config",)),
    ("model", ("notellm_jax.model",)),
    ("weights", ("notellm_jax.weights",)),
    ("data", ("notellm_jax.data",)),
    ("infer", ("notellm_jax.infer",)),
    ("train", ("notellm_jax.train",)),
    ("eval", ("notellm_jax.eval",)),
    ("job/serve/tools", ("notellm_jax.job", "notellm_jax.serve", "notellm_jax.tools")),
    ("main", ("notellm_jax.main",)),
)
SEALED_LAYERS = ("job/serve/tools",)  # rooms of these layers never import each other


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_main_guard(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def imports(path: Path, skip_main_guard: bool = True) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, function bodies included."""
    tree = ast.parse(path.read_text(), str(path))
    guarded = set()
    if skip_main_guard:
        for node in tree.body:
            if _is_main_guard(node):
                guarded.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in guarded:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module)] + [(node.lineno, f"{node.module}.{a.name}") for a in node.names]
    return found


def package_modules(package: Path = PACKAGE) -> dict[str, Path]:
    """module name -> file, for every module of the package."""
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def internal_imports(path: Path, known: dict[str, Path]) -> list[tuple[int, str]]:
    """(line, module of the package) for every import of the package's own modules in the file: function
    bodies and `__main__` guards included; `from pkg import mod` names the module, else the package."""
    top = next(iter(known)).split(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] == top:
                found.append((node.lineno, name))
    return sorted(set(found))


def layer_of(module: str) -> tuple[int, str, str]:
    """(layer index, layer name, room) of a module of the package."""
    if module.endswith(".__main__") or module in ENTRY_POINTS:
        return len(LAYERS) - 1, LAYERS[-1][0], module
    if module == "notellm_jax":
        return 0, LAYERS[0][0], module
    for index, (name, rooms) in enumerate(LAYERS):
        for room in rooms:
            if module == room or module.startswith(room + "."):
                return index, name, room
    raise KeyError(f"{module} belongs to no layer: add it to LAYERS in {Path(__file__).name}")


def layer_violations(package: Path = PACKAGE) -> list[str]:
    """`file:line -> module (layer imports higher layer)` for every import that runs up or across a sealed layer."""
    known = package_modules(package)
    bad = []
    for module, path in known.items():
        index, name, room = layer_of(module)
        for line, target in internal_imports(path, known):
            t_index, t_name, t_room = layer_of(target)
            where = f"{path.relative_to(package.parent)}:{line} -> {target}"
            if t_index > index:
                bad.append(f"{where} ({name} imports {t_name}, a higher layer)")
            elif t_index == index and name in SEALED_LAYERS and t_room != room:
                bad.append(f"{where} ({room} imports {t_room}: rooms of {name} never import each other)")
    return sorted(bad)


def import_cycles(package: Path = PACKAGE) -> list[str]:
    """One cycle per strongly connected group of modules, as `a (file:line) -> b (file:line) -> ... -> a`."""
    known = package_modules(package)
    edges = {m: {} for m in known}
    for module, path in known.items():
        for line, target in internal_imports(path, known):
            if target != module:
                edges[module].setdefault(target, f"{path.relative_to(package.parent)}:{line}")
    cycles, done = [], set()
    for start in sorted(known):
        if start in done:
            continue
        path = _cycle_through(start, edges)
        if path:
            done.update(path)
            cycles.append(" -> ".join(f"{a} ({edges[a][b]})" for a, b in zip(path, path[1:] + path[:1]))
                          + f" -> {path[0]}")
    return cycles


def _cycle_through(start: str, edges: dict[str, dict[str, str]]) -> list[str] | None:
    """The shortest import path from `start` back to itself (breadth first), or None."""
    parents, frontier = {}, [start]
    while frontier:
        following = []
        for module in frontier:
            for target in sorted(edges[module]):
                if target == start:
                    path = [module]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return path[::-1]
                if target not in parents:
                    parents[target] = module
                    following.append(target)
        frontier = following
    return None


def uncommented_lazy_imports(package: Path = PACKAGE) -> list[str]:
    """`file:line: import` for every import inside a function body without a trailing # comment saying why."""
    bad = []
    for path in package_modules(package).values():
        source = path.read_text()
        commented = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                     if tok.type == tokenize.COMMENT}
        for node in ast.walk(ast.parse(source, str(path))):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if (isinstance(inner, (ast.Import, ast.ImportFrom))
                        and not commented & set(range(inner.lineno, inner.end_lineno + 1))):
                    bad.append((str(path.relative_to(package.parent)), inner.lineno, ast.unparse(inner)))
    return [f"{file}:{line}: {code}" for file, line, code in sorted(set(bad))]


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_found():
    names = {module_name(p) for p in MODULES}
    assert {"notellm_jax.model.llama", "notellm_jax.main", "notellm_jax.train.trainer"} <= names


def test_every_module_has_a_layer():
    for name in package_modules():
        layer_of(name)


def test_no_import_runs_up_the_layers():
    bad = layer_violations()
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_the_import_graph_has_no_cycle():
    cycles = import_cycles()
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_every_lazy_import_says_why():
    """Imports belong at the top of the module; one inside a function (because the target pulls in
    TensorFlow, Beam, ScaNN, torch, or must wait for fake devices) carries a trailing comment saying so."""
    bad = uncommented_lazy_imports()
    assert not bad, "imports inside functions without a comment saying why:\n" + "\n".join(bad)


def test_only_entry_points_have_a_main_guard():
    """The `python -m` forms are the `__main__.py` files; library modules have no `__main__` shims."""
    bad = [module_name(p) for p in MODULES if p.name != "__main__.py"
           and any(_is_main_guard(node) for node in ast.parse(p.read_text()).body)]
    assert not bad, f"`if __name__ == '__main__'` outside __main__.py: {bad}"


@pytest.mark.parametrize("path", [p for p in MODULES if module_name(p).startswith("notellm_jax.model")],
                         ids=module_name)
def test_model_imports_nothing_above_it(path):
    bad = [(line, m) for line, m in imports(path) if m.startswith(MODEL_MAY_NOT_IMPORT)]
    assert not bad, f"{path}: model/ must not import {bad}"


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "__main__.py" and p.name != "main.py"],
                         ids=module_name)
def test_nothing_imports_an_entry_point(path):
    bad = [(line, m) for line, m in imports(path, skip_main_guard=False)
           if m in ENTRY_POINTS or m.endswith(".__main__") or m.startswith("notellm_jax.main.")]
    assert not bad, f"{path}: imports an entry point {bad}"


def test_the_rule_checker_sees_violations(tmp_path):
    """The checker itself: an import inside a function counts, one inside the __main__ guard does not."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from notellm_jax.config import Config\n"
                      "if __name__ == '__main__':\n    from notellm_jax.main import main\n")
    assert [m for _, m in imports(sample)] == ["notellm_jax.config", "notellm_jax.config.Config"]
    assert "notellm_jax.main" in [m for _, m in imports(sample, skip_main_guard=False)]


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root / "notellm_jax"


def test_the_layer_checker_sees_upward_sealed_and_lazy_violations(tmp_path):
    """A lazy import of a higher layer, an import across job/serve/tools, a shim into main: each named."""
    package = _write(tmp_path, {
        "notellm_jax/__init__.py": "",
        "notellm_jax/main.py": "from notellm_jax.train import step\n",
        "notellm_jax/config.py": "from notellm_jax import errors\n",
        "notellm_jax/errors.py": "",
        "notellm_jax/model/__init__.py": "",
        "notellm_jax/model/params.py": "import jax\n\n\ndef f():\n    from notellm_jax.train.step import g  # why\n",
        "notellm_jax/train/__init__.py": "",
        "notellm_jax/train/step.py": "from notellm_jax.model import params\nfrom notellm_jax.config import X\n",
        "notellm_jax/serve/cli.py": "from notellm_jax.tools.plan import plan\n",
        "notellm_jax/tools/plan.py": "from notellm_jax.train import step\n",
        "notellm_jax/data/shim.py": "if __name__ == '__main__':\n    from notellm_jax.main import main\n"})
    assert layer_violations(package) == [
        "notellm_jax/data/shim.py:2 -> notellm_jax.main (data imports main, a higher layer)",
        "notellm_jax/model/params.py:5 -> notellm_jax.train.step (model imports train, a higher layer)",
        "notellm_jax/serve/cli.py:1 -> notellm_jax.tools.plan (notellm_jax.serve imports notellm_jax.tools: "
        "rooms of job/serve/tools never import each other)"]
    with pytest.raises(KeyError, match="notellm_jax.nowhere belongs to no layer"):
        layer_of("notellm_jax.nowhere")


def test_the_cycle_checker_names_a_cycle_with_lazy_edges(tmp_path):
    package = _write(tmp_path, {
        "notellm_jax/__init__.py": "",
        "notellm_jax/data/__init__.py": "",
        "notellm_jax/data/a.py": "from notellm_jax.data import b\n",
        "notellm_jax/data/b.py": "def f():\n    from notellm_jax.data.c import g  # TensorFlow\n",
        "notellm_jax/data/c.py": "import notellm_jax.data.a\n",
        "notellm_jax/data/d.py": "from notellm_jax.data import a\n"})
    assert import_cycles(package) == [
        "notellm_jax.data.a (notellm_jax/data/a.py:1) -> notellm_jax.data.b (notellm_jax/data/b.py:2) -> "
        "notellm_jax.data.c (notellm_jax/data/c.py:1) -> notellm_jax.data.a"]


def test_the_comment_checker_sees_a_silent_lazy_import(tmp_path):
    package = _write(tmp_path, {
        "notellm_jax/__init__.py": "import os\n",
        "notellm_jax/x.py": "def f():\n    import tensorflow as tf  # TensorFlow: only for this stage\n"
                            "    from notellm_jax import (\n        errors,  # why\n    )\n\n\n"
                            "def g():\n    def h():\n        import json\n    return h\n"})
    assert uncommented_lazy_imports(package) == ["notellm_jax/x.py:10: import json"]


MAX_FUNCTION_LINES = 60


def test_no_function_is_longer_than_a_screen():
    long = []
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{module_name(path)}.{node.name}: {length} lines")
    assert not long, long
