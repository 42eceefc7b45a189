"""Compiled executables on disk (`serving.exec_cache`): a restart loads every executable without tracing,
lowering or compiling and generates the same tokens; a corrupt, truncated, stale or misplaced entry is detected,
recompiled and replaced — never loaded."""

import pathlib

import jax.numpy as jnp
import pytest

import checkpoints
import hf_reference
from serving import LLM, EngineConfig, SamplingParams
from serving import exec_cache
from serving.engine import Engine

EC = dict(page_size=8, num_pages=24, max_model_len=32, prefill_buckets=(8,), prefill_rows=(1,), decode_buckets=(2,),
          decode_steps=2, decode_windows=(4,))
PROMPTS = [[5, 17, 3, 44, 12, 9, 61, 2, 30, 30, 7], [3, 1, 4]]
GREEDY = SamplingParams(max_tokens=6)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("exec_cache_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=64), seed=5)
    return path


def _tokens(llm):
    return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


def _engines(llm):
    return {"prefill": llm.prefill_engine, "decode": llm.decode_engine}.items()


def _no_tracing(monkeypatch):
    def traced(self, *a, **k):
        raise AssertionError("an executable was traced and lowered although the cache holds it")
    monkeypatch.setattr(Engine, "_lower", traced)


def test_a_restart_loads_every_executable_without_tracing(ckpt, tmp_path, monkeypatch):
    """Disaggregated (prefill tp=2 -> decode ep=2, f32): the second start finds every executable; tokens equal."""
    ec = EngineConfig(**EC, executable_cache_dir=str(tmp_path / "exe"))
    kw = dict(mode="disagg", prefill_mesh="tp=2", decode_mesh="ep=2", engine_config=ec, dtype="float32")
    with LLM(ckpt, **kw) as llm:
        first = _tokens(llm)
        cold = {n: dict(e.exec_cache_stats) for n, e in _engines(llm)}
    for s in cold.values():
        assert s["hits"] == 0 and s["stored"] == s["misses"] > 0, cold
    with monkeypatch.context() as m:
        _no_tracing(m)
        with LLM(ckpt, **kw) as llm:
            assert _tokens(llm) == first
            warm = {n: dict(e.exec_cache_stats) for n, e in _engines(llm)}
    for name, s in warm.items():
        assert s["hits"] == cold[name]["stored"] and s["misses"] == s["stored"] == 0, warm
    assert (tmp_path / "exe").stat().st_mode & 0o077 == 0   # private: entries are code


def _repack(path: pathlib.Path, edit) -> None:
    header, payload = exec_cache._unpack(path.read_bytes())
    path.write_bytes(exec_cache._pack(edit(header), payload))


def test_bad_entries_are_recompiled_and_replaced_never_loaded(ckpt, tmp_path):
    model = checkpoints.load(ckpt, dtype=jnp.float32)
    ec = EngineConfig(**{**EC, "prefill_buckets": (8, 16), "decode_windows": (2, 4)},   # 2 prefill + 2 decode
                      executable_cache_dir=str(tmp_path / "exe"))
    with LLM(model=model, engine_config=ec) as llm:
        reference = _tokens(llm)
        n = llm.decode_engine.exec_cache_stats["stored"]
    files = sorted((tmp_path / "exe").glob("*.exe"))
    assert len(files) == n == 4
    corrupt, truncated, stale, misplaced = files[:4]
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2] ^= 0x40   # one bit inside the serialized executable
    corrupt.write_bytes(bytes(data))
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    misplaced.write_bytes(stale.read_bytes())   # a valid entry of another executable under this one's name
    _repack(stale, lambda h: {**h, "versions": {**h["versions"], "jax": "0.0.1"}})   # written by another jax
    with LLM(model=model, engine_config=ec) as llm:
        assert _tokens(llm) == reference
        s = llm.decode_engine.exec_cache_stats
    assert (s["corrupt"], s["stale"], s["hits"], s["stored"]) == (3, 1, n - 4, 4), s
    assert exec_cache._unpack(stale.read_bytes())[0]["versions"] == exec_cache.versions()   # replaced
    with LLM(model=model, engine_config=ec) as llm:   # every replaced entry now loads
        assert llm.decode_engine.exec_cache_stats["hits"] == n


_STARTS = """
import json, sys
import jax
jax.config.update("jax_compilation_cache_dir", sys.argv[2])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
from serving import LLM, EngineConfig, SamplingParams
kw = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(sys.argv[3]).items()}
ec = EngineConfig(**kw, executable_cache_dir=sys.argv[4] or None)
with LLM(sys.argv[1], engine_config=ec, dtype="float32") as llm:
    toks = [o.token_ids for o in llm.generate(json.loads(sys.argv[5]), SamplingParams(max_tokens=6))]
    print("RESULT", json.dumps([toks, llm.decode_engine.exec_cache_stats]))
"""


def test_entries_written_while_xla_persistent_cache_is_warm_run(ckpt, tmp_path):
    """XLA's own persistent cache filled first (a worker started with --compilation_cache_dir before): the
    executable cache must still store executables that run (one loaded from XLA's cache re-serializes broken on
    XLA:CPU), so a third start loads them and generates the same tokens. Fresh processes: the cache is global."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    xla, exe = str(tmp_path / "xla"), str(tmp_path / "exe")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1 "
               + os.environ["TANDEM_TEST_XLA_FLAGS"], JAX_PLATFORMS="cpu", PYTHONPATH=root)
    out = []
    for exe_dir in ("", exe, exe):   # XLA cache filled; executables stored (XLA cache warm); loaded
        r = subprocess.run([sys.executable, "-c", _STARTS, ckpt, xla, json.dumps(EC), exe_dir, json.dumps(PROMPTS)],
                           cwd=root, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out.append(json.loads(r.stdout.split("RESULT ", 1)[1]))
    assert out[1][1]["stored"] == out[2][1]["hits"] > 0 and out[2][1]["misses"] == 0, out
    assert out[0][0] == out[1][0] == out[2][0]
