"""The OpenAI-compatible HTTP server, driven by the real `openai` client against a live server (uvicorn in a
thread, the shipped model): completions and chat, streaming and not, n, concurrency, abort on disconnect, 400s,
429, API key, health/ready/models/metrics; pages all come back after every test."""

import concurrent.futures
import json
import re
import socket
import threading
import time

import httpx
import jax.numpy as jnp
import numpy as np
import openai
import pytest

from serving import LLM, EngineConfig, SamplingParams
from serving.config import DEFAULT_CHECKPOINT
from serving.openai_api import DEFAULT_CHAT_TEMPLATE, BadRequest, chat_prompt, sampling_of
from serving.server import EngineLoop, Server, build_app

EC = EngineConfig(page_size=16, num_pages=64, max_model_len=256, prefill_buckets=(16, 64), decode_buckets=(2, 4, 8),
                  decode_steps=4, decode_windows=(16,), prefill_tokens=64,   # no (4, 64) prefill to compile
                  expert_stats_interval=1)
PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def served():
    llm = LLM(DEFAULT_CHECKPOINT, engine_config=EC, dtype=jnp.float32)
    engine = EngineLoop(llm, max_queue=32)
    srv = Server(build_app(engine, model_name="shakespeare-moe", chat_template=DEFAULT_CHAT_TEMPLATE)).start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    yield llm, engine, srv, client
    srv.stop()
    engine.close()
    llm.close()


def _wait_drained(llm, engine, timeout=30.0):
    """Bounded wait until nothing is in flight, then the page invariant with every page free."""
    end = time.monotonic() + timeout
    while engine.in_flight() or llm.has_work():
        assert time.monotonic() < end, f"{engine.in_flight()} requests still in flight after {timeout}s"
        threading.Event().wait(0.005)
    for name, pool in llm.page_pools().items():
        a = pool.allocator
        a.check()
        assert a.free == a.total and a.used == 0 and a.leased == 0, (name, a.free, a.used, a.leased)


@pytest.fixture(autouse=True)
def _pages_back(request):
    yield
    if "served" in request.fixturenames:
        llm, engine, _, _ = request.getfixturevalue("served")
        _wait_drained(llm, engine)


def test_completion_equals_llm_generate_and_streaming_equals_non_streaming(served):
    llm, _, _, client = served
    ids = llm.tokenizer.encode(PROMPT)
    want = llm.generate([ids], SamplingParams(max_tokens=12))[0]
    r = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].model_extra["token_ids"] == want.token_ids
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    assert r.choices[0].finish_reason == "length"
    ids_prompt = client.completions.create(model="shakespeare-moe", prompt=ids, max_tokens=12, temperature=0)
    assert ids_prompt.choices[0].text == want.text                # a token-id prompt: the same
    chunks = list(client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want.text
    assert sum(len(c.choices[0].model_extra["token_ids"]) for c in chunks if c.choices) == 12
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-2].choices[0].finish_reason == "length"


