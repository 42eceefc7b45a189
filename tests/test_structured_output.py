"""Structured output (llguidance masks applied in the compiled steps): outputs follow a JSON schema, a regex, a
choice; rows without a grammar in the same dispatch are unaffected; a grammar the library rejects is refused
with its reason; colocated, disaggregated and with MTP (the shipped model, which has an MTP module)."""

import json
import re

import jax.numpy as jnp
import pytest

from serving import LLM, EngineConfig, SamplingParams
from serving.config import DEFAULT_CHECKPOINT

EC = EngineConfig(page_size=16, num_pages=64, max_model_len=128, prefill_buckets=(16,), decode_buckets=(8,),
                  decode_steps=4, decode_windows=(8,), prefill_rows=(1, 4))
SCHEMA = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "perhaps"]},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "who": {"type": "string", "maxLength": 12}},
          "required": ["answer", "count", "who"], "additionalProperties": False}
REGEX = r"[A-Z][a-z]+, [a-z]+ [0-9]{2}!"
CHOICES = ["To be", "not to be", "the question"]
PROMPT = "KING RICHARD: Now is the winter of our"


def follows_schema(text: str) -> bool:
    v = json.loads(text)
    return (set(v) == {"answer", "count", "who"} and v["answer"] in SCHEMA["properties"]["answer"]["enum"]
            and isinstance(v["count"], int) and 0 <= v["count"] <= 99 and isinstance(v["who"], str)
            and len(v["who"]) <= 12)


def params(**kw):
    return SamplingParams(max_tokens=60, **kw)


def check(llm, plain_want):
    # any JSON object; '"' and '}' pushed up so this small model closes its key string instead of reciting a play
    close = {llm.tokenizer.encode(c)[0]: 8.0 for c in ('"', "}")}
    constrained = [params(structured_output={"json": SCHEMA}), params(structured_output={"regex": REGEX}),
                   params(structured_output={"choice": CHOICES}, temperature=1.0, seed=3),
                   params(structured_output={"json_object": True}, logprobs=2, logit_bias=close)]
    outs = llm.generate([PROMPT] * 5, constrained + [params()])
    assert all(o.finish_reason == "stop" for o in outs[:4]), [(o.finish_reason, o.text) for o in outs]
    assert follows_schema(outs[0].text), outs[0].text
    assert re.fullmatch(REGEX, outs[1].text), outs[1].text
    assert outs[2].text in CHOICES, outs[2].text
    assert isinstance(json.loads(outs[3].text), dict) and len(outs[3].logprobs) == len(outs[3].token_ids)
    assert outs[4].token_ids == plain_want   # the unconstrained row of the same dispatches is untouched
    for pool in llm.page_pools().values():
        pool.allocator.check()
        assert pool.allocator.used == 0 and pool.allocator.leased == 0


@pytest.fixture(scope="module")
def plain():
    with LLM(DEFAULT_CHECKPOINT, engine_config=EC, dtype=jnp.float32) as llm:
        yield llm, llm.generate([PROMPT], params())[0].token_ids


def test_outputs_follow_the_grammar_colocated(plain):
    llm, want = plain
    check(llm, want)
    with pytest.raises(ValueError, match="structured_output json rejected"):
        llm.make_request(PROMPT, params(structured_output={"json": {"type": "nonsense"}}))
    with pytest.raises(ValueError, match="exactly one of"):
        params(structured_output={"json": SCHEMA, "regex": "x"})


def test_outputs_follow_the_grammar_disaggregated_with_mtp(plain):
    with LLM(DEFAULT_CHECKPOINT, engine_config=EC, dtype=jnp.float32, mode="disagg", prefill_mesh="tp=1",
             decode_mesh="ep=2", mtp=True) as llm:
        check(llm, plain[1])
