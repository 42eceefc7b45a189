"""The layering of the code base: imports run one way, low to high, and no module grows past a readable size.

    pallas_kernels < model < sharding < checkpoints < serving < planner      (bench/, tools/, tests/ on top)

Every import statement counts, lazy ones inside functions too; there is no exceptions list.
"""

import ast
import os
import pathlib
import re
import subprocess
import sys

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


EXTRAS_ONLY = {"torch", "transformers", "httpx", "matplotlib", "optax", "openai", "dynamo"}   # the extras
EXTRA_MODULES = {"serving/dynamo.py"}   # an extra's own integration module (its import error names the extra)


def test_runtime_packages_need_no_extra_at_import():
    """The runtime install is lean: no module of the runtime packages imports an extra-only library at module
    level (a lazy, guarded import inside a function, like the planner's optional plot, is fine)."""
    bad = []
    for pkg in LAYERS:
        for f in _sources(pkg):
            if str(f.relative_to(ROOT)) in EXTRA_MODULES:
                continue
            for node in ast.parse(f.read_text()).body:   # module level only
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
                bad += [f"{f.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in EXTRAS_ONLY]
    assert bad == []


ENTRY_POINTS = ("serving.batch", "serving.server", "serving.worker", "serving.dynamo", "bench.engine_speed")


def _engine_flag_help(module: str) -> str:
    """The `serving.flags` section of `python -m MODULE --helpfull` (absl groups flags by defining module)."""
    out = subprocess.run([sys.executable, "-m", module, "--helpfull"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    text = out.stdout + out.stderr
    start = text.index("serving.flags:")
    end = re.search(r"\n\S", text[start + 1:])
    return text[start: start + 1 + end.start()] if end else text[start:]


def _blocks(section: str) -> dict[str, str]:
    """{flag name: its help block} of a --helpfull section."""
    return {m.group(1): m.group(0).rstrip() for m in re.finditer(r"  --(?:\[no\])?(\w+):.*?(?=\n  --|\Z)", section, re.S)}


def test_every_entry_point_has_the_same_engine_flags_and_defaults():
    """One flag definer: the batch job, the server, the worker and the engine bench show the same engine flags
    with the same defaults and help (the server now takes --quant, --cache_dtype, --kv_memory_fraction too);
    the batch job and the server also share the pool flags (mode, meshes, workers)."""
    blocks = {m: _blocks(_engine_flag_help(m)) for m in ENTRY_POINTS}
    engine = {"checkpoint", "dtype", "quant", "cache_dtype", "page_size", "num_pages", "kv_memory_fraction",
              "device_memory_gb", "max_model_len", "max_batch", "decode_buckets", "prefill_buckets", "decode_steps",
              "prefill_budget", "prefill_budget_max", "prefill_drain_steps", "mtp", "prefix_caching", "kv_host_pages",
              "kv_disk_pages", "kv_disk_dir"}
    first = blocks["serving.batch"]
    assert "(default: '0')" in first["num_pages"] and "float32 on CPU" in first["dtype"]
    for m, b in blocks.items():
        assert {k: b.get(k) for k in engine} == {k: first[k] for k in engine}, m
    assert blocks["serving.server"] == first   # pool flags too


@pytest.mark.parametrize("pkg", LAYERS)
def test_no_module_over_600_lines(pkg):
    long = {str(f.relative_to(ROOT)): n for f in _sources(pkg)
            if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert long == {}