def test_stop_string_ends_the_stream_there_and_frees_the_pages(served):
    """Stop strings run on the server's text thread (not the engine thread): the text is cut before the stop
    string, streamed and not, finish_reason is "stop", the rest of the request is aborted (its pages come back:
    the autouse fixture checks), and nothing of the cut text is ever streamed."""
    llm, engine, _, client = served
    full = llm.generate([PROMPT], SamplingParams(max_tokens=24))[0].text   # (the engine thread is idle)
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop and full.index(stop) > 0
    want = full[:full.index(stop)]
    r = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    chunks = list(client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=24, temperature=0,
                                            stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    _wait_drained(llm, engine)   # the aborts are through: the engine thread is idle again
    out = llm.generate([PROMPT], SamplingParams(max_tokens=24, stop=[stop]))[0]   # LLM: the same text stage
    assert out.text == want and out.finish_reason == "stop" and len(out.token_ids) < 24


def test_chat_streaming_and_not_n_and_seed(served):
    llm, _, _, client = served
    msgs = [{"role": "system", "content": "You speak verse."}, {"role": "user", "content": "What is the hour?"}]
    want_prompt = chat_prompt({"messages": [dict(m) for m in msgs]}, DEFAULT_CHAT_TEMPLATE)
    assert want_prompt.endswith("ASSISTANT:") and "USER: What is the hour?" in want_prompt
    want = llm.generate([want_prompt], SamplingParams(max_tokens=10))[0].text
    r = client.chat.completions.create(model="shakespeare-moe", messages=msgs, max_tokens=10, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    s = list(client.chat.completions.create(model="shakespeare-moe", messages=msgs, max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in s if c.choices) == want
    # n = 2 at T=0.9 with a seed: two (different) samples, and the same two again for the same seed
    a = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=12, temperature=0.9, n=2,
                                  seed=7)
    b = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=12, temperature=0.9, n=2,
                                  seed=7)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert a.choices[0].text != a.choices[1].text and [c.index for c in a.choices] == [0, 1]


def test_concurrent_requests_equal_sequential(served):
    llm, _, _, client = served
    prompts = [PROMPT, "Now is the winter", "Friends, Romans", "All the world", "O Romeo", "Once more unto",
               "The quality of", "If music be"]
    want = [o.text for o in llm.generate(prompts, SamplingParams(max_tokens=8))]

    def one(p):
        return client.completions.create(model="shakespeare-moe", prompt=p, max_tokens=8, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(8) as ex:
        got = [r.choices[0].text for r in ex.map(one, prompts)]
    assert got == want


@pytest.mark.parametrize("body,needle", [
    ({"prompt": PROMPT, "temperature": -1}, "temperature"),
    ({"prompt": PROMPT, "top_p": 0}, "top_p"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
    ({"prompt": ""}, "empty"),
    ({"prompt": []}, "empty"),
    ({"prompt": ["To be", ""]}, "'prompt'[1] is empty"),
    ({"prompt": [1, 2, 999999]}, "vocabulary"),
    ({"prompt": "x " * 400}, "max_model_len"),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs"),
    ({"prompt": PROMPT, "model": "gpt-4"}, "not served"),
    ({"prompt": PROMPT, "stop": [""]}, "stop"),
    ({"prompt": PROMPT, "seed": "abc"}, "seed"),
    ({"prompt": PROMPT, "n": 0}, "'n'"),
    ({"prompt": PROMPT, "frequency_penalty": 3}, "frequency_penalty"),
    ({"prompt": PROMPT, "logit_bias": {"5": 200}}, "logit_bias"),
    ({"prompt": PROMPT, "extra_body": {"min_tokens": 99}, "max_tokens": 4}, "min_tokens"),
    ({"prompt": PROMPT, "extra_body": {"response_format": {"type": "xml"}}}, "'response_format'"),
    ({"prompt": PROMPT, "extra_body": {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "nonsense"}}}}}, "rejected"),
    ({"prompt": PROMPT, "extra_body": {"guided_regex": "(", "guided_choice": ["a"]}}, "one of"),
    ({"prompt": PROMPT, "extra_body": {"cache_salt": ""}}, "cache_salt"),
])
def test_bad_requests_get_400_naming_the_problem(served, body, needle):
    _, _, _, client = served
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**{"model": "shakespeare-moe", **body})
    assert needle in str(e.value)


def _lp_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert (x is None) == (y is None) and (x is None or abs(x - y) < 1e-4), (a, b)


