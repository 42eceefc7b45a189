"""The layering of the code base: imports run one way, low to high, and no module grows past a readable size.

    pallas_kernels < model < sharding < checkpoints < serving < planner      (bench/, tools/, tests/ on top)

Every import statement counts, lazy ones inside functions too; there is no exceptions list.
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAYERS = ("pallas_kernels", "model", "sharding", "checkpoints", "serving", "planner")
ON_TOP = ("bench", "tools", "tests")
MAX_LINES = 600


def _sources(pkg: str) -> list[pathlib.Path]:
    return sorted((ROOT / pkg).rglob("*.py"))


def _imports(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in the file, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return out


def upward_imports(root: pathlib.Path = ROOT) -> list[str]:
    rank = {p: i for i, p in enumerate(LAYERS)}
    bad = []
    for pkg in LAYERS:
        for f in sorted((root / pkg).rglob("*.py")):
            for line, top in _imports(f):
                if top in ON_TOP or (top in rank and rank[top] > rank[pkg]):
                    bad.append(f"{f.relative_to(root)}:{line} imports {top} ({pkg} sits below it)")
    return bad


def test_imports_run_one_way():
    assert upward_imports() == []


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """Control: a lazy import of serving inside model/ is reported."""
    for pkg in LAYERS:
        (tmp_path / pkg).mkdir()
    (tmp_path / "model" / "m.py").write_text("def f():\n    from serving.engine import Engine\n    return Engine\n")
    (tmp_path / "planner" / "p.py").write_text("import serving\nimport model\n")       # downward: fine
    assert upward_imports(tmp_path) == ["model/m.py:2 imports serving (model sits below it)"]


EXTRAS_ONLY = {"torch", "transformers", "httpx", "matplotlib", "optax", "openai"}   # test / bench / train extras


def test_runtime_packages_need_no_extra_at_import():
    """The runtime install is lean: no module of the runtime packages imports an extra-only library at module
    level (a lazy, guarded import inside a function, like the planner's optional plot, is fine)."""
    bad = []
    for pkg in LAYERS:
        for f in _sources(pkg):
            for node in ast.parse(f.read_text()).body:   # module level only
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                bad += [f"{f.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in EXTRAS_ONLY]
    assert bad == []
