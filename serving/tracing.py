"""Per-request OpenTelemetry traces across the server, the router and the worker processes (docs/tracing.md).

Off by default: nothing is traced until `configure` is called (the server's and the router's
`--otlp_traces_endpoint`, or a test's in-memory exporter). A traced request carries its W3C `traceparent` on the
control plane (the `trace` field of `prefill` / `decode` messages); each worker makes its phase spans under it with its
own SDK provider and either exports them itself (its own `--otlp_traces_endpoint`) or, by default, sends them back on
the message that ends the phase (`spans`: plain msgpack maps, validated on arrival), and the process holding the
router re-emits them through its exporters with their ids, parents, times and service names unchanged — so one
collector (or one in-memory exporter) sees one trace per request.

Spans (names are the contract the docs and tests use): `request` (root, server side), `queue` (waiting for a
prefill slot: the scheduler's queue, or the router's), `prefill_queue` + `prefill` (a prefill worker: its queue, then
prefill + extract + offer), `kv_transfer` (decode worker: offer received -> pages pulled, verified, resharded),
`first_decode` (-> first token sent), `deliver` (its trip to the frontend), `decode` (-> finished), `detokenize`
(the first token's text), `respond` (its chunk written, streaming). Up to the first token they tile the request's
time (a receiver's span starts at the sender's `sent_ns`), so their durations add up to its TTFT.

Times: the engine's clocks are `time.perf_counter()` readings; spans take wall-clock nanoseconds (`wall_ns`).
"""

from __future__ import annotations

import logging
import re
import threading
import time

log = logging.getLogger(__name__)

# perf_counter -> wall clock, fixed once per process (spans of one process stay consistent with each other)
_OFFSET_NS = time.time_ns() - time.perf_counter_ns()
_TRACEPARENT = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")
_HEX = re.compile(r"^[0-9a-f]+$")
_MAX_SPANS = 64          # per message: more is a malformed (or hostile) message
_MAX_TRACES = 4096       # unsent traces a worker keeps (oldest dropped first)
_ATTR_TYPES = (str, int, float, bool)


def wall_ns(perf_t: float) -> int:
    """A `time.perf_counter()` reading as wall-clock nanoseconds."""
    return _OFFSET_NS + int(perf_t * 1e9)


def perf_of(ns, default: float) -> float:
    """A wall-clock reading in nanoseconds from another process (an int, else `default`) as this process's
    perf_counter time — for spans that start at a hand-off between processes (same host: exact; across hosts: as
    good as their clock sync)."""
    return (ns - _OFFSET_NS) / 1e9 if isinstance(ns, int) and not isinstance(ns, bool) else default


class _State:
    def __init__(self):
        self.provider = None      # opentelemetry.sdk.trace.TracerProvider
        self.tracer = None
        self.exporters = []       # span processors that re-emitted (forwarded) spans go through
        self.forward = None       # _Forward: worker spans waiting for the message that carries them back
        self.service = ""


_S = _State()
_RESOURCES: dict = {}   # service name -> its Resource (re-emitted spans)


def enabled() -> bool:
    return _S.tracer is not None


def configure(service: str, *, endpoint: str | None = None, exporter=None, forward: bool = False,
              sample_ratio: float = 1.0) -> None:
    """Start tracing in this process as `service`. `endpoint`: OTLP/HTTP traces URL (batched export); `exporter`:
    any SDK `SpanExporter` (tests: `InMemorySpanExporter`), exported synchronously; `forward` (workers without an
    endpoint): keep finished spans for `take`. Root spans are sampled at `sample_ratio`; children follow their
    parent's decision. Calling it again replaces the previous setup."""
    try:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError as e:   # a core dependency; only a broken install gets here
        raise RuntimeError(f"tracing needs opentelemetry-sdk ({e})") from None
    if not 0.0 <= sample_ratio <= 1.0:
        raise ValueError(f"trace sample ratio {sample_ratio} is not in [0, 1]")
    shutdown()
    procs = []
    if endpoint:
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            raise RuntimeError("OTLP export needs the otlp extra: pip install 'tandem[otlp]'") from None
        procs.append(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, timeout=10)))
    if exporter is not None:
        procs.append(SimpleSpanProcessor(exporter))
    fwd = _Forward() if forward and not endpoint else None
    if fwd is not None:
        procs.append(fwd)
    provider = TracerProvider(resource=Resource.create({"service.name": service}),
                              sampler=ParentBased(TraceIdRatioBased(sample_ratio)))
    for p in procs:
        provider.add_span_processor(p)
    _S.provider, _S.tracer, _S.service, _S.forward = provider, provider.get_tracer("tandem"), service, fwd
    _S.exporters = [p for p in procs if p is not fwd]


