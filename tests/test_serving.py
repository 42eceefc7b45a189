"""The serving engine as a user sees it: `LLM.generate` over paged caches, colocated and disaggregated.

Correctness gates: greedy through the engine == teacher-forced argmax; disaggregated == colocated token for
token (two mesh pairs); staggered arrivals == one request at a time; pages all come back after aborts; no
compilation on the request path.
"""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import hf_reference
import overlap
from model.runtime import Runtime
from serving import LLM, EngineConfig, SamplingParams

# prefill_rows (1, 2): two 8-token chunks of different requests prefill in one call (batched prefill)
EC = EngineConfig(page_size=8, num_pages=48, max_model_len=64, prefill_buckets=(8, 16), decode_buckets=(2, 4),
                  decode_steps=3, prefill_rows=(1, 2))
PROMPTS = [[5, 17, 3, 44, 12, 9, 61, 2, 30, 30, 7, 1, 88, 15, 4, 27, 51, 19, 6, 40],  # > largest bucket: chunked
           [3, 1, 4], [9, 2, 6, 5, 35, 8, 9, 7, 9]]
N_NEW = 8


@pytest.fixture(scope="session")
def ckpt_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("serving_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11)
    return path


@pytest.fixture(scope="session")
def model(ckpt_path):
    return checkpoints.load(ckpt_path, dtype=jnp.float32)


@pytest.fixture(scope="session")
def colocated(model):
    # prefill and decode attention block by block, one page per block: a 20-token prompt spans 3 blocks and its
    # second chunk reads the first chunk's blocks back; decode reads up to 4 blocks (the defaults, 256 / 128
    # tokens, would be one block at these sizes)
    llm = LLM(model=model, engine_config=EC, runtime=Runtime(prefill_block=EC.page_size, decode_block=EC.page_size))
    yield llm
    llm.close()


def _check_pages(llm):
    for name, pool in llm.page_pools().items():
        a = pool.allocator
        a.check()
        assert a.free == a.total and a.used == 0 and a.leased == 0, (name, a.free, a.used, a.leased)


def test_greedy_through_engine_equals_teacher_forced_argmax(colocated, model, monkeypatch):
    eng = colocated.decode_engine
    assert "blockwise_prefill" in eng._layout(np.zeros((1, 8), np.int32), np.ones((1, 4), bool), prefill=True).capabilities
    assert "blockwise_decode" in eng._layout(np.zeros((2, 8), np.int32), np.ones((2, 1), bool), kernel=True).capabilities
    rows, batch = [], eng.prefill_batch
    monkeypatch.setattr(eng, "prefill_batch", lambda items: rows.append(len(items)) or batch(items))
    outs = colocated.generate(PROMPTS, SamplingParams(max_tokens=N_NEW))
    assert [o.token_ids for o in outs] == hf_reference.argmax_rollout(model, PROMPTS, N_NEW)
    # the 20-token prompt's first chunk (16) with the 9-token prompt (16-bucket), then its second chunk (4 tokens
    # after 16) with the 3-token prompt: two 2-row calls
    assert rows == [2, 2], rows
    assert all(o.finish_reason == "length" for o in outs)
    _check_pages(colocated)


@pytest.mark.parametrize("prefill_mesh,decode_mesh", [("tp=2", "ep=4"), ("tp=1", "dp=2,ep=2")])
def test_disaggregated_equals_colocated(colocated, model, prefill_mesh, decode_mesh):
    params = [SamplingParams(max_tokens=N_NEW), SamplingParams(max_tokens=N_NEW, temperature=0.8, top_p=0.9,
                                                              seed=123), SamplingParams(max_tokens=5)]
    want = colocated.generate(PROMPTS, params)
    one_window = EngineConfig(**{**EC.__dict__, "decode_windows": (8,)})   # windows are not what this tests
    with LLM(model=model, engine_config=one_window, mode="disagg", prefill_mesh=prefill_mesh,
             decode_mesh=decode_mesh) as llm:
        assert llm.prefill_engine.mesh.devices.size + llm.decode_engine.mesh.devices.size <= 8
        assert not set(llm.prefill_engine.mesh.devices.flat) & set(llm.decode_engine.mesh.devices.flat)
        got = llm.generate(PROMPTS, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        assert all(o.metrics.ttft_s > 0 and o.metrics.prefill_s > 0 for o in got)
        _check_pages(llm)


def test_disaggregated_prefill_batches_what_is_queued(colocated, model, monkeypatch):
    """The prefill thread takes every queued request (up to the largest row bucket, 2 here) and runs their chunks
    of one bucket in one call; tokens equal colocated. A blocker request holds the thread while four others queue,
    so the batches are known: [A, B] (both T=8: one 2-row call), [C, D] (T=16 together, then C's 8-token tail)."""
    X, A, B, C, D = [4, 4, 2], [3, 1, 4], [2, 7, 1, 8, 2], PROMPTS[0], PROMPTS[2]
    want = [o.token_ids for o in colocated.generate([X, A, B, C, D], SamplingParams(max_tokens=N_NEW))]
    one_window = EngineConfig(**{**EC.__dict__, "decode_windows": (8,)})
    with LLM(model=model, engine_config=one_window, mode="disagg", prefill_mesh="tp=1", decode_mesh="ep=2") as llm:
        eng, rows, gate = llm.prefill_engine, [], threading.Event()
        batch = eng.prefill_batch

        def recording(items):
            rows.append(len(items))
            if len(rows) == 1:
                assert gate.wait(60)
            return batch(items)

        monkeypatch.setattr(eng, "prefill_batch", recording)
        reqs = [llm.submit(X, SamplingParams(max_tokens=N_NEW))]
        for _ in range(600):
            if rows:
                break
            time.sleep(0.01)
        reqs += [llm.submit(p, SamplingParams(max_tokens=N_NEW)) for p in (A, B, C, D)]
        gate.set()
        for _ in range(10_000):
            if not llm.has_work():
                break
            llm.step(timeout=0.1)
        assert [r.output_ids for r in reqs] == want
        assert rows == [1, 2, 2, 1], rows
        assert llm.scheduler.prefill_stats == {"prefill_calls": 4, "prefill_rows": 6}
        _check_pages(llm)


def test_disaggregated_does_not_resend_pages_the_decode_cache_holds(colocated, model):
    """Multi-turn: after turn 1 the decode side's prefix cache holds the blocks of prompt + answer; turn 2's
    prompt starts with them, so the prefill side sends only the pages after them (3 of 4 not sent) and the decode
    side writes only those; tokens equal colocated (no cache)."""
    turn1 = PROMPTS[0]
    ans = colocated.generate([turn1], SamplingParams(max_tokens=N_NEW))[0].token_ids
    turn2 = turn1 + ans + [7, 3, 9]                       # 31 tokens: blocks 0-2 cached on the decode side
    want = colocated.generate([turn2], SamplingParams(max_tokens=N_NEW))[0].token_ids
    one_window = EngineConfig(**{**EC.__dict__, "decode_windows": (8,)})
    with LLM(model=model, engine_config=one_window, mode="disagg", prefill_mesh="tp=1", decode_mesh="ep=2",
             prefix_caching=True) as llm:
        assert llm.generate([turn1], SamplingParams(max_tokens=N_NEW))[0].token_ids == ans
        assert llm.scheduler.prefill_stats["pages_not_sent"] == 0
        assert llm.generate([turn2], SamplingParams(max_tokens=N_NEW))[0].token_ids == want
        assert llm.scheduler.prefill_stats["pages_not_sent"] == 3 and not llm.scheduler.prefill_stats["resent"]
        # the decode cache loses blocks between the two sides' looks (forced: the prefill side is told 2 pages are
        # held that are not): the request is prefilled again with every page sent, same tokens
        sched, holds = llm.scheduler, llm.scheduler._decode_holds
        sched._decode_holds = lambda req: 0 if req.send_all else 2
        fresh = PROMPTS[2] + PROMPTS[0][:9]                  # 18 tokens, 3 pages: 2 claimed held
        want3 = colocated.generate([fresh], SamplingParams(max_tokens=N_NEW))[0].token_ids
        assert llm.generate([fresh], SamplingParams(max_tokens=N_NEW))[0].token_ids == want3
        assert sched.prefill_stats["resent"] == 1 and sched.prefill_stats["pages_not_sent"] == 3
        sched._decode_holds = holds
        _check_pages_free_or_cached(llm)


def _check_pages_free_or_cached(llm):
    for name, pool in llm.page_pools().items():
        a = pool.allocator
        a.check()
        assert a.used == 0 and a.leased == 0 and a.free + a.cached == a.total, (name, a.free, a.used, a.cached)


def _teacher_forced(model, seqs, length: int = 40) -> list[np.ndarray]:
    """Teacher-forced logits of each sequence, one compiled forward (sequences right-padded to `length`: causal,
    so padding never changes an earlier position)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    x = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = s
    out = np.asarray(fwd(state, jnp.asarray(x))).astype(np.float32)
    return [out[i, :len(s)] for i, s in enumerate(seqs)]


def test_bf16_disaggregated_differs_from_colocated_only_at_near_ties(ckpt_path):
    """bf16 results depend on the mesh (a TP/EP layout sums partial products in another order), so greedy tokens of
    a disaggregated run may flip where two logits nearly tie. The bound: if the two layouts' logits at a position
    differ by at most delta (inf-norm), their argmaxes can differ only where the colocated top-2 margin is <= 2 delta.
    delta is measured a priori from the teacher-forced logits of the layouts' placed models against one device on
    other sequences (calibration); every divergence must then sit at a margin under 2 delta. A real fault (a page
    not transferred, a wrong position) flips tokens at large margins and fails this."""
    from sharding import DECODE_RULES, PREFILL_RULES, Topology, place

    bf = checkpoints.load(ckpt_path, dtype=jnp.bfloat16)
    rng = np.random.default_rng(7)
    prompts = [rng.integers(2, bf.cfg.vocab_size, int(rng.integers(3, 20))).tolist() for _ in range(8)]
    n_new = 16
    ec = EngineConfig(**{**EC.__dict__, "decode_windows": (8,), "decode_buckets": (8,), "prefill_rows": (1,)})
    sp = SamplingParams(max_tokens=n_new, ignore_eos=True)
    with LLM(model=bf, engine_config=ec) as llm:
        colo = [o.token_ids for o in llm.generate(prompts, sp)]
    with LLM(model=bf, engine_config=ec, mode="disagg", prefill_mesh="tp=2", decode_mesh="ep=4") as llm:
        dis = [o.token_ids for o in llm.generate(prompts, sp)]
    # calibration: other sequences, each layout's placed model vs one device
    calib = [rng.integers(2, bf.cfg.vocab_size, 40).tolist() for _ in range(8)]
    ref = _teacher_forced(bf, calib)
    delta = 0.0
    for spec, rules in (({"tp": 2}, PREFILL_RULES), ({"ep": 4}, DECODE_RULES)):
        mesh = Topology.from_devices().allocate("calib-" + "-".join(spec), **spec)
        for a, b in zip(_teacher_forced(place(bf, mesh, rules), calib), ref):
            delta = max(delta, float(np.abs(a - b).max()))
    bound = 2 * delta
    diverged = 0
    for p, c, d in zip(prompts, colo, dis):
        j = next((i for i, (x, y) in enumerate(zip(c, d)) if x != y), None)
        if j is None:
            continue
        diverged += 1
        logits = _teacher_forced(bf, [p + c[:j]], length=40)[0][-1]
        top2 = np.sort(logits)[-2:]
        assert top2[1] - top2[0] <= bound, (p, j, top2[1] - top2[0], bound)
    print(f"bf16: {diverged}/{len(prompts)} prompts diverged; layout logit delta {delta:.4f}, bound {bound:.4f}")


def test_staggered_arrivals_equal_one_at_a_time(colocated):
    params = SamplingParams(max_tokens=N_NEW, temperature=0.7, seed=5)
    alone = [colocated.generate([p], params)[0].token_ids for p in PROMPTS]
    reqs = []
    for p in PROMPTS:  # a new request joins after every step, while the others are mid-prefill or decoding
        reqs.append(colocated.submit(p, params))
        colocated.step()
    while colocated.scheduler.has_work():
        colocated.step()
    assert [r.output_ids for r in reqs] == alone
    _check_pages(colocated)


def test_overlapped_decode_equals_booking_each_dispatch_first(colocated):
    """Dispatch n+1 queued from dispatch n's tokens still on the device, before the host reads dispatch n (the
    default) == the host reading every dispatch before the next: greedy with a stop token mid-dispatch, seeded
    sampling with logprobs, limits on and off dispatch boundaries, arrivals between steps; pages all back."""
    greedy = colocated.generate([PROMPTS[0]], SamplingParams(max_tokens=20))[0].token_ids
    stop = next(t for i, t in enumerate(greedy) if i >= 8 and i % EC.decode_steps != 0 and t not in greedy[:i])
    params = [SamplingParams(max_tokens=20, stop_token_ids=[stop]),
              SamplingParams(max_tokens=13, temperature=0.8, seed=3, logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=1.0, top_k=5, seed=9, ignore_eos=True)]
    s = colocated.scheduler

    def run():
        reqs = []
        for p, sp in zip(PROMPTS, params):
            reqs.append(colocated.submit(p, sp))
            colocated.step()
        while s.has_work():
            colocated.step()
        return [(r.output_ids, r.finish_reason, r.output_logprobs) for r in reqs]

    on, off = overlap.on_and_off(s, run)
    assert [r[:2] for r in on] == [r[:2] for r in off]
    # logprobs: equal up to the batch buckets' float rounding (the two modes batch rows differently at the ends)
    np.testing.assert_allclose([t.logprob for t in on[1][2]], [t.logprob for t in off[1][2]], atol=1e-5)
    assert [r[1] for r in on] == ["stop", "length", "length"] and on[0][0][-1] == stop
    assert [len(r[0]) for r in on[1:]] == [13, 12] and on[1][2] is not None
    _check_pages(colocated)


def test_aborts_release_every_page(colocated):
    sp = SamplingParams(max_tokens=30)
    reqs = [colocated.submit(p, sp) for p in PROMPTS * 3]  # 9 requests; batch limit 4: some wait
    colocated.step()
    colocated.step()
    waiting = [r for r in reqs if r.status.value == "waiting"]
    running = [r for r in reqs if r.status.value == "running"]
    assert waiting and running
    colocated.abort(waiting[0].id)
    colocated.abort(running[0].id)
    while colocated.scheduler.has_work():
        colocated.step()
    assert {r.finish_reason for r in (waiting[0], running[0])} == {"abort"}
    assert all(r.status.value == "finished" for r in reqs)
    _check_pages(colocated)


def test_admission_is_bounded_by_free_pages(model):
    small = EngineConfig(page_size=8, num_pages=9, max_model_len=64, prefill_buckets=(8, 16),
                         decode_buckets=(4,), decode_steps=3, decode_windows=(8,))  # 8 usable pages: one 20+30-token request at a time
    with LLM(model=model, engine_config=small) as llm:
        reqs = [llm.submit(PROMPTS[0], SamplingParams(max_tokens=30)) for _ in range(3)]
        llm.step()
        assert sum(r.status.value == "waiting" for r in reqs) == 2
        while llm.scheduler.has_work():
            llm.step()
            assert llm.scheduler.pages.allocator.used <= llm.scheduler.pages.allocator.total
        assert [r.finish_reason for r in reqs] == ["length"] * 3
        assert reqs[0].output_ids == reqs[1].output_ids == reqs[2].output_ids
        _check_pages(llm)


_COMPILES: list[str] | None = None


def _listen_for_compiles():
    global _COMPILES
    if _COMPILES is None:   # listeners cannot be removed: register one, switch it on and off
        jax.monitoring.register_event_duration_secs_listener(
            lambda name, *a, **k: _COMPILES.append(name) if _COMPILES is not None and "backend_compile" in name
            else None)
    _COMPILES = []
    return _COMPILES


MIXED = dict(prompts=PROMPTS + [[7] * 40], params=[SamplingParams(max_tokens=N_NEW, temperature=t, top_k=k, seed=1)
                                                  for t, k in ((0, 0), (1.0, 5), (0.5, 0), (0, 0))])


def test_no_compilation_on_the_request_path(colocated):
    compiles = _listen_for_compiles()
    colocated.generate(MIXED["prompts"], MIXED["params"])
    assert compiles == []


@pytest.mark.parametrize("kind", ["disagg", "mtp"])
def test_no_compilation_on_a_fresh_engine(tmp_path_factory, kind):
    """A freshly built engine serves its very first requests (chunked prefill, transfer between meshes, MTP
    verify, sampling) with the executables compiled at start-up only."""
    path = str(tmp_path_factory.mktemp(f"fresh_{kind}"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11,
                       with_mtp=kind == "mtp")
    kw = dict(mode="disagg", prefill_mesh="tp=2", decode_mesh="ep=2") if kind == "disagg" else dict(mtp=True)
    ec = EngineConfig(**{**EC.__dict__, "decode_buckets": (4,), "decode_windows": (4, 8)})   # 2 windows
    with LLM(path, engine_config=ec, **kw) as llm:
        compiles = _listen_for_compiles()
        outs = llm.generate(MIXED["prompts"], MIXED["params"])
        assert compiles == [] and all(o.finish_reason == "length" for o in outs)
        _check_pages(llm)


def test_streaming_events_add_up_to_the_outputs(colocated):
    events = list(colocated.generate_stream(PROMPTS, SamplingParams(max_tokens=N_NEW)))
    per_req, reqs = {}, {}
    for ev in events:
        per_req.setdefault(ev.request.id, []).extend(ev.new_token_ids)
        reqs[ev.request.id] = ev.request
    assert len(per_req) == len(PROMPTS)
    for rid, toks in per_req.items():
        assert toks == reqs[rid].output_ids and len(toks) == N_NEW
    assert sum(ev.finished for ev in events) == len(PROMPTS)
    assert colocated.scheduler.requests == {}   # finished requests are not retained


def test_seeded_sampling_is_reproducible_and_seed_dependent(colocated):
    a = colocated.generate(PROMPTS, SamplingParams(max_tokens=N_NEW, temperature=1.0, seed=7))
    b = colocated.generate(PROMPTS, SamplingParams(max_tokens=N_NEW, temperature=1.0, seed=7))
    c = colocated.generate(PROMPTS, SamplingParams(max_tokens=N_NEW, temperature=1.0, seed=8))
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.token_ids for o in a] != [o.token_ids for o in c]
    greedy = colocated.generate(PROMPTS, SamplingParams(max_tokens=N_NEW))
    top1 = colocated.generate(PROMPTS, SamplingParams(max_tokens=N_NEW, temperature=1.5, top_k=1, seed=3))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy]


def test_top_k_and_top_p_restrict_the_support():
    from serving.sampling import sample

    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
    pos = jnp.arange(4000)
    ones = jnp.ones(4000)
    draw = lambda k, p: np.asarray(sample(logits, pos, ones, jnp.full(4000, k, jnp.int32), jnp.full(4000, p),
                                          jnp.zeros(4000, jnp.int32)))
    free = np.bincount(draw(0, 1.0), minlength=4) / 4000
    assert np.abs(free - [0.5, 0.3, 0.15, 0.05]).max() < 0.03  # plain temperature-1 sampling
    assert set(draw(2, 1.0)) == {0, 1}
    assert set(draw(0, 0.7)) == {0, 1}   # 0.5 < 0.7 <= 0.8: the first two tokens
    assert set(draw(0, 0.5)) == {0}


def test_stop_token_ids_max_tokens_and_ignore_eos(colocated, model):
    greedy = colocated.generate([PROMPTS[1]], SamplingParams(max_tokens=N_NEW))[0].token_ids
    stop_at = greedy[3]
    first = greedy.index(stop_at)
    out = colocated.generate([PROMPTS[1]], SamplingParams(max_tokens=N_NEW, stop_token_ids=[stop_at]))[0]
    assert out.finish_reason == "stop" and out.token_ids == greedy[: first + 1]
    out = colocated.generate([PROMPTS[1]], SamplingParams(max_tokens=2))[0]
    assert out.finish_reason == "length" and out.token_ids == greedy[:2]
    # Pretend greedy[2] is the checkpoint's EOS: it ends the output unless ignore_eos.
    saved = colocated.scheduler.eos_ids
    colocated.scheduler.eos_ids = (greedy[2],)
    try:
        out = colocated.generate([PROMPTS[1]], SamplingParams(max_tokens=N_NEW))[0]
        assert out.finish_reason == "stop" and out.token_ids == greedy[: greedy.index(greedy[2]) + 1]
        out = colocated.generate([PROMPTS[1]], SamplingParams(max_tokens=N_NEW, ignore_eos=True))[0]
        assert out.finish_reason == "length" and out.token_ids == greedy
    finally:
        colocated.scheduler.eos_ids = saved


@pytest.mark.parametrize("field,value", [("max_tokens", 0), ("temperature", -1.0), ("temperature", float("nan")),
                                         ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("seed", -1),
                                         ("stop", [""]), ("stop_token_ids", [-3]), ("ignore_eos", "yes")])
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"SamplingParams.{field}"):
        SamplingParams(**{field: value})


def test_bad_prompts_raise_clear_errors(colocated):
    with pytest.raises(ValueError, match="empty prompt"):
        colocated.generate([[]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        colocated.generate([[1, 10_000]])
    with pytest.raises(ValueError, match="max_model_len"):
        colocated.generate([[1] * 64])
    with pytest.raises(ValueError, match="no tokenizer"):
        colocated.generate(["some text"])
    with pytest.raises(ValueError, match="unknown sampling field"):
        SamplingParams.from_dict({"temprature": 1.0})
