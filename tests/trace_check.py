"""Shared checks of one request's trace (tests/test_tracing.py, test_server.py, test_pd_multiprocess.py)."""

import json
import time

import httpx

# up to the first token these spans tile a request's time (serving.tracing), per path; with the early first token
# (RouterConfig.early_first_token) it leaves with the prefill worker's offer, so the transfer and the decode
# worker's first dispatch come after it (their spans are there, outside the TTFT)
TTFT_SPANS = {"colocated": ("queue", "prefill", "first_decode", "detokenize", "respond"),
              "workers": ("queue", "prefill_queue", "prefill", "kv_transfer", "first_decode", "deliver", "detokenize",
                          "respond"),
              "workers_early": ("queue", "prefill_queue", "prefill", "deliver", "detokenize", "respond")}
AFTER_TTFT = {"colocated": (), "workers": (), "workers_early": ("kv_transfer", "first_decode")}


def stream_ttft(client: httpx.Client, base_url: str, body: dict) -> tuple[float, list[int]]:
    """Stream one completion; (seconds from sending it to the first chunk with tokens, all token ids). `client`: a
    warm one (its set-up — TLS context, connection — is not the server's time)."""
    ttft, ids = None, []
    t0 = time.perf_counter()
    with client.stream("POST", base_url + "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])
            toks = ch["choices"][0].get("token_ids") if ch.get("choices") else None
            if toks and ttft is None:
                ttft = time.perf_counter() - t0
            ids += toks or []
    return ttft, ids


def check_trace(spans, path: str, ttft_s: float, services: set[str]) -> tuple[dict, str | None]:
    """One trace: one `request` root, every other span its child; the path's TTFT spans all present and in order;
    the spans come from `services` (asserted). Returns ({name: span}, None if the TTFT spans add up to `ttft_s`
    within 10%, else the timeline)."""
    assert len({s.context.trace_id for s in spans}) == 1, [(s.name, s.context.trace_id) for s in spans]
    roots = [s for s in spans if s.parent is None]
    assert [s.name for s in roots] == ["request"], [(s.name, s.parent) for s in spans]
    root = roots[0]
    assert all(s.parent.span_id == root.context.span_id for s in spans if s is not root)
    by = {s.name: s for s in spans}
    assert len(by) == len(spans), sorted(s.name for s in spans)   # one span per phase
    names = TTFT_SPANS[path]
    assert set(names) | set(AFTER_TTFT[path]) | {"request", "decode"} <= set(by), sorted(by)
    assert {s.resource.attributes["service.name"] for s in spans} == services
    tile = [by[n] for n in names]
    for a, b in zip(tile, tile[1:]):   # in order (2 ms slack: the control-plane hops between processes)
        assert b.start_time >= a.end_time - 2_000_000, (a.name, b.name, a.end_time - b.start_time)
    assert by["decode"].start_time >= by["first_decode"].end_time - 2_000_000
    if "prefill_queue" in by:   # one clock reading hands it over: the router's dispatch (its send) is both ends
        gap = by["prefill_queue"].start_time - by["queue"].end_time
        assert abs(gap) < 20_000, ("queue -> prefill_queue", gap)
    total = sum(s.end_time - s.start_time for s in tile) / 1e9
    # 10%, or 5 ms: the client's own part of the TTFT (httpx's request and its read of the first SSE chunk, outside
    # every span) is ~3-5 ms, over 10% of a ~20 ms TTFT on a fast CPU (Zen 4)
    if abs(total - ttft_s) <= max(0.1 * ttft_s, 0.005):
        return by, None
    t0 = root.start_time
    return by, (f"spans {total * 1e3:.2f} ms vs TTFT {ttft_s * 1e3:.2f} ms: " +
                str([(s.name, round((s.start_time - t0) / 1e6, 2), round((s.end_time - t0) / 1e6, 2)) for s in tile]))


def traced_request(client: httpx.Client, base_url: str, body: dict, mem, path: str, services: set[str],
                   tries: int = 3) -> tuple[dict, list[int]]:
    """Stream `body` with tracing on (`mem`: the in-memory exporter) and check its trace; the sum-to-TTFT check
    may take up to `tries` requests (a load spike on a shared 2-core machine can stretch one hop). Returns the
    last trace's {name: span} and token ids."""
    errs = []
    for _ in range(tries):
        mem.clear()
        ttft, ids = stream_ttft(client, base_url, body)
        by, err = check_trace(mem.get_finished_spans(), path, ttft, services)
        if err is None:
            return by, ids
        errs.append(err)
    raise AssertionError("\n".join(errs))