def test_logprobs_echo_and_penalties_through_the_openai_client(served):
    """Completions (legacy logprobs object; echo = the prompt's logprobs, first null — what lm-eval scores with),
    chat (logprobs + top_logprobs), streaming equal to not, penalties: all equal to `LLM.generate`'s."""
    llm, _, _, client = served
    ids = llm.tokenizer.encode(PROMPT)
    want = llm.generate([ids], SamplingParams(max_tokens=6, logprobs=3, prompt_logprobs=3))[0]
    r = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    _lp_equal(lp.token_logprobs, [e.logprob for e in want.logprobs])
    assert "".join(lp.tokens) == r.choices[0].text == want.text
    assert all(len(t) <= 3 for t in lp.top_logprobs) and lp.text_offset[0] == 0
    assert lp.text_offset[1:] == list(np.cumsum([len(t) for t in lp.tokens])[:-1])
    # echo + logprobs (lm-eval's loglikelihood request): the prompt's tokens first, the first without a logprob
    r = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1,
                                  echo=True)
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(PROMPT) and len(lp.tokens) == len(ids) + 1
    _lp_equal(lp.token_logprobs[:len(ids)], [None] + [e.logprob for e in want.prompt_logprobs[1:]])
    # streamed: the same logprobs, chunk by chunk
    chunks = list(client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=6, temperature=0,
                                            logprobs=3, stream=True))
    _lp_equal([x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs],
              [e.logprob for e in want.logprobs])
    # chat: logprobs + top_logprobs
    msgs = [{"role": "user", "content": PROMPT}]
    r = client.chat.completions.create(model="shakespeare-moe", messages=msgs, max_tokens=5, temperature=0,
                                       logprobs=True, top_logprobs=2)
    chat_ids = llm.tokenizer.encode(chat_prompt({"messages": msgs}, DEFAULT_CHAT_TEMPLATE))
    cw = llm.generate([chat_ids], SamplingParams(max_tokens=5, logprobs=2))[0]
    content = r.choices[0].logprobs.content
    _lp_equal([c.logprob for c in content], [e.logprob for e in cw.logprobs])
    assert [len(c.top_logprobs) for c in content] == [2] * len(content)
    assert [c.top_logprobs[0].logprob for c in content] == pytest.approx([e.top[0][1] for e in cw.logprobs], abs=1e-4)
    # penalties / min_tokens / logit_bias: the same tokens as LLM.generate with those params
    kw = dict(presence_penalty=0.8, frequency_penalty=0.5, logit_bias={"7": 3.0})
    r = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=8, temperature=0,
                                  extra_body={"repetition_penalty": 1.3, "min_tokens": 2}, **kw)
    p = SamplingParams(max_tokens=8, repetition_penalty=1.3, min_tokens=2, presence_penalty=0.8,
                       frequency_penalty=0.5, logit_bias={7: 3.0})
    got = llm.generate([ids], p)[0]
    assert r.choices[0].text == got.text and got.token_ids != want.token_ids[:len(got.token_ids)]


def test_structured_output_through_the_openai_client(served):
    """response_format json_schema (chat), vLLM's structured_outputs choice and guided_regex (completions): outputs
    follow the grammar and equal LLM.generate's; /metrics counts the feature requests."""
    llm, engine, srv, client = served
    schema = {"type": "object", "properties": {"verdict": {"enum": ["yes", "no"]},
                                               "n": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["verdict", "n"], "additionalProperties": False}
    r = client.chat.completions.create(
        model="shakespeare-moe", messages=[{"role": "user", "content": PROMPT}], max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}})
    v = json.loads(r.choices[0].message.content)
    assert set(v) == {"verdict", "n"} and v["verdict"] in ("yes", "no") and 1 <= v["n"] <= 9
    r = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=20, temperature=0,
                                  extra_body={"structured_outputs": {"choice": ["Lord", "Lady", "Knave"]}})
    want = llm.generate([PROMPT], SamplingParams(max_tokens=20, structured_output={"choice": ["Lord", "Lady",
                                                                                                "Knave"]}))[0]
    assert r.choices[0].text == want.text and want.text in ("Lord", "Lady", "Knave")
    r = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=20, temperature=0.9, seed=1,
                                  extra_body={"guided_regex": "[a-z]{2,6} [0-9]"}, logprobs=1)
    assert re.fullmatch("[a-z]{2,6} [0-9]", r.choices[0].text) and r.choices[0].finish_reason == "stop"
    engine._last_gauges = 0.0
    text = httpx.get(srv.url + "/metrics").text
    for f in ("structured_output", "logprobs"):
        line = [l for l in text.splitlines() if l.startswith(f'tandem_feature_requests_total{{feature="{f}"}}')]
        assert line and float(line[0].split()[-1]) >= 1, f