def shutdown() -> None:
    """Flush and stop this process's tracing (no-op when off)."""
    if _S.provider is not None:
        _S.provider.shutdown()
    _S.__init__()


# ---- context on the wire ------------------------------------------------------------------------------------------
def _context(traceparent: str | None):
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
    return TraceContextTextMapPropagator().extract({"traceparent": traceparent}) if traceparent else None


def traceparent_of(span) -> str | None:
    """The W3C traceparent of `span` (None for a span that is not sampled)."""
    c = span.get_span_context()
    if not c.is_valid or not c.trace_flags.sampled:
        return None
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


def valid_traceparent(tp) -> bool:
    return isinstance(tp, str) and bool(_TRACEPARENT.match(tp))


# ---- spans --------------------------------------------------------------------------------------------------------
def begin(name: str, start_perf: float, attrs: dict | None = None, parent: str | None = None):
    """A span started at `start_perf` (perf_counter), under `parent` (a traceparent) or as a root; None when off or
    not sampled. End it with `end`."""
    if _S.tracer is None:
        return None
    from opentelemetry.trace import SpanKind
    span = _S.tracer.start_span(name, context=_context(parent), kind=SpanKind.SERVER if parent is None else
                                SpanKind.INTERNAL, attributes=attrs, start_time=wall_ns(start_perf))
    return span if span.get_span_context().trace_flags.sampled else None


def end(span, end_perf: float, attrs: dict | None = None) -> None:
    """End `span` (from `begin`) at `end_perf`, with `attrs` (None values left out)."""
    if span is None:
        return
    if attrs:
        span.set_attributes({k: v for k, v in attrs.items() if isinstance(v, _ATTR_TYPES)})
    span.end(end_time=wall_ns(end_perf))


def span(parent: str | None, name: str, start_perf: float | None, end_perf: float | None,
         attrs: dict | None = None) -> None:
    """One finished span under `parent` (a traceparent); nothing when off, untraced, or a time is missing."""
    if _S.tracer is None or parent is None or start_perf is None or end_perf is None:
        return
    end(begin(name, start_perf, attrs, parent), max(end_perf, start_perf))


def phase_spans(req, parent: str | None, *, first: bool = False, last: bool = False,
                first_out: float | None = None) -> None:
    """The engine-side phases of a request from its clock readings (`serving.api.Request`): at its first token
    (`first`): `queue` + `prefill` (prefilled here) or `kv_transfer` (pulled: `req.transfer_s` set), then
    `first_decode` (-> `first_out`, when the first token left, default when it was sampled); at its end (`last`):
    `decode` (from `first_out`)."""
    if _S.tracer is None or parent is None:
        return
    a = {"tandem.request_id": req.id}
    first_out = req.first_token_time if first_out is None else first_out
    if first:
        if req.transfer_s is not None:   # a pulled prefix: from the offer (`prefill_start`) to the pages in place
            span(parent, "kv_transfer", req.prefill_start, req.prefill_end, {**a, "tandem.pull_s": req.transfer_s})
        else:
            span(parent, "queue", req.arrival, req.prefill_start, a)
            span(parent, "prefill", req.prefill_start, req.prefill_end,
                 {**a, "tandem.prompt_tokens": len(req.prompt_ids), "tandem.cached_tokens": req.cached_tokens})
        span(parent, "first_decode", req.prefill_end, first_out, a)
    if last:
        span(parent, "decode", first_out, req.finish_time,
             {**a, "tandem.output_tokens": len(req.output_ids), "tandem.finish_reason": req.finish_reason or ""})


