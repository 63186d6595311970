"""The package's import rules, read from the source: the model depends on nothing above it, and no module
imports an entry point (the `notellm` dispatcher or a `__main__`), except the `__main__` guards that are the
`python -m` forms."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "notellm_jax"
MODEL_MAY_NOT_IMPORT = ("notellm_jax.config", "notellm_jax.data", "notellm_jax.weights", "notellm_jax.eval",
                        "notellm_jax.train", "notellm_jax.job")
ENTRY_POINTS = ("notellm_jax.main", "notellm_jax.__main__")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
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


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_is_found():
    names = {module_name(p) for p in MODULES}
    assert {"notellm_jax.model.llama", "notellm_jax.main", "notellm_jax.train.trainer"} <= names


@pytest.mark.parametrize("path", [p for p in MODULES if module_name(p).startswith("notellm_jax.model")],
                         ids=module_name)
def test_model_imports_nothing_above_it(path):
    bad = [(line, m) for line, m in imports(path) if m.startswith(MODEL_MAY_NOT_IMPORT)]
    assert not bad, f"{path}: model/ must not import {bad}"


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "__main__.py" and p.name != "main.py"],
                         ids=module_name)
def test_nothing_imports_an_entry_point(path):
    bad = [(line, m) for line, m in imports(path)
           if m in ENTRY_POINTS or m.endswith(".__main__") or m.startswith("notellm_jax.main.")]
    assert not bad, f"{path}: imports an entry point {bad}"


def test_the_rule_checker_sees_violations(tmp_path):
    """The checker itself: an import inside a function counts, one inside the __main__ guard does not."""
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from notellm_jax.config import Config\n"
                      "if __name__ == '__main__':\n    from notellm_jax.main import main\n")
    assert [m for _, m in imports(sample)] == ["notellm_jax.config", "notellm_jax.config.Config"]
    assert "notellm_jax.main" in [m for _, m in imports(sample, skip_main_guard=False)]


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
