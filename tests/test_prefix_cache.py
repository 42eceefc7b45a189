"""Prefix caching and the KV tiers: allocator bookkeeping, block hashes, host/disk tiers (incl. corrupt and full
disk), and through the engine: a hit gives the same tokens as a miss, on device, after a spill to host memory, and
after a spill to disk; a corrupt disk block is recomputed, never served; disaggregated prefill caches too."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import hf_reference
from serving import LLM, EngineConfig, SamplingParams
from serving.pages import OutOfPages, PageAllocator
from serving.prefix_cache import CorruptBlock, DiskTier, HostTier, block_hashes


# ---- allocator --------------------------------------------------------------------------------------------------
def test_allocator_caches_shares_and_evicts_lru_never_a_referenced_page():
    a = PageAllocator(7, ranks=1)            # 6 usable pages
    evicted = []
    a.on_evict = evicted.extend
    p1 = a.allocate(3)
    assert a.register(p1, [11, 12, 13]) == 3
    a.check()
    a.release(p1)                            # registered: cached, not free
    assert (a.free, a.cached, a.used) == (3, 3, 0)
    a.check()
    pages, m = a.allocate_prefix([11, 12, 99], 4)   # two blocks hit, two fresh pages
    assert m == 2 and pages[:2] == p1[:2] and a.used == 4 and a.cached == 1
    a.check()
    other = a.allocate(1)                    # the last free page: no eviction yet
    assert evicted == [] and a.free == 0
    b = a.allocate(1)                        # evicts the one unreferenced cached page (block 13)
    assert evicted == [(p1[2], 13)] and a.match([11, 12, 13]) == 2
    with pytest.raises(OutOfPages):          # the rest are referenced: never evicted
        a.allocate(1)
    assert a.allocate_prefix([11], 2) is None
    a.check()
    a.share(pages[:2])                       # a second holder of the shared blocks
    a.release(pages)
    a.release(other + b)
    assert a.used == 2 and a.cached == 0     # still held once
    a.release(pages[:2])
    assert a.cached == 2 and a.free + a.cached == a.total
    a.check()
    # a duplicate block (same hash on another page) is not registered twice
    q = a.allocate(1)
    assert a.register(q, [11]) == 0
    a.release(q)
    a.check()
    with pytest.raises(ValueError):
        a.register([q[0]], [77])             # not held


def test_allocator_ranks_keep_their_own_blocks():
    a = PageAllocator(5, ranks=2)
    p = a.allocate(2, rank=1)
    a.register(p, [1, 2])
    a.release(p)
    assert a.match([1, 2], 1) == 2 and a.match([1, 2], 0) == 0
    assert a.free_in(1) == 4 and a.free_in(0) == 4
    a.check()


def test_block_hashes_chain_and_lookahead():
    t = np.arange(40)
    h = block_hashes(t, 8, 4)
    assert h == block_hashes(np.concatenate([t, [7, 7]]), 8, 4)      # a longer sequence: same leading blocks
    u = t.copy()
    u[3] = 999
    assert all(x != y for x, y in zip(h, block_hashes(u, 8, 4)))     # an early change changes every later key
    v = t.copy()
    v[8] = 999
    h2 = block_hashes(v, 8, 4)
    assert h2[0] == h[0] and h2[1] != h[1]
    assert block_hashes(t, 8, 1, lookahead=1) != block_hashes(v, 8, 1, lookahead=1)   # MTP: next token in the key


# ---- tiers ------------------------------------------------------------------------------------------------------
def test_host_tier_lru_pushes_out_oldest():
    t = HostTier(2)
    blk = lambda i: np.full((2, 4, 3), i, np.float32)
    assert t.put(1, blk(1)) == [] and t.put(2, blk(2)) == []
    assert t.get(1) is not None               # 1 becomes the most recent
    out = t.put(3, blk(3))
    assert [h for h, _ in out] == [2] and len(t) == 2 and t.bytes == 2 * blk(0).nbytes


def test_disk_tier_roundtrip_corrupt_and_full(tmp_path):
    import ml_dtypes
    d = DiskTier(str(tmp_path), capacity=2)
    b1 = (np.arange(24, dtype=np.float32).reshape(2, 4, 3) / 7).astype(ml_dtypes.bfloat16)
    assert d.put(1, b1) == 0
    np.testing.assert_array_equal(d.get(1).astype(np.float32), b1.astype(np.float32))
    assert d.get(1).dtype == b1.dtype
    d.put(2, b1)
    assert d.put(3, b1) == 1 and 1 not in d and len(d) == 2            # full: the oldest file goes
    assert not os.path.exists(tmp_path / f"{1:016x}.kvb")
    # a flipped payload byte: refused, file deleted
    f = tmp_path / f"{2:016x}.kvb"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    with pytest.raises(CorruptBlock, match="checksum"):
        d.get(2)
    assert 2 not in d and not f.exists()
    # a truncated file and a file holding another block's header
    g = tmp_path / f"{3:016x}.kvb"
    g.write_bytes(g.read_bytes()[:20])
    with pytest.raises(CorruptBlock):
        d.get(3)
    d.put(4, b1)
    os.replace(tmp_path / f"{4:016x}.kvb", tmp_path / f"{5:016x}.kvb")
    d2 = DiskTier(str(tmp_path), capacity=2)   # a restart indexes the files already there
    assert 5 in d2
    with pytest.raises(CorruptBlock, match="bad header"):
        d2.get(5)


# ---- through the engine -------------------------------------------------------------------------------------------
EC = EngineConfig(page_size=8, num_pages=17, max_model_len=64, prefill_buckets=(8, 16), decode_buckets=(2, 4),
                  decode_steps=3, decode_windows=(8,),   # one window: fewer executables to compile
                  prefill_tokens=16)                      # and single-row prefill only
SYS = [(7 * i + 3) % 90 + 5 for i in range(24)]                      # a 3-page shared "system prompt"
QUESTIONS = [[11, 4, 9, 30, 2], [8, 8, 1, 60], [3, 14, 15, 92, 6, 5]]
N_NEW = 6


@pytest.fixture(scope="session")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("prefix_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=5)
    return checkpoints.load(path, dtype=jnp.float32)


@pytest.fixture(scope="session")
def reference(model):
    with LLM(model=model, engine_config=EC) as llm:
        yield llm


def _check(llm):
    for name, pool in llm.page_pools().items():
        a = pool.allocator
        a.check()
        assert a.free + a.used + a.leased + a.cached == a.total and a.used == 0 and a.leased == 0


def _same(llm, reference, prompts, params):
    got = llm.generate(prompts, params)
    want = reference.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    _check(llm)
    return got


def test_device_hits_equal_misses_and_multi_turn_reuses_history(model, reference):
    ec = EngineConfig(**{**EC.__dict__, "prefix_caching": True})
    params = [SamplingParams(max_tokens=N_NEW), SamplingParams(max_tokens=N_NEW, temperature=0.9, seed=3)]
    with LLM(model=model, engine_config=ec) as llm:
        first = _same(llm, reference, [SYS + QUESTIONS[0]], params[:1])
        assert first[0].metrics.cached_tokens == 0
        outs = _same(llm, reference, [SYS + q for q in QUESTIONS], [params[0], params[1], params[0]])
        assert [o.metrics.cached_tokens for o in outs] == [24, 24, 24]   # full pages only, last token prefilled
        st = llm.prefix_cache_stats()["decode"]
        assert st["hits_device"] == 9 and st["requests_hit"] == 3
        # multi-turn: history (prompt + answer) resent with a follow-up; the answer's decode-written pages hit
        turn1 = SYS + QUESTIONS[1]
        ans = llm.generate([turn1], params[0])[0].token_ids
        turn2 = turn1 + ans + [17, 23]
        out2 = _same(llm, reference, [turn2], params[:1])[0]
        assert out2.metrics.cached_tokens == (len(turn1) + len(ans) - 1) // 8 * 8 > 24


def test_cache_salt_separates_tenants(model, reference):
    """Two tenants (cache_salt) with the same prompt: no cross hits; each tenant hits its own blocks; an unsalted
    request hits neither. Colocated and disaggregated (the prefill side's cache and the decode side's)."""
    ec = EngineConfig(**{**EC.__dict__, "prefix_caching": True})
    a, b = (SamplingParams(max_tokens=N_NEW, cache_salt=t) for t in ("tenant-a", "tenant-b"))
    for kw in ({}, dict(mode="disagg", prefill_mesh="tp=1", decode_mesh="ep=2")):
        with LLM(model=model, engine_config=ec, **kw) as llm:
            prompt = [SYS + QUESTIONS[0]]
            cached = [_same(llm, reference, prompt, p)[0].metrics.cached_tokens
                      for p in (a, b, a, b, SamplingParams(max_tokens=N_NEW))]
            assert cached == [0, 0, 24, 24, 0], kw


def test_spill_to_host_and_disk_and_reload_equal_recompute(model, reference, tmp_path):
    ec = EngineConfig(**{**EC.__dict__, "prefix_caching": True, "host_cache_pages": 4, "disk_cache_pages": 64,
                         "disk_cache_dir": str(tmp_path)})
    greedy = SamplingParams(max_tokens=N_NEW)
    fillers = [[(13 * i + j * 7) % 90 + 5 for i in range(33)] for j in range(14)]   # 5 pages each, distinct
    with LLM(model=model, engine_config=ec) as llm:
        pc = llm.scheduler.pages.prefix_cache
        hashes = pc.hashes(SYS + QUESTIONS[0])
        _same(llm, reference, [SYS + QUESTIONS[0]], greedy)
        _same(llm, reference, fillers[:4], greedy)      # churn: the system prompt's pages leave the device
        pc.flush()
        a = llm.scheduler.pages.allocator
        assert a.match(hashes) == 0 and all(h in pc.host for h in hashes)
        out = _same(llm, reference, [SYS + QUESTIONS[1]], greedy)[0]
        st = pc.stats()
        assert out.metrics.cached_tokens == 24 and st["hits_host"] == 3 and st["offloaded_host"] >= 3
        # more churn: the host tier (4 pages) overflows into the disk tier (a full disk tier: test_disk_tier_*)
        _same(llm, reference, fillers[4:9], greedy)
        pc.flush()
        st = pc.stats()
        assert st["evicted_host"] > 0 and st["spilled_disk"] == len(pc.disk) > 0 and st["evicted_disk"] == 0
        assert st["host_blocks"] <= 4 and st["disk_bytes"] > 0
        on_disk = [h for h in hashes if h in pc.disk]
        if len(on_disk) < 3:   # make sure the whole system prompt sits on disk for the next two checks
            pytest.fail(f"system prompt blocks not on disk: host {[h in pc.host for h in hashes]}, "
                        f"disk {[h in pc.disk for h in hashes]}, device {a.match(hashes)}")
        out = _same(llm, reference, [SYS + QUESTIONS[2]], greedy)[0]
        assert out.metrics.cached_tokens == 24 and pc.stats()["hits_disk"] == 3
        # push them out again, corrupt the first block's file: it is refused and the prompt recomputed
        _same(llm, reference, fillers[9:14], greedy)
        pc.flush()
        assert a.match(hashes) == 0 and not any(h in pc.host for h in hashes) and all(h in pc.disk for h in hashes)
        path = pc.disk._path(hashes[0])
        raw = bytearray(open(path, "rb").read())
        raw[len(raw) // 2] ^= 0x55
        open(path, "wb").write(bytes(raw))
        out = _same(llm, reference, [SYS + QUESTIONS[0]], greedy)[0]
        assert out.metrics.cached_tokens == 0 and pc.stats()["corrupt"] == 1 and not os.path.exists(path)


def test_disaggregated_prefill_caches(model, reference):
    ec = EngineConfig(**{**EC.__dict__, "prefix_caching": True})
    with LLM(model=model, engine_config=ec, mode="disagg", prefill_mesh="tp=1", decode_mesh="ep=2") as llm:
        _same(llm, reference, [SYS + QUESTIONS[0]], SamplingParams(max_tokens=N_NEW))
        outs = _same(llm, reference, [SYS + q for q in QUESTIONS[1:]], SamplingParams(max_tokens=N_NEW))
        assert [o.metrics.cached_tokens for o in outs] == [24, 24]
        assert llm.prefix_cache_stats()["prefill"]["hits_device"] == 6
