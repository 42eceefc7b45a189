"""Data-parallel attention decode: every (dp, ep) device of a decode mesh is an attention rank owning its rows and
their KV pages (the cache's page axis split over the ranks), with the routed experts spread over all of them.

Specification: greedy output equals the single-device engine token for token (dp=2,ep=4 and dp=4,ep=2, colocated
and disaggregated, XLA and the paged Pallas kernel); the compiled decode step moves no cache page or window
between ranks (a control with unsplit rows trips the check); DP prefill broadcasts each row's window; KV
capacity grows linearly with the ranks; every page comes back.
"""

import dataclasses
import re

import jax.numpy as jnp
import pytest

import checkpoints
import hf_reference
from model.runtime import Runtime
from serving import LLM, EngineConfig, SamplingParams

EC = EngineConfig(page_size=8, num_pages=24, max_model_len=64, prefill_buckets=(8, 16), decode_buckets=(8, 16),
                  decode_steps=3, decode_windows=(8,),        # one attention window: fewer executables to compile
                  prefill_rows=(1, 2))                        # batched prefill: rows of different ranks in one call
PROMPTS = [[5, 17, 3, 44, 12, 9, 61, 2, 30, 30, 7, 1, 88, 15, 4, 27, 51, 19, 6, 40], [3, 1, 4],
           [9, 2, 6, 5, 35, 8, 9, 7, 9], [11, 12, 13], [2] * 12, [70, 71], [33, 34, 35, 36, 37], [8, 9],
           [90, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [44]]
N_NEW = 8


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("dp_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11)
    return checkpoints.load(path, dtype=jnp.float32)


@pytest.fixture(scope="module")
def reference(model):
    with LLM(model=model, engine_config=EC) as llm:
        assert llm.decode_engine.ranks == 1
        return [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=N_NEW))]


def _check_pages(llm):
    for name, pool in llm.page_pools().items():
        pool.allocator.check()
        assert pool.allocator.free == pool.allocator.total, name


@pytest.mark.parametrize("mesh", ["dp=2,ep=4", "dp=4,ep=2"])
def test_dp_attention_equals_the_single_device_engine(model, reference, mesh):
    with LLM(model=model, engine_config=EC, decode_mesh=mesh) as llm:
        eng = llm.decode_engine
        assert eng.ranks == 8 and llm.scheduler.pages.allocator.total == 8 * (EC.num_pages - 1)
        assert eng.model.runtime.expert_parallel.n_shards == 8          # wide EP over dp x ep
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=N_NEW))
        assert [o.token_ids for o in outs] == reference
        _check_pages(llm)


def test_disaggregated_prefill_lands_in_the_owning_ranks_pages(model, reference):
    with LLM(model=model, engine_config=EC, mode="disagg", prefill_mesh="tp=2", decode_mesh="dp=2,ep=2") as llm:
        assert llm.decode_engine.ranks == 4
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=N_NEW))
        assert [o.token_ids for o in outs] == reference
        _check_pages(llm)


def test_paged_kernel_through_the_dp_engine(model, reference):
    with LLM(model=model, engine_config=EC, decode_mesh="dp=2,ep=2",
             runtime=Runtime(attention_impl="pallas_interpret")) as llm:
        hlo = llm.decode_engine.executables()["decode", 8, 8].as_text()
        assert "paged_mla_decode" in hlo
        outs = llm.generate(PROMPTS[:6], SamplingParams(max_tokens=N_NEW))
        assert [o.token_ids for o in outs] == reference[:6]
        _check_pages(llm)


COLLECTIVE = re.compile(r"= [a-z0-9]+\[([0-9,]*)\][^ ]* (all-gather|all-reduce|reduce-scatter|all-to-all|"
                        r"collective-permute|collective-broadcast)(?:-start)?\(")


def window_collectives(hlo: str, Z: int, C: int, windows) -> list[str]:
    """Collectives of any kind whose result is shaped like cache pages [.., Z, C] or an attention window
    [.., Pw * Z, C] (the latent width C last)."""
    rows = {Z} | {w * Z for w in windows}
    out = []
    for dims, op in COLLECTIVE.findall(hlo):
        d = [int(x) for x in dims.split(",") if x]
        if len(d) >= 2 and d[-1] == C and d[-2] in rows:
            out.append(f"{op} [{dims}]")
    return out


