"""Log-probabilities computed in the executables, and vLLM's logits processors (penalties, min_tokens, logit_bias).

Specification (f32 weights): every generated token's logprob and top-k equal log_softmax of the teacher-forced
logits (a plain full forward over prompt + output) within 1e-4, and so do the prompt tokens' (the first has none);
colocated, disaggregated and with MTP. The processors change exactly what vLLM's do: greedy decoding with them
equals greedy decoding over teacher-forced logits processed by a numpy transcription of vLLM's rules.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
import hf_reference
from serving import LLM, EngineConfig, SamplingParams

EC = EngineConfig(page_size=8, num_pages=48, max_model_len=64, prefill_buckets=(16,), decode_buckets=(8,),
                  decode_steps=3, decode_windows=(8,), prefill_rows=(1, 4))   # few executables: CI time
PROMPTS = [[5, 17, 3, 44, 12, 9, 61, 2, 30, 30, 7, 1, 88, 15, 4, 27, 51, 19, 6, 40], [3, 1, 4],
           [9, 2, 6, 5, 35, 8, 9, 7, 9]]
N_NEW = 9


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("logprob_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11, with_mtp=True)
    return checkpoints.load(path, dtype=jnp.float32)


@pytest.fixture(scope="module")
def colocated(model):
    with LLM(model=model, engine_config=EC, prefix_caching=True) as llm:
        yield llm


def teacher_forced(model, ids) -> np.ndarray:
    """log_softmax of the logits of a plain full forward over `ids` (no cache): [len(ids), W]."""
    logits = model(jnp.asarray([ids], jnp.int32))[0]
    return np.asarray(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1))


def check_logprobs(model, out, k: int, pk: int | None):
    ids = list(out.prompt_token_ids) + list(out.token_ids)
    ref = teacher_forced(model, ids)
    n_prompt = len(out.prompt_token_ids)
    assert len(out.logprobs) == len(out.token_ids)
    for j, (tok, e) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[n_prompt - 1 + j]
        np.testing.assert_allclose(e.logprob, row[tok], atol=1e-4)
        assert len(e.top) == k
        want = np.sort(row)[::-1][:k]
        np.testing.assert_allclose([lp for _, lp in e.top], want, atol=1e-4)
        np.testing.assert_allclose([row[t] for t, _ in e.top], want, atol=1e-4)   # ids name those values
    if pk is None:
        assert out.prompt_logprobs is None
        return
    assert len(out.prompt_logprobs) == n_prompt and out.prompt_logprobs[0] is None
    for i in range(1, n_prompt):
        e, row = out.prompt_logprobs[i], ref[i - 1]
        np.testing.assert_allclose(e.logprob, row[ids[i]], atol=1e-4)
        assert len(e.top) == pk
        np.testing.assert_allclose([lp for _, lp in e.top], np.sort(row)[::-1][:pk], atol=1e-4)


def check_processed_greedy(model, out, p: SamplingParams, eos_ids):
    """Each greedy token is the argmax of the teacher-forced logits processed by vLLM's rules (numpy)."""
    prompt, toks = list(out.prompt_token_ids), list(out.token_ids)
    logits = np.asarray(model(jnp.asarray([prompt + toks], jnp.int32))[0], np.float64)
    for j, tok in enumerate(toks):
        x = logits[len(prompt) - 1 + j].copy()
        for t, b in p.logit_bias:
            x[t] += b
        if j < p.min_tokens:
            x[list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))] = -np.inf
        for t in set(prompt + toks[:j]):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        for t in set(toks[:j]):
            x[t] -= p.frequency_penalty * toks[:j].count(t) + p.presence_penalty
        assert tok == int(np.argmax(x)), (j, tok, int(np.argmax(x)), p)


BIASED = 7   # min_tokens holds this stop token back 4 tokens; then its +100 bias makes it the 5th
PARAMS = [SamplingParams(max_tokens=N_NEW, logprobs=5, prompt_logprobs=3),
          SamplingParams(max_tokens=N_NEW, temperature=0.8, seed=4, logprobs=0),
          SamplingParams(max_tokens=N_NEW, logprobs=20, ignore_eos=True)]
PENALIZED = [SamplingParams(max_tokens=N_NEW, presence_penalty=1.5, frequency_penalty=0.7, ignore_eos=True),
             SamplingParams(max_tokens=N_NEW, repetition_penalty=1.8, logprobs=2, ignore_eos=True),
             SamplingParams(max_tokens=N_NEW, min_tokens=4, stop_token_ids=(BIASED,),
                            logit_bias={BIASED: 100.0, 3: -100.0})]


def _check_all(model, llm, outs):
    """`outs` of PROMPTS x PARAMS then PROMPTS x PENALIZED (one call: rows with and without processors mixed)."""
    for out, p in zip(outs, PARAMS + PENALIZED):
        if p.logprobs is not None:
            check_logprobs(model, out, p.logprobs, p.prompt_logprobs)
    for out, p in zip(outs[len(PARAMS):], PENALIZED):
        check_processed_greedy(model, out, p, model.cfg.eos_token_ids)
    last = outs[-1]
    assert last.token_ids[-1] == BIASED and len(last.token_ids) == 5 and last.finish_reason == "stop"
    for pool in llm.page_pools().values():
        pool.allocator.check()
        assert pool.allocator.used == 0 and pool.allocator.leased == 0


def test_logprobs_and_processors_colocated(model, colocated):
    outs = colocated.generate(PROMPTS * 2, PARAMS + PENALIZED)
    _check_all(model, colocated, outs)
    # asking for logprobs changes no token; the processors do change them
    plain = colocated.generate(PROMPTS * 2, [SamplingParams(max_tokens=N_NEW, temperature=p.temperature,
                                                            seed=p.seed, ignore_eos=p.ignore_eos)
                                             for p in PARAMS + PENALIZED])
    assert [o.token_ids for o in plain[:3]] == [o.token_ids for o in outs[:3]]
    assert all(a.token_ids != b.token_ids for a, b in zip(plain[3:], outs[3:]))
    assert all(o.logprobs is None and o.prompt_logprobs is None for o in plain)


def test_logprobs_and_processors_disaggregated_with_mtp(model):
    with LLM(model=model, engine_config=EC, mode="disagg", prefill_mesh="tp=1", decode_mesh="ep=2", mtp=True) as llm:
        _check_all(model, llm, llm.generate(PROMPTS * 2, PARAMS + PENALIZED))


def test_prompt_logprobs_bypass_the_prefix_cache(model, colocated):
    p = SamplingParams(max_tokens=2, prompt_logprobs=2, logprobs=1)
    assert colocated.generate([PROMPTS[0]], SamplingParams(max_tokens=2))[0].metrics.cached_tokens > 0
    out = colocated.generate([PROMPTS[0]], p)[0]
    assert out.metrics.cached_tokens == 0
    check_logprobs(model, out, 1, 2)
