"""MTP speculative decoding: the MTP module drafts one token, the decode executable verifies it.

Specification: greedy output with MTP equals greedy output without it, token for token, colocated and
disaggregated; verification preserves the target distribution under sampling; pages are all returned.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import hf_reference
import overlap
from serving import LLM, EngineConfig, SamplingParams
from serving.sampling import keys_for, speculative_accept
from serving.steps import DeviceRows

EC = EngineConfig(page_size=8, num_pages=48, max_model_len=64, prefill_buckets=(8, 16), decode_buckets=(2, 4),
                  decode_steps=3, decode_windows=(8,), prefill_rows=(1, 2))    # MTP drafts of batched prefill
PROMPTS = [[5, 17, 3, 44, 12, 9, 61, 2, 30, 30, 7, 1, 88, 15, 4, 27, 51, 19, 6, 40], [3, 1, 4],
           [9, 2, 6, 5, 35, 8, 9, 7, 9]]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mtp_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11, with_mtp=True)
    m = checkpoints.load(path, dtype=jnp.float32)
    assert m.cfg.num_nextn_predict_layers == 1
    return m


@pytest.fixture(scope="module")
def baseline(model):
    with LLM(model=model, engine_config=EC) as llm:
        yield llm.generate(PROMPTS, SamplingParams(max_tokens=12))


@pytest.fixture(scope="module")
def mtp_colocated(model):
    with LLM(model=model, engine_config=EC, mtp=True) as llm:
        yield llm


def _check_pages(llm):
    for name, pool in llm.page_pools().items():
        pool.allocator.check()
        assert pool.allocator.free == pool.allocator.total


@pytest.mark.parametrize("mode", ["colocated", "disagg"])
def test_greedy_with_mtp_equals_without(model, baseline, mtp_colocated, mode):
    if mode == "colocated":
        _greedy_with_mtp_equals_without(model, baseline, mtp_colocated)
    else:
        with LLM(model=model, engine_config=EC, mode="disagg", mtp=True, prefill_mesh="tp=2",
                 decode_mesh="tp=1") as llm:
            _greedy_with_mtp_equals_without(model, baseline, llm)


def _greedy_with_mtp_equals_without(model, baseline, llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12))
    assert [o.token_ids for o in outs] == [o.token_ids for o in baseline]
    m = [o.metrics for o in outs]
    assert all(x.spec_proposed > 0 for x in m)
    # Only verify steps whose tokens were kept count: each yields 1 (+1 if accepted) of the tokens after the
    # first (which prefill produced), so proposals never exceed them and proposals + acceptances cover them.
    for x in m:
        assert x.spec_proposed <= x.output_tokens - 1 <= x.spec_proposed + x.spec_accepted
    rate = sum(x.spec_accepted for x in m) / sum(x.spec_proposed for x in m)
    assert 0.0 <= rate <= 1.0
    _check_pages(llm)
    # sampled requests under MTP finish, with in-range tokens, and leave no page behind
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.9, top_k=20, seed=4))
    assert all(len(o.token_ids) == 12 and max(o.token_ids) < model.cfg.vocab_size for o in outs)
    _check_pages(llm)


def test_a_correct_draft_is_accepted_and_yields_two_tokens(model, mtp_colocated):
    """Plant the main model's own next prediction as the draft: the first step must accept it and emit it
    together with the bonus token."""
    from serving.engine import DecodeBatch
    from serving.sampling import sampling_arrays

    llm = mtp_colocated
    ref = llm.generate([PROMPTS[1]], SamplingParams(max_tokens=8))[0].token_ids
    eng = llm.decode_engine
    pages = llm.scheduler.pages.allocator.allocate(eng.pages_needed(len(PROMPTS[1]) + 8))
    samp = sampling_arrays([SamplingParams()], [0])
    out = eng.prefill(np.asarray(PROMPTS[1], np.int32), pages, {k: v[0] for k, v in samp.items()})
    assert out.token == ref[0]
    q = np.zeros((1, model.cfg.vocab_size), np.float32)
    q[0, ref[1]] = 1.0
    batch = DecodeBatch(np.array([ref[0]], np.int32), np.array([len(PROMPTS[1])], np.int32),
                        eng.page_table(pages)[None], samp, np.array([ref[1]], np.int32), q)
    res = eng.generate(batch)
    assert res.accepted[0][0] and res.step_sizes[0][0] == 2 and res.tokens[0][:2] == ref[1:3]
    assert res.tokens[0] == ref[1:1 + len(res.tokens[0])]  # the rest of the dispatch is still greedy
    assert len(res.tokens[0]) == EC.decode_steps + sum(res.accepted[0]) == sum(res.step_sizes[0])
    llm.scheduler.pages.allocator.release(pages)


def test_mtp_on_a_model_without_mtp_is_refused(tmp_path):
    hf_reference.build(str(tmp_path), dict(num_hidden_layers=2), seed=1)
    m = checkpoints.load(str(tmp_path))
    with pytest.raises(ValueError, match="no MTP module"):
        LLM(model=m, engine_config=EC, mtp=True)


def test_rejection_sampling_preserves_the_target_distribution():
    """Draft d ~ q, verify against p: the emitted token must be distributed as p (chi-square, fixed seed)."""
    W, n = 6, 40000
    p = jnp.asarray([0.35, 0.25, 0.2, 0.1, 0.07, 0.03])
    q = jnp.asarray([0.05, 0.4, 0.1, 0.3, 0.1, 0.05])  # a poor drafter: most of the work is in the residual
    seeds = jnp.arange(n, dtype=jnp.int32)
    pos = jnp.full(n, 17, jnp.int32)
    drafts = jax.vmap(lambda k: jax.random.categorical(k, jnp.log(q)))(keys_for(seeds, pos, stream=9))
    tok, ok = jax.jit(speculative_accept)(jnp.broadcast_to(p, (n, W)), jnp.broadcast_to(q, (n, W)),
                                          drafts.astype(jnp.int32), keys_for(seeds, pos, stream=1),
                                          keys_for(seeds, pos, stream=2))
    counts = np.bincount(np.asarray(tok), minlength=W)
    expected = np.asarray(p) * n
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 20.5, (chi2, counts / n)  # 5 d.o.f.: p < 0.001 for a correct sampler
    # acceptance rate equals sum_x min(p, q) in expectation
    assert abs(float(ok.mean()) - float(jnp.minimum(p, q).sum())) < 0.01
    # and the same verification with the draft's own distribution equal to p accepts everything
    tok2, ok2 = speculative_accept(jnp.broadcast_to(p, (n, W)), jnp.broadcast_to(p, (n, W)),
                                   drafts.astype(jnp.int32), keys_for(seeds, pos, stream=1),
                                   keys_for(seeds, pos, stream=2))
    assert bool(ok2.all()) and np.array_equal(np.asarray(tok2), np.asarray(drafts))


def test_overlapped_decode_with_mtp_equals_booking_each_dispatch_first(mtp_colocated):
    """With MTP a dispatch emits S to 2S tokens per row, so the host cannot know where the next one starts: the
    queued dispatch n+1 takes each row's last token, position and draft from dispatch n on the device. Tokens,
    finish reasons and draft acceptance equal the host reading every dispatch first (greedy with a stop token,
    seeded sampling, limits)."""
    llm, s = mtp_colocated, mtp_colocated.scheduler
    greedy = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=20))[0].token_ids
    stop = next(t for i, t in enumerate(greedy) if i >= 8 and t not in greedy[:i])
    params = [SamplingParams(max_tokens=20, stop_token_ids=[stop]),
              SamplingParams(max_tokens=17, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=14, temperature=1.0, top_k=5, seed=9, ignore_eos=True)]

    d_on0 = s.decode_stats["dispatches"]

    def run():
        outs = llm.generate(PROMPTS, params)
        return [(o.token_ids, o.finish_reason, o.metrics.spec_proposed, o.metrics.spec_accepted) for o in outs]

    reads = DeviceRows.reads
    on, off = overlap.on_and_off(s, lambda: (run(), DeviceRows.reads, s.decode_stats["dispatches"]))
    (on, r_on, d_on), (off, r_off, d_off) = on, off
    # the drafts' distributions [rows, vocab] leave the device only for rows that leave the overlapped chain
    # (overlapped, a row continues from the host only near its length limit, so most dispatches' stay on the
    # device; not overlapped, every dispatch's is read but the last)
    assert r_on - reads < 0.5 * (d_on - d_on0) and r_off - r_on >= d_off - d_on - 1
    assert on == off
    assert [r[1] for r in on] == ["stop", "length", "length"] and on[0][0][-1] == stop
    assert [len(r[0]) for r in on[1:]] == [17, 14] and all(r[2] > 0 for r in on)
    _check_pages(llm)