def test_decode_step_moves_no_cache_window_between_ranks(model, monkeypatch):
    with LLM(model=model, engine_config=EC, decode_mesh="dp=2,ep=4") as llm:
        eng = llm.decode_engine
        _, _, Z, C = eng.cache_shape
        decode = {k: e for k, e in eng.executables().items() if k[0] == "decode"}
        assert len(decode) == 2
        for key, exe in decode.items():
            hlo = exe.as_text()
            assert COLLECTIVE.search(hlo), "expected the EP dispatch's collectives in the program"
            assert window_collectives(hlo, Z, C, EC.windows) == [], key
        # Control: rows not split over the ranks (every rank computes every row, the owner's window broadcast by a
        # psum) is caught: the same decode step then all-reduces [B, S, C] windows.
        layout = type(eng)._layout
        monkeypatch.setattr(type(eng), "_layout", lambda self, *a, **k: dataclasses.replace(
            layout(self, *a, **k), split_rows=False))
        bad = eng.lower_decode(8, EC.windows[-1], 1).compile().as_text()
        assert any(w.startswith("all-reduce") for w in window_collectives(bad, Z, C, EC.windows))


def test_dp_prefill_broadcasts_each_rows_window_as_the_readme_says(model):
    """What DP prefill does (README): every rank computes each prefill row and the owning rank's window is
    broadcast to the others by an all-reduce of [rows, S, C] per layer; no page array [.., Z, C] moves."""
    with LLM(model=model, engine_config=EC, decode_mesh="dp=2,ep=4") as llm:
        eng = llm.decode_engine
        _, _, Z, C = eng.cache_shape
        for (_, R, T), exe in ((k, e) for k, e in eng.executables().items() if k[0] == "prefill"):
            found = window_collectives(exe.as_text(), Z, C, EC.windows)
            assert f"all-reduce [{R},{EC.windows[-1] * Z},{C}]" in found, (R, T, found)


def test_kv_capacity_grows_linearly_with_the_ranks(model):
    from serving.engine import Engine
    from serving.pages import PagePool
    from sharding import DECODE_RULES, Topology, place

    caps = {}
    for spec in (dict(ep=1), dict(ep=2), dict(dp=2, ep=2), dict(dp=2, ep=4)):
        mesh = Topology.preset("cpu:8/1").allocate("cap-" + "-".join(map(str, spec.values())), **spec)
        eng = Engine(place(model, mesh, DECODE_RULES), EC, mesh=mesh, compile=False)   # nothing compiled
        caps[eng.ranks] = PagePool(eng).allocator.total   # the scheduler side sizes the pools
        assert eng.cache.shape[1] == eng.ranks * EC.num_pages
        assert eng.cache.sharding.shard_shape(eng.cache.shape)[1] == EC.num_pages    # one pool per device
    assert caps == {1: 23, 2: 46, 4: 92, 8: 184}


def test_admission_places_one_request_per_rank_when_pages_are_tight(model):
    small = EngineConfig(page_size=8, num_pages=9, max_model_len=64, prefill_buckets=(8, 16), decode_buckets=(4,),
                         decode_steps=2, decode_windows=(8,))   # 8 pages per rank: one 20+40-token request a rank
    with LLM(model=model, engine_config=small, decode_mesh="dp=2,ep=2") as llm:
        eng = llm.decode_engine
        reqs = [llm.submit(PROMPTS[0], SamplingParams(max_tokens=40)) for _ in range(eng.ranks + 1)]
        llm.step()
        running = [r for r in reqs if r.status.value != "waiting"]
        assert len(running) == eng.ranks == 4            # one request per rank fits; the last one waits
        assert len({eng.rank_of(r.pages[0]) for r in running}) == 4
        while llm.has_work():
            llm.step()
        assert all(r.finish_reason == "length" for r in reqs)
        assert len({tuple(r.output_ids) for r in reqs}) == 1   # same prompt, same tokens, whichever rank
        _check_pages(llm)