def test_malformed_json_and_chat_messages(served):
    _, _, srv, client = served
    r = httpx.post(srv.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(model="shakespeare-moe", messages=[{"role": "wizard", "content": "hi"}])


def test_client_disconnect_aborts_and_frees_pages(served):
    llm, engine, srv, _ = served
    body = {"model": "shakespeare-moe", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True,
            "ignore_eos": True}
    with httpx.Client(timeout=30) as c:
        with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
            first = next(r.iter_lines())
            assert first.startswith("data: ")
            assert engine.in_flight() == 1
    # the stream closed after one chunk: the request is aborted, its pages come back (checked by the fixture)
    end = time.monotonic() + 30
    while engine.in_flight():
        assert time.monotonic() < end
        threading.Event().wait(0.005)
    aborted = _count(engine, "tandem_requests_total", finish_reason="abort")
    assert aborted >= 1
    # non-streaming: the client sends the request, then hangs up while it is being generated
    raw = json.dumps({**body, "stream": False}).encode()
    host, port = srv.host, srv.port
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(raw)).encode() + b"\r\n\r\n" + raw)
        end = time.monotonic() + 30
        while not engine.in_flight():
            assert time.monotonic() < end
            threading.Event().wait(0.001)
    end = time.monotonic() + 30
    while engine.in_flight():
        assert time.monotonic() < end
        threading.Event().wait(0.005)
    assert _count(engine, "tandem_requests_total", finish_reason="abort") == aborted + 1


def _count(engine, name, **labels) -> float:
    return engine.metrics.registry.get_sample_value(name, labels) or 0.0


def test_full_queue_answers_429(served):
    llm, engine, srv, client = served
    engine.max_queue = 1
    try:
        body = {"model": "shakespeare-moe", "prompt": PROMPT, "max_tokens": 200, "temperature": 0, "stream": True,
                "ignore_eos": True}
        with httpx.Client(timeout=30) as c:
            with c.stream("POST", srv.url + "/v1/completions", json=body) as r:
                next(r.iter_lines())
                with pytest.raises(openai.RateLimitError):
                    client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=4)
    finally:
        engine.max_queue = 32


def test_api_key_health_ready_models_metrics(served):
    llm, engine, srv, client = served
    keyed = Server(build_app(engine, model_name="shakespeare-moe", chat_template=DEFAULT_CHAT_TEMPLATE,
                             api_key="sekret")).start()
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=keyed.url + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in ok.models.list().data] == ["shakespeare-moe"]
        assert ok.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=3).usage.completion_tokens \
            == 3
    finally:
        keyed.stop()
    assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/ready").status_code == 200
    client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=4)
    engine._last_gauges = 0.0
    text = httpx.get(srv.url + "/metrics").text
    for name in ("tandem_time_to_first_token_seconds_count", "tandem_time_per_output_token_seconds_bucket",
                 "tandem_inter_token_latency_seconds", "tandem_e2e_request_latency_seconds",
                 'tandem_kv_pages{engine="decode",state="free"}', "tandem_num_requests_in_flight"):
        assert name in text, name
    count = [l for l in text.splitlines() if l.startswith("tandem_time_to_first_token_seconds_count")]
    assert float(count[0].split()[-1]) >= 1
    # routing counted on device, read every dispatch here: copies = tokens x experts per token x MoE layers
    value = lambda name: float(next(l for l in text.splitlines() if l.startswith(name)).split()[-1])  # noqa: E731
    mc = llm.decode_engine.model_cfg
    copies = value('tandem_expert_routed_copies{engine="decode"}')
    assert value("tandem_prefill_budget_tokens") >= llm.scheduler.config.prefill_budget   # colocated: sampled
    assert copies > 0 and copies % mc.num_experts_per_tok == 0, copies
    assert value('tandem_expert_load_imbalance{engine="decode",layer="0"}') >= 1.0
    assert value('tandem_eplb_rebalances{engine="decode"}') == 0


