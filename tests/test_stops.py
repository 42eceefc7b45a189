"""Stop rules in one place (`serving.stops`) and the incremental detokenizer behind them."""

import time

import numpy as np
import pytest

from serving.api import Request, Tokenizer
from serving.config import DEFAULT_CHECKPOINT
from serving.sampling import SamplingParams
from serving.stops import IncrementalDetokenizer, append_tokens


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.of_checkpoint(DEFAULT_CHECKPOINT)


def _req(params: SamplingParams, limit: int = 10_000) -> Request:
    return Request(id="r", prompt_ids=np.array([1, 2], np.int32), params=params, seed=0, limit=limit)


def _stream(req, ids, tok, eos=(), step=3):
    texts, reason = [], None
    for i in range(0, len(ids), step):
        ev, reason = append_tokens(req, ids[i:i + step], time.perf_counter(), eos, tok.decode)
        texts.append(ev.new_text)
        if reason is not None:
            break
    return "".join(texts), reason


def test_incremental_text_equals_decoding_the_whole_output(tok):
    rng = np.random.default_rng(0)
    text = open(f"{DEFAULT_CHECKPOINT}/heldout_sample.txt").read()[:4000]
    for ids in [tok.encode(text)] + [rng.integers(0, 1000, 300).tolist() for _ in range(3)]:
        for step in (1, 4):
            d = IncrementalDetokenizer(tok.decode)
            out = "".join(d.push(ids[i:i + step]) for i in range(0, len(ids), step)) + d.flush()
            assert out == tok.decode(ids)


def test_each_step_decodes_a_short_window_not_the_whole_output(tok):
    """O(new tokens) per step: the decoder never sees more than a few tokens however long the output grows."""
    seen = []
    d = IncrementalDetokenizer(lambda ids: (seen.append(len(ids)), tok.decode(ids))[1])
    ids = tok.encode(open(f"{DEFAULT_CHECKPOINT}/heldout_sample.txt").read()[:8000])
    for t in ids:
        d.push([t])
    assert len(ids) > 1000 and max(seen) <= 8


def test_stop_string_cuts_the_text_and_streaming_never_sends_what_it_cuts(tok):
    ids = tok.encode("To be, or not to be: that is the question. Whether tis nobler in the mind")
    full = tok.decode(ids)
    req = _req(SamplingParams(stop=["the question"]))
    streamed, reason = _stream(req, ids, tok, step=1)
    assert reason == "stop" and req.text == full[:full.index("the question")] == streamed


def test_stop_token_is_kept_in_ids_and_left_out_of_the_text(tok):
    ids = tok.encode("Now is the winter of our discontent")
    req = _req(SamplingParams(stop_token_ids=[ids[3]]))
    _, reason = _stream(req, ids, tok)
    assert reason == "stop" and req.output_ids == ids[:4] and req.text == tok.decode(ids[:3])
    req = _req(SamplingParams(ignore_eos=True), limit=5)
    _, reason = _stream(req, ids, tok, eos=(ids[2],))
    assert reason == "length" and req.output_ids == ids[:5]
    req = _req(SamplingParams())
    _, reason = _stream(req, ids, tok, eos=(ids[2],))
    assert reason == "stop" and req.output_ids == ids[:3]
