"""serving.tracing without an engine: off by default, spans forwarded on the control plane keep their ids, parents,
times and services, and malformed spans or trace contexts are refused. (End to end: test_server.py for the
colocated server, test_pd_multiprocess.py for a disaggregated request over worker processes.)"""

import msgpack
import numpy as np
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from serving import SamplingParams, tracing
from serving.api import Request
from serving.protocol import ProtocolError, decode_message, encode_message


@pytest.fixture(autouse=True)
def _off_after():
    yield
    tracing.shutdown()


def _req(trace=None):
    return Request(id="r1", prompt_ids=np.arange(5, dtype=np.int32), params=SamplingParams(), seed=0, limit=4,
                   trace=trace)


def test_off_by_default_nothing_is_traced():
    assert not tracing.enabled()
    r = _req()
    tracing.begin_request(r)
    assert r.trace is None and r.trace_span is None
    assert tracing.take("00-" + "1" * 32 + "-" + "2" * 16 + "-01") == {}
    assert tracing.ingest([{"name": "x"}]) == 0


def test_worker_spans_travel_back_unchanged():
    # the frontend: a root span and its traceparent (what goes on the control plane)
    mem = InMemorySpanExporter()
    tracing.configure("frontend", exporter=mem)
    r = _req()
    tracing.begin_request(r)
    assert tracing.valid_traceparent(r.trace)
    tp, root = r.trace, r.trace_span.span
    # a worker (another process in real life): phase spans under that context, kept for the next message
    tracing.configure("tandem-decode-worker", forward=True)
    r.arrival, r.prefill_start, r.prefill_end, r.first_token_time, r.finish_time = 1.0, 1.5, 2.0, 2.25, 3.0
    r.output_ids, r.finish_reason = [1, 2, 3], "length"
    tracing.phase_spans(r, tp, first=True, last=True)
    wire = msgpack.unpackb(msgpack.packb(tracing.take(tp)))   # what the message carries
    assert tracing.take(tp) == {}                             # taken once
    assert [s["name"] for s in wire["spans"]] == ["queue", "prefill", "first_decode", "decode"]
    # back in the frontend: re-emitted through its exporter with the worker's ids, parent, times and service
    mem = InMemorySpanExporter()   # (reconfiguring shut the first one down)
    tracing.configure("frontend", exporter=mem)
    assert tracing.ingest(wire["spans"]) == 4
    got = {s.name: s for s in mem.get_finished_spans()}
    assert set(got) == {"queue", "prefill", "first_decode", "decode"}
    for s in got.values():
        assert s.context.trace_id == root.get_span_context().trace_id
        assert s.parent.span_id == root.get_span_context().span_id
        assert s.resource.attributes["service.name"] == "tandem-decode-worker"
    q = got["queue"]
    assert q.end_time - q.start_time == 500_000_000 and q.start_time == tracing.wall_ns(1.0)
    assert got["decode"].attributes["tandem.output_tokens"] == 3


def test_malformed_spans_and_trace_contexts_are_refused():
    mem = InMemorySpanExporter()
    tracing.configure("frontend", exporter=mem)
    good = {"name": "prefill", "trace_id": "a" * 32, "span_id": "b" * 16, "parent_id": "c" * 16, "start": 1,
            "end": 2, "kind": 0, "service": "w", "attrs": {"k": 1}}
    bad = [{**good, "trace_id": "xyz"}, {**good, "span_id": 5}, {**good, "attrs": {"k": [1, 2]}},
           {**good, "start": -1}, "not a map"]
    assert tracing.ingest(bad + [good]) == 1
    assert [s.name for s in mem.get_finished_spans()] == ["prefill"]
    assert tracing.ingest([good] * 65) == 0      # more than a message may carry
    frame = encode_message("prefill", None, rid="r", prompt=[1], sampling={}, uuid=1, trace="00-zz")
    with pytest.raises(ProtocolError, match="traceparent"):
        decode_message(frame)
    frame = encode_message("tokens", None, rid="r", tokens=[], finished=True, spans={"a": 1})
    with pytest.raises(ProtocolError, match="spans"):
        decode_message(frame)


def test_sampling_ratio_zero_traces_nothing():
    mem = InMemorySpanExporter()
    tracing.configure("frontend", exporter=mem, sample_ratio=0.0)
    r = _req()
    tracing.begin_request(r)
    assert r.trace is None
    with pytest.raises(ValueError, match="ratio"):
        tracing.configure("frontend", exporter=mem, sample_ratio=2.0)


def test_otlp_export_reaches_a_collector():
    """`--otlp_traces_endpoint`: the spans leave over OTLP/HTTP (protobuf) to a collector — here a local HTTP
    endpoint that decodes what it receives with the OTLP protobuf schema."""
    import gzip
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    got = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            got.append((self.path, gzip.decompress(body) if self.headers.get("Content-Encoding") == "gzip" else body))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        tracing.configure("tandem-server", endpoint=f"http://127.0.0.1:{srv.server_address[1]}/v1/traces")
        r = _req()
        tracing.begin_request(r)
        r.arrival, r.prefill_start, r.prefill_end, r.first_token_time, r.finish_time = 1.0, 1.5, 2.0, 2.25, 3.0
        tracing.phase_spans(r, r.trace, first=True, last=True)
        tracing.end(r.trace_span.span, 3.0)
        tracing.shutdown()   # flushes the batch processor
    finally:
        srv.shutdown()
        t.join(timeout=10)
    assert got and all(p == "/v1/traces" for p, _ in got)
    spans = []
    for _, body in got:
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(body)
        for rs in msg.resource_spans:
            svc = {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"]
            spans += [(svc, s.name, s.trace_id.hex()) for ss in rs.scope_spans for s in ss.spans]
    assert sorted(n for _, n, _ in spans) == ["decode", "first_decode", "prefill", "queue", "request"]
    assert {svc for svc, _, _ in spans} == {"tandem-server"}
    assert {tid for _, _, tid in spans} == {r.trace[3:35]}