def test_parsing_units():
    p, n = sampling_of({"temperature": 0, "max_tokens": 5, "stop": "x", "n": 3, "top_k": 4}, 16)
    assert (p.max_tokens, p.temperature, p.stop, p.top_k, n) == (5, 0.0, ("x",), 4, 3)
    assert sampling_of({}, 16)[0].max_tokens == 16
    assert sampling_of({"cache_salt": "tenant-a", "presence_penalty": 0.0}, 16)[0].cache_salt == "tenant-a"
    from serving.protocol import sampling_from_wire, sampling_to_wire   # the salt travels to every worker
    assert sampling_from_wire(sampling_to_wire(SamplingParams(cache_salt="t"), 7)).cache_salt == "t"
    with pytest.raises(BadRequest, match="integer"):
        sampling_of({"max_tokens": 2.5}, 16)


def test_disaggregated_server_equals_colocated(served):
    llm, _, _, client = served
    want = client.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=8, temperature=0)
    small = EngineConfig(page_size=16, num_pages=16, max_model_len=64, prefill_buckets=(16,), decode_buckets=(2,),
                         decode_steps=4, decode_windows=(4,))   # few executables: this test is about the server
    d = LLM(DEFAULT_CHECKPOINT, engine_config=small, dtype=jnp.float32, mode="disagg", prefill_mesh="tp=1",
            decode_mesh="ep=2")
    eng = EngineLoop(d)
    srv = Server(build_app(eng, model_name="shakespeare-moe", chat_template=DEFAULT_CHAT_TEMPLATE)).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        got = c.completions.create(model="shakespeare-moe", prompt=PROMPT, max_tokens=8, temperature=0)
        assert got.choices[0].text == want.choices[0].text
        eng._last_gauges = 0.0
        text = httpx.get(srv.url + "/metrics").text
        line = [l for l in text.splitlines() if l.startswith("tandem_kv_transfer_bytes_total")]
        assert line and float(line[0].split()[-1]) > 0
        _wait_drained(d, eng)
    finally:
        srv.stop()
        eng.close()
        d.close()


def test_one_trace_per_request_whose_spans_add_up_to_the_ttft(served):
    """Tracing on (in-memory exporter): a streamed request gives one trace — root `request`, the engine phases and
    the first token's detokenize — whose spans up to the first token add up to the client's TTFT within 10%."""
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from serving import tracing
    from trace_check import stream_ttft, traced_request

    llm, engine, srv, _ = served
    prompt = " ".join([PROMPT, "that is the question"] * 8)   # ~3 prefill chunks: TTFT well above HTTP's ~1 ms
    mem = InMemorySpanExporter()
    tracing.configure("tandem-server", exporter=mem)
    try:
        with httpx.Client(timeout=60) as c:
            stream_ttft(c, srv.url, {"prompt": prompt, "max_tokens": 4, "temperature": 0})   # (warm)
            _wait_drained(llm, engine)
            by, ids = traced_request(c, srv.url, {"prompt": prompt + " that", "max_tokens": 6, "temperature": 0},
                                     mem, "colocated", {"tandem-server"})
        _wait_drained(llm, engine)
    finally:
        tracing.shutdown()
    assert len(ids) == 6 and by["request"].attributes["tandem.output_tokens"] == 6
    assert by["prefill"].attributes["tandem.prompt_tokens"] == len(llm.tokenizer.encode(prompt + " that"))


