"""OpenAI-compatible HTTP server over `LLM` (colocated, in-process disaggregated, or worker processes behind a
router), with Prometheus metrics.

    python -m serving.server [--checkpoint DIR] [--port 8000] [--mode colocated|disagg] [--workers a,b,c]
                             [--api_key_file F] [--max_queue 256] [--prefix_caching] ...

Endpoints: POST /v1/completions, POST /v1/chat/completions (both streaming SSE or not; `n`, `max_tokens`,
`temperature`, `top_p`, `top_k`, `seed`, `stop`, `stop_token_ids`, `ignore_eos`), GET /v1/models, /health (the
engine thread is alive), /ready (the engine is built and serving), /metrics (Prometheus text).

Threading: one **engine thread** owns the `LLM` (its scheduler is single-threaded): it takes submissions and aborts
from a queue and steps the engine while there is work (token rules only); a **text thread** detokenizes and applies
stop strings (`serving.stops.TextStage`; a stop string aborts through the engine's queue) and hands each request's
events to the HTTP side's event loop (`call_soon_threadsafe`). Handlers never touch the engine. A client that disconnects (streaming or not)
aborts its request, which frees its pages. Admission is bounded: more than `--max_queue` requests in flight
answer 429; a server that is not ready (or shutting down) answers 503. Bad requests answer 400 naming the field.
Binds 127.0.0.1 unless told otherwise; with an API key every /v1 call needs `Authorization: Bearer <key>`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import json
import logging
import os
import queue
import threading
import time
import uuid
from typing import Any

import numpy as np

from serving.api import Event, Request
from serving.metrics import Metrics
from serving import tracing
from serving.openai_api import (BadRequest, chat_logprobs, chat_prompt, chat_template_of, completion_logprobs,
                                completion_prompts, sampling_of)

log = logging.getLogger(__name__)

# ---- the engine thread -------------------------------------------------------------------------------------------------
@dataclasses.dataclass(eq=False)
class Handle:
    """One request's link between the engine thread and its HTTP handler."""

    req: Request
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    per_prompt: int = 1   # choices per prompt (`n`): a batch's prompts are every per_prompt-th handle

    def push(self, ev: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, ev)
        except RuntimeError:   # the HTTP side's loop is gone (shutdown): nobody to tell
            pass