def prefill_spans(req, start: float, end: float, cached: int) -> None:
    """A prefill worker's phases of `req`: `prefill_queue` (received -> its batch starts at `start`), `prefill`
    (-> offered at `end`: prefill + extract + checksums + offer)."""
    a = {"tandem.request_id": req.id}
    span(req.trace, "prefill_queue", req.arrival, start, a)
    span(req.trace, "prefill", start, end, {**a, "tandem.prompt_tokens": len(req.prompt_ids),
                                            "tandem.cached_tokens": cached})


def begin_request(req) -> None:
    """Open `req`'s root span (`request`, from `req.arrival`) and set `req.trace` to its traceparent; off: nothing."""
    if _S.tracer is None:
        return
    root = begin("request", req.arrival, {"tandem.request_id": req.id, "tandem.prompt_tokens": len(req.prompt_ids)})
    if root is not None:
        req.trace_span, req.trace = _Root(root), traceparent_of(root)


class _Root:
    """A request's root span and where its first token's text got to (`detokenize`, then `respond`)."""

    def __init__(self, span):
        self.span, self.text_t1, self.responded, self.ended = span, None, False, False


def frontend_spans(events, t0: float, t1: float, *, local: bool) -> None:
    """After a text-stage call that ran from `t0` to `t1` (perf_counter) over `events`: each request's first token's
    `detokenize` span (from the token's arrival here — the hand-off to the text stage included — to its text); at a
    request's end, its engine phases (`local`: the in-process scheduler's; remote workers send their own) and the
    end of its root span."""
    for ev in events:
        r = ev.request
        root = r.trace_span
        if not isinstance(root, _Root):
            continue
        if ev.new_token_ids and root.text_t1 is None:
            root.text_t1 = t1
            span(r.trace, "detokenize", min(t0, r.first_token_time or t0), t1,
                 {"tandem.request_id": r.id, "tandem.text_stage_s": t1 - t0})
        if ev.finished and not root.ended:
            if local:
                phase_spans(r, r.trace, first=True, last=True)
            root.ended = True
            ttft = None if r.first_token_time is None else r.first_token_time - r.arrival
            end(root.span, r.finish_time if r.finish_time is not None else t1,
                {"tandem.output_tokens": len(r.output_ids), "tandem.finish_reason": r.finish_reason or "",
                 "tandem.ttft_s": ttft, "tandem.error": r.error, "tandem.attempts": r.attempts})


def responded(req, now: float) -> None:
    """The HTTP handler wrote the first chunk with `req`'s tokens at `now`: its `respond` span (text out ->
    chunk written), the last before the client sees the first token."""
    root = req.trace_span
    if isinstance(root, _Root) and root.text_t1 is not None and not root.responded:
        root.responded = True
        span(req.trace, "respond", root.text_t1, now, {"tandem.request_id": req.id})


def worker_spans(req, finished: bool) -> None:
    """A decode worker's phase spans of `req` as a tokens message leaves: the first-token phases with the first
    message (`first_decode` ends as it leaves: a decode dispatch may run between sampling the first token and
    sending it), `decode` with the last. (`req.trace_span`, unused on this side, keeps when the first one left.)"""
    if req.trace is None or _S.tracer is None:
        return
    first = req.trace_span is None and req.first_token_time is not None
    if first:
        req.trace_span = time.perf_counter()
    phase_spans(req, req.trace, first=first, last=finished,
                first_out=req.trace_span if isinstance(req.trace_span, float) else None)