def test_a_batch_of_prompts_in_one_request(served):
    """`prompt` as a batch (lm-evaluation-harness sends its loglikelihood requests so: token lists, echo,
    logprobs=1, max_tokens=1): one choice per prompt in order (index = prompt x n + choice), each equal to the same
    prompt sent alone; usage sums the prompts; a bad member is named."""
    llm, _, _, client = served
    a, b = llm.tokenizer.encode(PROMPT), llm.tokenizer.encode("Now is the winter of our discontent")
    kw = dict(model="shakespeare-moe", max_tokens=1, temperature=0, echo=True, logprobs=1)
    both = client.completions.create(prompt=[a, b], **kw)
    alone = [client.completions.create(prompt=p, **kw).choices[0] for p in (a, b)]
    assert [c.index for c in both.choices] == [0, 1]
    for got, want in zip(both.choices, alone):
        assert got.text == want.text and got.model_extra["token_ids"] == want.model_extra["token_ids"]
        assert got.logprobs.tokens == want.logprobs.tokens and got.logprobs.token_logprobs[0] is None
        np.testing.assert_allclose(got.logprobs.token_logprobs[1:], want.logprobs.token_logprobs[1:], atol=1e-5)
    assert both.usage.prompt_tokens == len(a) + len(b) and both.usage.completion_tokens == 2
    two = client.completions.create(model="shakespeare-moe", prompt=[PROMPT, "Now is"], max_tokens=3, n=2,
                                    temperature=0)
    assert [c.index for c in two.choices] == [0, 1, 2, 3] and two.usage.completion_tokens == 12
    assert two.choices[0].text == two.choices[1].text != two.choices[2].text == two.choices[3].text
    r = httpx.post(served[2].url + "/v1/completions", json={"prompt": [a, [1, -5]], "max_tokens": 1}, timeout=30)
    assert r.status_code == 400 and "prompt 1" in r.json()["error"]["message"], r.text


def test_lm_eval_requests_score_like_the_model(served):
    """What lm-evaluation-harness's `local-completions` model sends (`make lm-eval` runs the real harness:
    bench/lm_eval_check.py): its remote-tokenizer calls (/tokenizer_info, /tokenize, /detokenize), then
    loglikelihood requests — a batch of token-id prompts, echo, logprobs=1, max_tokens=1 — parsed as it parses
    them (sum of token_logprobs[ctxlen:-1]): equal to the model's teacher-forced scores over the same ids."""
    import checkpoints
    from bench.lm_eval_check import ASSET, encode_pair, heldout_pairs, teacher_forced

    llm, _, srv, _ = served
    info = httpx.get(srv.url + "/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == llm.tokenizer.id_to_token(llm.backend.eos_ids[0])
    assert info["model_max_length"] == llm.max_model_len

    def enc(s):
        return httpx.post(srv.url + "/tokenize", json={"prompt": s, "add_special_tokens": False}, timeout=30).json()[
            "tokens"]

    pairs = heldout_pairs(6)
    encs = [encode_pair(enc, c, x) for c, x in pairs]
    assert httpx.post(srv.url + "/detokenize", json={"tokens": encs[0][0]}, timeout=30).json()["prompt"] == (
        pairs[0][0].rstrip())
    body = {"model": "shakespeare-moe", "prompt": [c + x for c, x in encs], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    out = httpx.post(srv.url + "/v1/completions", json=body, timeout=60).json()
    chs = sorted(out["choices"], key=lambda ch: ch["index"])
    got = [sum(ch["logprobs"]["token_logprobs"][len(c):-1]) for ch, (c, _) in zip(chs, encs)]
    for ch, (c, x) in zip(chs, encs):   # lm-eval's is_greedy reads top_logprobs at the same positions
        assert len(ch["logprobs"]["top_logprobs"]) == len(c) + len(x) + 1
    want = teacher_forced(checkpoints.load(ASSET, dtype=jnp.float32), [(c + x, len(c)) for c, x in encs])
    np.testing.assert_allclose(got, want, atol=1e-3)
    bad = httpx.post(srv.url + "/detokenize", json={"tokens": [10 ** 9]}, timeout=30)
    assert bad.status_code == 400 and "tokens" in bad.json()["error"]["message"]