class EngineLoop:
    """Owns the `LLM` on its own thread; `submit`/`abort` are thread-safe and never block on the engine."""

    def __init__(self, llm, *, max_queue: int = 256, metrics: Metrics | None = None):
        self.llm, self.max_queue = llm, max_queue
        self.metrics = metrics or Metrics()
        self._cmds: queue.Queue = queue.Queue()
        self._live: dict[str, Handle] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.error: str | None = None
        self._page_bytes = self._transfer_page_bytes()
        # the engine thread only steps the engine (token rules); text and stop strings run on the text thread
        self._texts: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._text_thread = threading.Thread(target=self._run_text, name="text", daemon=True)
        self._thread.start()
        self._text_thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def in_flight(self) -> int:
        with self._lock:
            return len(self._live)

    def submit(self, handles: list[Handle]) -> None:
        """Admit all of `handles` or none (429 when the queue would overflow)."""
        with self._lock:
            if len(self._live) + len(handles) > self.max_queue:
                raise OverflowError(f"{len(self._live)} requests in flight (limit {self.max_queue}); retry later")
            for h in handles:
                self._live[h.req.id] = h
        self._cmds.put(("submit", handles))

    def abort(self, rid: str) -> None:
        self._cmds.put(("abort", rid))

    def close(self) -> None:
        self._stop.set()
        self._cmds.put(("stop", None))
        self._thread.join(timeout=30)
        self._texts.put(None)
        self._text_thread.join(timeout=30)

    def _transfer_page_bytes(self) -> int:
        llm = self.llm
        if getattr(llm, "prefill_engine", None) is not None:
            return llm.prefill_engine.page_bytes
        return 0

    def _run(self) -> None:
        llm = self.llm
        try:
            while not self._stop.is_set():
                try:   # idle: block (bounded) until a command comes; busy: only take what is there
                    cmd = self._cmds.get_nowait() if llm.has_work() else self._cmds.get(timeout=1.0)
                except queue.Empty:
                    cmd = None
                aborted = False
                while cmd is not None:
                    kind, arg = cmd
                    if kind == "stop":
                        return
                    if kind == "submit":
                        for h in arg:
                            llm.add_request(h.req)
                    elif kind == "abort":
                        llm.abort(arg)
                        aborted = True
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                if llm.has_work() or aborted:   # an abort's final event comes out of the next step
                    events = llm.step(text=False)
                    if events:
                        self._texts.put(events)
                self._sample_gauges()
        except Exception as e:   # the engine died: every waiting handler gets an error, /health goes red
            log.exception("engine loop failed")
            self.error = f"{type(e).__name__}: {e}"
            with self._lock:
                live, self._live = list(self._live.values()), {}
            for h in live:
                h.req.finish_reason, h.req.error = "error", self.error
                h.push(Event(h.req, [], "", True))

    def _run_text(self) -> None:
        """Detokenize and apply stop strings off the engine thread; a stop string aborts through the engine's
        command queue."""
        while True:
            try:
                events = self._texts.get(timeout=1.0)
            except queue.Empty:
                if self._stop.is_set():
                    return
                continue
            if events is None:
                return
            try:
                for ev in self.llm.apply_text(events, abort=self.abort):
                    self._deliver(ev)
            except Exception:   # one bad event never stops the stream of the others
                log.exception("text stage failed")
                for ev in events:
                    if ev.finished:
                        self._deliver(ev)

    def _deliver(self, ev: Event) -> None:
        with self._lock:
            h = self._live.get(ev.request.id)
            if h is not None and ev.finished:
                del self._live[ev.request.id]
        if h is None:
            return
        if ev.finished:
            r = ev.request
            n_pages = -(-len(r.prompt_ids) // self.llm.engine_config.page_size) if self._page_bytes else 0
            self.metrics.observe(r, n_pages * self._page_bytes)
        h.push(ev)

    _last_gauges = 0.0

    def _sample_gauges(self) -> None:
        now = time.monotonic()
        if now - self._last_gauges < 0.25:
            return
        self._last_gauges = now
        m, llm = self.metrics, self.llm
        s = getattr(llm, "scheduler", None)
        m.queue.set(self.in_flight())
        if s is not None:
            st = s.stats()
            m.running.set(st["running"])
            m.waiting.set(st["waiting"] + st["prefilling"] + st["in_prefill"] + st["ready"])
            m.prefill_budget.set(getattr(s, "prefill_stats", {}).get("colocated_budget", 0))
        try:
            for eng, st in llm.page_stats().items():
                for k in ("free", "used", "leased", "cached"):
                    m.pages.labels(eng, k).set(st.get(k, 0))
            for eng, st in llm.prefix_cache_stats().items():
                for tier in ("device", "host", "disk"):
                    m.prefix_hit_rate.labels(eng, tier).set(st.get(f"hit_rate_{tier}", 0.0))
            for eng, st in llm.expert_stats().items():
                m.expert_copies.labels(eng).set(st["copies"])
                m.eplb_rebalances.labels(eng).set(st["rebalances"])
                for i, x in enumerate(st["imbalance"]):
                    m.expert_imbalance.labels(eng, str(i)).set(x)
        except Exception:   # remote stats can time out; gauges are best effort
            log.debug("stats unavailable", exc_info=True)


# ---- the ASGI app ------------------------------------------------------------------------------------------------------
def build_app(engine: EngineLoop, *, model_name: str, chat_template: str, api_key: str | None = None,
              default_max_tokens: int = 16):
    from starlette.applications import Starlette
    from starlette.requests import Request as HTTPRequest
    from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
    from starlette.routing import Route

    llm = engine.llm
    created = int(time.time())

    def error(status: int, msg: str, kind: str = "invalid_request_error") -> JSONResponse:
        engine.metrics.rejected.labels(str(status)).inc()
        return JSONResponse({"error": {"message": msg, "type": kind, "code": status}}, status_code=status)

    def authorized(request: HTTPRequest) -> bool:
        if api_key is None:
            return True
        got = request.headers.get("authorization", "")
        return hmac.compare_digest(got.encode(), f"Bearer {api_key}".encode())

    async def health(request):
        return PlainTextResponse("ok" if engine.alive else f"engine failed: {engine.error}",
                                 status_code=200 if engine.alive else 503)

    async def ready(request):
        ok = engine.alive and not engine._stop.is_set()
        return PlainTextResponse("ready" if ok else "not ready", status_code=200 if ok else 503)

    async def models(request):
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                                         "owned_by": "tandem", "max_model_len": llm.max_model_len}]})

    async def tokenizer_api(request: HTTPRequest):
        """vLLM's /tokenize, /detokenize and /tokenizer_info (what lm-evaluation-harness's remote tokenizer calls)."""
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        tok, what = llm.tokenizer, request.url.path.strip("/")
        if tok is None:
            return error(400, "this model has no tokenizer.json: send and read token ids")
        if what == "tokenizer_info":
            eos = [tok.id_to_token(i) for i in llm.backend.eos_ids]
            return JSONResponse({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos[0] if eos else None,
                                 "bos_token": None, "pad_token": None, "chat_template": chat_template,
                                 "model_max_length": llm.max_model_len, "vocab_size": llm.backend.vocab_size})
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "request body is not valid JSON")
        try:
            if what == "detokenize":
                ids = body.get("tokens") if isinstance(body, dict) else None
                if not isinstance(ids, list) or any(not isinstance(t, int) or isinstance(t, bool) or
                                                    not 0 <= t < llm.backend.vocab_size for t in ids):
                    raise BadRequest(f"'tokens' must be a list of token ids in [0, {llm.backend.vocab_size})")
                return JSONResponse({"prompt": tok.decode(ids)})
            if not isinstance(body, dict) or not isinstance(body.get("prompt", body.get("messages")), (str, list)):
                raise BadRequest("give 'prompt' (a string) or 'messages' (a chat)")
            text = chat_prompt(body, chat_template) if "messages" in body else body["prompt"]
            if not isinstance(text, str):
                raise BadRequest("'prompt' must be a string")
            ids = tok.encode(text, add_special_tokens=bool(body.get("add_special_tokens", True)))
        except BadRequest as e:
            return error(400, str(e))
        return JSONResponse({"tokens": ids, "count": len(ids), "max_model_len": llm.max_model_len})

    async def metrics(request):
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def _watch_disconnect(request: HTTPRequest) -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    async def serve(request: HTTPRequest, chat: bool):
        arrival = time.perf_counter()   # its queue time and trace start here
        if not authorized(request):
            return error(401, "missing or wrong API key (Authorization: Bearer ...)", "authentication_error")
        if not engine.alive or engine._stop.is_set():
            return error(503, f"engine not available: {engine.error or 'shutting down'}", "server_error")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "request body is not valid JSON")
        if not isinstance(body, dict):
            return error(400, "request body must be a JSON object")
        try:
            if body.get("model") not in (None, model_name):
                raise BadRequest(f"model {body.get('model')!r} is not served here (this server serves "
                                 f"{model_name!r})")
            params, n = sampling_of(body, default_max_tokens, chat)
            prompts = [chat_prompt(body, chat_template)] if chat else completion_prompts(body)
            echo = not chat and bool(body.get("echo"))
            base = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:16]}"
            reqs = []
            for j, prompt in enumerate(prompts):   # choice index j * n + i, as OpenAI numbers a batch's choices
                for i in range(n):   # n choices: n requests; distinct seeds when the client fixed one
                    p = params if n == 1 or params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                    try:
                        reqs.append(llm.make_request(prompt, p, f"{base}-{j * n + i}", arrival=arrival))
                    except ValueError as e:
                        raise BadRequest(f"prompt {j}: {e}" if len(prompts) > 1 else str(e)) from None
        except (BadRequest, ValueError) as e:
            return error(400, str(e))
        loop = asyncio.get_running_loop()
        handles = [Handle(r, loop, asyncio.Queue(), n) for r in reqs]
        try:
            engine.submit(handles)
        except OverflowError as e:
            return error(429, str(e), "rate_limit_error")
        stream = bool(body.get("stream"))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if stream:
            return StreamingResponse(_stream(request, handles, base, chat, include_usage, echo),
                                     media_type="text/event-stream")
        watch = asyncio.ensure_future(_watch_disconnect(request))
        try:
            done = asyncio.ensure_future(asyncio.gather(*[_drain(h) for h in handles]))
            await asyncio.wait([done, watch], return_when=asyncio.FIRST_COMPLETED)
            if not done.done():   # the client went away: abort, free the pages
                for h in handles:
                    engine.abort(h.req.id)
                done.cancel()
                return Response(status_code=499)
        finally:
            watch.cancel()
        return JSONResponse(_final(handles, base, chat, echo))

    async def _drain(h: Handle) -> None:
        while True:
            ev = await h.events.get()
            if ev.finished:
                return

    def _choice_text(h: Handle) -> str:
        return h.req.text if llm.tokenizer is not None else ""

    def _usage(handles) -> dict:
        p = sum(len(h.req.prompt_ids) for h in handles[::handles[0].per_prompt])
        c = sum(len(h.req.output_ids) for h in handles)
        cached = sum(h.req.cached_tokens for h in handles)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
                "prompt_tokens_details": {"cached_tokens": cached}}

    @functools.lru_cache(maxsize=1 << 16)
    def piece(t: int) -> str:
        """A token's text (logprobs name tokens by text, as OpenAI does)."""
        return llm.tokenizer.decode([t]) if llm.tokenizer is not None else str(t)

    def _echo(r) -> tuple[str, dict | None]:
        """An echoed prompt: its text and, when logprobs are asked, its tokens' logprobs (the first null)."""
        text = llm.tokenizer.decode(r.prompt_ids.tolist()) if llm.tokenizer is not None else ""
        lps = None
        if r.params.logprobs is not None:
            lps = completion_logprobs(r.prompt_ids.tolist(), r.prompt_logprobs or [None] * len(r.prompt_ids), piece)
        return text, lps

    def _logprobs(r, token_ids, lps, chat, offset=0):
        if r.params.logprobs is None:
            return None
        return chat_logprobs(token_ids, lps, piece) if chat else completion_logprobs(token_ids, lps, piece, offset)

    def _joined(a: dict | None, b: dict) -> dict:
        return b if a is None else {k: a[k] + b[k] for k in b}

    def _final(handles, base, chat, echo=False) -> dict:
        choices = []
        for i, h in enumerate(handles):
            r = h.req
            fr = "length" if r.finish_reason == "length" else ("stop" if r.finish_reason == "stop" else
                                                               r.finish_reason)
            c = {"index": i, "finish_reason": fr, "token_ids": list(r.output_ids)}
            if r.error:
                c["error"] = r.error
            if chat:
                c["message"] = {"role": "assistant", "content": _choice_text(h)}
                c["logprobs"] = _logprobs(r, r.output_ids, r.output_logprobs or [], True)
            else:
                head, head_lps = _echo(r) if echo else ("", None)
                c["text"] = head + _choice_text(h)
                lps = _logprobs(r, r.output_ids, r.output_logprobs or [], False, len(head))
                c["logprobs"] = None if lps is None else _joined(head_lps, lps)
            choices.append(c)
        return {"id": base, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": model_name, "choices": choices, "usage": _usage(handles)}

    async def _stream(request: HTTPRequest, handles, base, chat, include_usage, echo=False):
        obj = "chat.completion.chunk" if chat else "text_completion"
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(i, h):
            while True:
                ev = await h.events.get()
                await merged.put((i, ev))
                if ev.finished:
                    return

        tasks = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(handles)]
        finished, offsets = 0, [0] * len(handles)   # text_offset of each choice's next token
        headed = [not echo] * len(handles)            # echo: the prompt goes first, once per choice
        try:
            if chat:
                for i in range(len(handles)):
                    yield _sse({"id": base, "object": obj, "created": created, "model": model_name,
                                "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                             "finish_reason": None}]})
            while finished < len(handles):
                i, ev = await merged.get()
                r = ev.request
                fr = None
                if ev.finished:
                    finished += 1
                    fr = "length" if r.finish_reason == "length" else ("stop" if r.finish_reason == "stop" else
                                                                        r.finish_reason)
                if not ev.new_token_ids and not ev.new_text and fr is None:
                    continue
                text = ev.new_text if llm.tokenizer is not None else ""
                c = {"index": i, "finish_reason": fr, "token_ids": list(ev.new_token_ids)}
                lps = _logprobs(r, ev.new_token_ids, ev.new_logprobs or [], chat, offsets[i])
                if chat:
                    c["delta"] = {"content": text} if text or fr is None else {}
                    c["logprobs"] = lps
                else:
                    head, head_lps = ("", None)
                    if not headed[i]:
                        headed[i] = True
                        head, head_lps = _echo(r)   # the first chunk: the prompt first
                        lps = _logprobs(r, ev.new_token_ids, ev.new_logprobs or [], chat, len(head))
                    c["text"], c["logprobs"] = head + text, None if lps is None else _joined(head_lps, lps)
                    if lps is not None:
                        offsets[i] = lps["text_offset"][-1] + len(lps["tokens"][-1]) if lps["tokens"] else offsets[i]
                if r.error and fr is not None:
                    c["error"] = r.error
                yield _sse({"id": base, "object": obj, "created": created, "model": model_name, "choices": [c]})
                if ev.new_token_ids:   # (sent: the generator resumes once the chunk is written)
                    tracing.responded(r, time.perf_counter())
            if include_usage:
                yield _sse({"id": base, "object": obj, "created": created, "model": model_name, "choices": [],
                            "usage": _usage(handles)})
            yield "data: [DONE]\n\n"
        finally:   # a disconnect cancels this generator: abort whatever has not finished
            for t in tasks:
                t.cancel()
            if finished < len(handles):
                for h in handles:
                    if h.req.finish_reason is None:
                        engine.abort(h.req.id)

    async def completions(request):
        return await serve(request, chat=False)

    async def chat_completions(request):
        return await serve(request, chat=True)

    return Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/ready", ready, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/tokenize", tokenizer_api, methods=["POST"]),
        Route("/detokenize", tokenizer_api, methods=["POST"]),
        Route("/tokenizer_info", tokenizer_api, methods=["GET"]),
    ])


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, default=_np_default)}\n\n"