# ---- spans that travel back on the control plane ------------------------------------------------------------------
def _Forward():
    """A span processor that keeps this process's finished spans, by trace id, until `take` sends them."""
    from opentelemetry.sdk.trace import SpanProcessor

    class Forward(SpanProcessor):
        def __init__(self):
            self.lock = threading.Lock()
            self.by_trace: dict[str, list[dict]] = {}

        on_end = _forward_on_end

    return Forward()


def _forward_on_end(self, span) -> None:
    c, p = span.context, span.parent
    rec = {"name": span.name, "trace_id": f"{c.trace_id:032x}", "span_id": f"{c.span_id:016x}",
           "parent_id": None if p is None else f"{p.span_id:016x}", "start": span.start_time,
           "end": span.end_time, "kind": span.kind.value, "service": span.resource.attributes.get("service.name", ""),
           "attrs": {k: v for k, v in (span.attributes or {}).items() if isinstance(v, _ATTR_TYPES)}}
    with self.lock:
        lst = self.by_trace.setdefault(rec["trace_id"], [])
        if len(lst) < _MAX_SPANS:
            lst.append(rec)
        if len(self.by_trace) > _MAX_TRACES:   # requests that ended with no message to carry their spans
            del self.by_trace[next(iter(self.by_trace))]


def take(traceparent: str | None) -> dict:
    """{"spans": [...], "sent_ns": now} — this process's finished spans of `traceparent`'s trace, to send on the next
    message (empty when the worker exports them itself, or the request is untraced)."""
    f = _S.forward
    if f is None or not traceparent:
        return {}
    with f.lock:
        spans = f.by_trace.pop(traceparent[3:35], None)
    return {"spans": spans, "sent_ns": time.time_ns()} if spans else {}


def _valid_record(r) -> bool:
    if not isinstance(r, dict):
        return False
    ids = (r.get("trace_id"), 32), (r.get("span_id"), 16)
    if any(not isinstance(v, str) or len(v) != n or not _HEX.match(v) for v, n in ids):
        return False
    p = r.get("parent_id")
    if p is not None and (not isinstance(p, str) or len(p) != 16 or not _HEX.match(p)):
        return False
    return (isinstance(r.get("name"), str) and isinstance(r.get("service"), str)
            and all(isinstance(r.get(k), int) and r[k] >= 0 for k in ("start", "end", "kind"))
            and isinstance(r.get("attrs"), dict)
            and all(isinstance(k, str) and isinstance(v, _ATTR_TYPES) for k, v in r["attrs"].items()))


def ingest(spans) -> int:
    """Re-emit spans another process sent (`take`) through this process's exporters, unchanged. Malformed records
    are dropped (logged); returns how many were emitted."""
    if not _S.exporters or not spans:
        return 0
    if not isinstance(spans, list) or len(spans) > _MAX_SPANS:
        log.warning("dropped a malformed span list (%s)", type(spans).__name__)
        return 0
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.trace import SpanContext, SpanKind, TraceFlags
    n = 0
    for r in spans:
        if not _valid_record(r):
            log.warning("dropped a malformed span record")
            continue
        tid, flags = int(r["trace_id"], 16), TraceFlags(TraceFlags.SAMPLED)
        parent = None if r["parent_id"] is None else SpanContext(tid, int(r["parent_id"], 16), True, flags)
        try:
            kind = SpanKind(r["kind"])
        except ValueError:
            kind = SpanKind.INTERNAL
        res = _RESOURCES.get(r["service"])
        if res is None:   # (Resource.create costs ~1 ms: once per service)
            res = _RESOURCES[r["service"]] = Resource.create({"service.name": r["service"]})
            if len(_RESOURCES) > 64:
                del _RESOURCES[next(iter(_RESOURCES))]
        rs = ReadableSpan(r["name"], SpanContext(tid, int(r["span_id"], 16), False, flags), parent, res, r["attrs"],
                          kind=kind,
                          start_time=r["start"], end_time=r["end"])
        for p in _S.exporters:
            p.on_end(rs)
        n += 1
    return n