def _np_default(x):
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    raise TypeError(type(x).__name__)


class Server:
    """uvicorn in a background thread (tests, embedding); `url` once started. `python -m serving.server` runs it
    in the foreground instead."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import socket

        import uvicorn

        if port == 0:
            with socket.socket() as s:
                s.bind((host, 0))
                port = s.getsockname()[1]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                     timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, name="http", daemon=True)

    def start(self, timeout: float = 30.0) -> "Server":
        self._thread.start()
        end = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > end:
                raise RuntimeError(f"HTTP server on {self.url} did not start within {timeout}s")
            self._thread.join(timeout=0.01)   # bounded wait for uvicorn's start flag
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


# ---- entry point -------------------------------------------------------------------------------------------------------
def _define_flags():
    from absl import flags

    from serving import flags as serving_flags

    f = flags
    f.DEFINE_string("host", "127.0.0.1", "address to bind (default loopback only)")
    f.DEFINE_integer("port", 8000, "HTTP port")
    f.DEFINE_string("served_model_name", None, "model id in the API (default: the checkpoint directory's name)")
    f.DEFINE_string("api_key_file", None, "file holding an API key clients must send as 'Bearer <key>' (default: "
                    "$TANDEM_API_KEY if set, else no key)")
    f.DEFINE_integer("max_queue", 256, "requests in flight before new ones get 429")
    f.DEFINE_integer("default_max_tokens", 64, "max_tokens when a request does not set it")
    f.DEFINE_string("otlp_traces_endpoint", None, "OTLP/HTTP traces URL (e.g. http://127.0.0.1:4318/v1/traces): one "
                    "trace per request across the router and workers (docs/tracing.md); off by default")
    f.DEFINE_float("trace_sample_ratio", 1.0, "fraction of requests traced when --otlp_traces_endpoint is set")
    serving_flags.define_engine_flags()
    serving_flags.define_pool_flags()


def main(argv):
    del argv
    from absl import flags

    from serving import flags as serving_flags
    from serving.config import ONLINE_PREFILL_BUDGET

    F = flags.FLAGS
    ckpt = serving_flags.checkpoint(F)
    key = None
    if F.api_key_file:
        with open(F.api_key_file) as fh:
            key = fh.read().strip()
    key = key or os.environ.get("TANDEM_API_KEY") or None
    name = F.served_model_name or os.path.basename(os.path.normpath(ckpt))
    if F.otlp_traces_endpoint:
        tracing.configure("tandem-server", endpoint=F.otlp_traces_endpoint, sample_ratio=F.trace_sample_ratio)
    llm = serving_flags.llm(ONLINE_PREFILL_BUDGET, F)
    engine = EngineLoop(llm, max_queue=F.max_queue)
    app_ = build_app(engine, model_name=name, chat_template=chat_template_of(ckpt), api_key=key,
                     default_max_tokens=F.default_max_tokens)
    import uvicorn

    print(f"TANDEM_SERVER_READY http://{F.host}:{F.port} model={name}", flush=True)
    try:
        uvicorn.run(app_, host=F.host, port=F.port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        engine.close()
        llm.close()
        tracing.shutdown()


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
