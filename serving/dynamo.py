"""Tandem as an NVIDIA Dynamo backend (ai-dynamo 1.6.1, the `dynamo` extra; docs/dynamo.md).

    eval "$(python -m serving.dynamo --print_env)"          # one host: file discovery, every socket on loopback
    python -m serving.dynamo --role=broker &                # the loopback ZMQ event broker (one per host)
    python -m dynamo.frontend --http-host 127.0.0.1 --http-port 8000 --router-mode kv &
    python -m serving.dynamo --role=aggregated --prefix_caching [engine flags] &
    python -m serving.dynamo --role=prefill ... / --role=decode ...          # disaggregated
    python -m planner.memory --model deepseek-v3 --mesh dp=8 --topology hgx-h200 --dynamo   # real dims, no weights

A Dynamo worker process is a Tandem worker (`serving.worker.start`: engine, page pool, prefix cache, transfer
server, and in a worker group the leader of its members) serving on its own thread, plus `TandemEngine`, Dynamo's
`LLMEngine` contract, which speaks the worker's control protocol to it over loopback. Token ids in, token ids out:
Dynamo's frontend tokenizes, applies the chat template, detokenizes and applies stop strings; Tandem applies
sampling, stop token ids, EOS and max_tokens on its side. Every option Dynamo sends is applied or refused with an
error naming it.

Disaggregation: the prefill worker answers with Tandem's transfer offer (address, uuid, layout, checksums, first
token, draft) as `disaggregated_params`; the decode worker pulls, verifies, emits the first token and continues,
then releases the offer at the prefill worker itself (Dynamo sends it no acknowledgement); an offer nobody pulls
ends with its lease (`--lease_s`). A decode request without a prefill result, or whose pull fails, is prefilled
locally.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import logging
import os
import secrets
import sys
import tempfile
import threading
import time

import zmq
import zmq.asyncio
from absl import app, flags

try:
    from dynamo.common.backend.engine import EngineConfig, LLMEngine, LlmRegistration
    from dynamo.common.backend.publisher import ComponentSnapshot, PushSource
    from dynamo.common.backend.worker import WorkerConfig
    from dynamo.common.constants import DisaggregationMode
except ImportError as e:   # the integration's own module: everything else runs without the extra
    raise ImportError("serving.dynamo needs NVIDIA Dynamo: `make setup-dynamo` (or see docs/dynamo.md for the "
                      f"offline install of ai-dynamo==1.6.1): {e}") from None

from serving import flags as serving_flags
from serving import worker_start as worker_mod
from serving.config import DEFAULT_PREFILL_TOKENS, dynamo_registration
from serving.dynamo_setup import local_env, model_card, run_broker
from serving.protocol import decode_message, encode_message, read_token
from model.tokenizer import Tokenizer
from serving.grammar import normalize as normalize_grammar
from serving.sampling import SamplingParams

log = logging.getLogger("serving.dynamo")

ROLES = ("aggregated", "prefill", "decode")
MODES = {"aggregated": DisaggregationMode.AGGREGATED, "prefill": DisaggregationMode.PREFILL,
         "decode": DisaggregationMode.DECODE}
# sampling options Tandem does not implement: refused unless absent or neutral (never accepted and ignored)
NEUTRAL_SAMPLING = {"min_p": (0, 0.0), "best_of": (1,), "use_beam_search": (False,), "length_penalty": (1, 1.0)}
NEUTRAL_STOP = {"max_thinking_tokens": ()}
PENALTIES = ("presence_penalty", "frequency_penalty", "repetition_penalty")   # applied on device, as vLLM's
GUIDED = ("json", "regex", "choice", "grammar")   # Dynamo's guided_decoding kinds Tandem's llguidance takes
WAIT_S = 0.25            # a generate loop re-checks cancellation and the worker thread this often
STALL_S = 600.0          # ... and gives a request up after this long without a message about it


class OptionError(ValueError):
    """A request option Tandem does not implement (the message names it)."""


def signed64(h: int) -> int:
    """Tandem's unsigned 64-bit block hash as the signed 64-bit id Dynamo's events carry."""
    return h - (1 << 64) if h >= (1 << 63) else h


def request_options(request: dict, max_model_len: int, vocab_size: int | None = None) -> tuple[dict, int, int]:
    """(Tandem wire sampling dict without the seed, n, max new tokens) of a Dynamo request; OptionError naming
    every option it cannot honour."""
    so = dict(request.get("sampling_options") or {})
    extra = (request.get("extra_args") or {}).get("sampling_options")
    if isinstance(extra, dict):
        so.update(extra)
    sc = request.get("stop_conditions") or {}
    oo = request.get("output_options") or {}
    bad = [f"sampling_options.{k}={v!r}" for k, v in so.items()
           if k in NEUTRAL_SAMPLING and v is not None and v not in NEUTRAL_SAMPLING[k]]
    guided = None
    gd = so.get("guided_decoding")
    if gd is not None:   # {json|regex|choice|grammar: ..., backend, whitespace_pattern, ...}: one kind, llguidance's
        kinds = {k: v for k, v in (gd.items() if isinstance(gd, dict) else ()) if v is not None}
        given = [k for k in GUIDED if k in kinds]
        other = sorted(k for k in kinds if k not in GUIDED and k not in ("backend", "whitespace_pattern"))
        if len(given) != 1 or other:
            bad.append(f"sampling_options.guided_decoding needs exactly one of {list(GUIDED)}"
                       + (f" (unsupported: {other})" if other else ""))
        else:
            try:
                guided = list(normalize_grammar({given[0]: kinds[given[0]]}))
            except ValueError as e:
                bad.append(f"sampling_options.guided_decoding: {e}")
    known = {"temperature", "top_p", "top_k", "seed", "n", "guided_decoding", *PENALTIES, *NEUTRAL_SAMPLING}
    bad += [f"sampling_options.{k}" for k, v in so.items() if k not in known and v is not None]
    bad += [f"stop_conditions.{k}={v!r}" for k, v in sc.items()
            if k in NEUTRAL_STOP and v is not None and v not in NEUTRAL_STOP[k]]
    if oo.get("prompt_logprobs") is not None:
        bad.append("output_options.prompt_logprobs (prompt log-probabilities through Dynamo are not implemented)")
    if bad:
        raise OptionError("unsupported by the Tandem engine: " + ", ".join(bad))
    prompt_len = len(request["token_ids"])
    if vocab_size is not None and any(not 0 <= int(t) < vocab_size for t in request["token_ids"]):
        raise OptionError(f"prompt token ids outside the vocabulary [0, {vocab_size})")
    if not 0 < prompt_len < max_model_len:
        raise OptionError(f"prompt of {prompt_len} tokens: this worker's context length is {max_model_len}")
    limit = max_model_len - prompt_len
    if sc.get("max_tokens") is not None:
        limit = min(limit, int(sc["max_tokens"]))
    if limit < 1:
        raise OptionError(f"stop_conditions.max_tokens={sc.get('max_tokens')!r}: nothing to generate")
    n = int(so.get("n") or 1)
    if not 1 <= n <= 16:
        raise OptionError(f"sampling_options.n={n}: expected 1..16")
    temperature = 1.0 if so.get("temperature") is None else float(so["temperature"])   # OpenAI's default
    stop_ids = sorted({int(t) for t in (sc.get("stop_token_ids") or []) + (sc.get("stop_token_ids_hidden") or [])})
    wire = {"max_tokens": limit, "temperature": temperature,
            "top_p": 1.0 if so.get("top_p") is None else float(so["top_p"]),
            "top_k": 0 if so.get("top_k") in (None, -1) else int(so["top_k"]),
            "stop": [],        # stop strings: Dynamo's frontend applies them on the text and cancels us
            "stop_token_ids": stop_ids, "ignore_eos": bool(sc.get("ignore_eos") or False),
            "min_tokens": int(sc.get("min_tokens") or 0), "structured_output": guided,
            "logprobs": None if oo.get("logprobs") is None else int(oo["logprobs"]),
            **{k: float(so[k]) for k in PENALTIES if so.get(k) is not None}}
    try:   # the worker's own validation, here, so a bad value is refused before anything is queued
        SamplingParams(**wire)
    except ValueError as e:
        raise OptionError(str(e)) from None
    return wire, n, limit


class TandemEngine(LLMEngine):
    """Dynamo's `LLMEngine` around a Tandem worker (`serving.worker.Worker`) of this process."""

    def __init__(self, worker, role: str, *, card_dir: str, served_name: str, token: str | None):
        if role not in ROLES:
            raise ValueError(f"role={role!r}: expected one of {ROLES}")
        self.worker, self.role, self.card_dir, self.served_name, self.token = worker, role, card_dir, served_name, token
        self._tok = None   # the checkpoint's tokenizer, for logprobs' token texts (built on first use)
        ec = worker.engine.cfg
        self.page_size, self.max_model_len = ec.page_size, ec.max_model_len
        self.eos_ids = list(worker.engine.model_cfg.eos_token_ids)
        self.vocab_size = worker.engine.model_cfg.vocab_size
        self._thread: threading.Thread | None = None
        self._ctx = self._sock = None
        self._tasks: list[asyncio.Task] = []
        self._queues: dict[str, asyncio.Queue] = {}
        self._peers: dict[str, object] = {}          # prefill worker address -> DEALER (releases)
        self._kv_publisher = self._snapshots = None
        self._health: dict | None = None
        self._by_context: dict[str, list[str]] = {}   # Dynamo context id -> Tandem request ids in flight
        self.ready_s: float | None = None

    # ---- lifecycle ---------------------------------------------------------------------------------------------
    @classmethod
    async def from_args(cls, argv: list[str] | None = None):
        """Dynamo's constructor contract: Tandem's flags (`python -m serving.dynamo --helpfull`) -> the built worker
        and its Dynamo settings (`python -m serving.dynamo` builds through the same `build`)."""
        if "namespace" not in flags.FLAGS:
            define_flags()
        F = flags.FLAGS
        F(["serving.dynamo", *(sys.argv[1:] if argv is None else argv)])
        if F.role not in ROLES:
            raise ValueError(f"--role={F.role!r}: a Dynamo worker is one of {ROLES}")
        engine = build(F)
        if engine is None:
            raise ValueError("a worker group's follower (--process_id > 0) serves its leader, not Dynamo")
        return engine, engine.worker_config(F)

    def worker_config(self, F) -> WorkerConfig:
        return WorkerConfig(namespace=F.namespace, component=F.component or
                            ("prefill" if self.role == "prefill" else "backend"), endpoint="generate",
                            model_name=self.card_dir, served_model_name=self.served_name,
                            endpoint_types="chat,completions", discovery_backend=F.discovery_backend,
                            request_plane=F.request_plane, event_plane=F.event_plane,
                            disaggregation_mode=MODES[self.role], enable_kv_routing=True)

    def registration(self) -> LlmRegistration:
        return registration_of(self.worker.engine, self.worker.pages.allocator.total)

    async def start(self, worker_id: int) -> EngineConfig:
        del worker_id
        self._thread = threading.Thread(target=worker_mod.run, args=(self.worker,), name="tandem-worker",
                                        daemon=True)
        self._thread.start()
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(f"tcp://{self.worker.address}")
        self._tasks = [asyncio.ensure_future(self._read_loop()), asyncio.ensure_future(self._health_loop())]
        reg = self.registration()
        log.info("registering %s (%s): block size %d, %d blocks, context %d, max seqs %s", self.served_name,
                 self.role, reg.kv_cache_block_size, reg.total_kv_blocks, reg.context_length, reg.max_num_seqs)
        return EngineConfig(model=self.card_dir, served_model_name=self.served_name, llm=reg)

    async def cleanup(self) -> None:
        for t in self._tasks:
            t.cancel()
        self._tasks = []
        if self._thread is not None:
            self.worker.stop()
            self._thread.join(timeout=30)
            self._thread = None
        for s in [self._sock, *self._peers.values()]:
            if s is not None:
                s.close(0)
        self._sock, self._peers = None, {}

    async def is_quiescent(self) -> bool | None:
        h = self._health
        if h is None:
            return None
        load = h.get("load") or {}
        return not load.get("leases") and not load.get("queued") and not load.get("pulling")

    # ---- KV-aware routing ----------------------------------------------------------------------------------------
    async def kv_event_sources(self):
        if self.worker.pages.prefix_cache is None:
            log.warning("--prefix_caching is off: this worker publishes no KV blocks (Dynamo's --router-mode kv "
                        "routes by load only)")
            return []
        self.worker.pages.prefix_cache.describe_blocks(True)
        return [PushSource(on_ready=self._on_kv_publisher, dp_rank=0)]

    def _on_kv_publisher(self, publisher) -> None:
        self._kv_publisher = publisher

    def component_metrics_dp_ranks(self) -> list[int]:
        return [0]

    def attach_snapshot_publisher(self, publisher) -> None:
        self._snapshots = publisher

    def _publish_kv(self, ev: dict | None) -> None:
        pub = self._kv_publisher
        if not ev or pub is None:
            return
        chain: list = []   # consecutive blocks (each the parent of the next) go in one stored event

        def flush():
            if chain:
                pub.publish_stored([t for _, _, toks in chain for t in toks], [len(toks) for _, _, toks in chain],
                                   [signed64(h) for h, _, _ in chain],
                                   None if chain[0][1] is None else signed64(chain[0][1]))
                chain.clear()

        for h, parent, toks in ev.get("blocks") or []:
            if toks is None:
                continue
            if chain and parent != chain[-1][0]:
                flush()
            chain.append((h, parent, toks))
        flush()
        if ev.get("removed"):
            pub.publish_removed([signed64(h) for h in ev["removed"]])

    def _publish_load(self, h: dict) -> None:
        if self._snapshots is None:
            return
        p = h["pages"]
        pc = h.get("prefix_cache") or {}
        q = pc.get("blocks_queried") or 0
        used = p["used"] + p["leased"]
        self._snapshots.publish(0, ComponentSnapshot(
            kv_used_blocks=used, kv_total_blocks=p["total"], gpu_cache_usage=used / max(p["total"], 1), dp_rank=0,
            kv_cache_hit_rate=(pc.get("hits_device", 0) / q) if q else None))

    # ---- the worker channel --------------------------------------------------------------------------------------
    async def _send(self, type_: str, **fields) -> None:
        await self._sock.send(encode_message(type_, self.token, **fields))

    async def _read_loop(self) -> None:
        while True:
            frame = await self._sock.recv()
            try:
                msg = decode_message(frame, self.token)
            except Exception:
                log.exception("undecodable message from the worker")
                continue
            if msg.get("kv_events"):
                self._publish_kv(msg["kv_events"])
            if msg["type"] == "health_ok":
                self._health = msg
                self._publish_load(msg)
                continue
            q = self._queues.get(msg.get("rid"))
            if q is not None:
                q.put_nowait(msg)
            elif msg["type"] == "error":
                log.warning("worker error: %s", msg.get("error"))

    async def _health_loop(self) -> None:
        """KV events and load 10x a second; a dead engine thread ends the process, so Dynamo's discovery drops
        this worker and its requests migrate."""
        while True:
            if self._thread is not None and not self._thread.is_alive():
                log.critical("the Tandem worker thread died: exiting so Dynamo migrates its requests")
                os._exit(3)
            await self._send("health")
            for sock in self._peers.values():   # drain the prefill workers' `released` answers
                while await sock.poll(0):
                    await sock.recv()
            await asyncio.sleep(0.1)

    async def _release_at(self, offer: dict, consumed: bool) -> None:
        """Tell the prefill worker that made `offer` it may free the pages (the decode side acknowledges itself:
        Dynamo sends the prefill worker nothing after its answer)."""
        addr = offer.get("worker")
        if not addr:
            return
        sock = self._peers.get(addr)
        if sock is None:
            sock = self._peers[addr] = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 1000)
            sock.connect(f"tcp://{addr}")
        try:
            await sock.send(encode_message("release", self.token, uuid=int(offer["uuid"]), consumed=consumed),
                            zmq.NOBLOCK)
        except zmq.ZMQError as e:   # the lease expires at the prefill worker anyway
            log.warning("release of offer %s at %s failed: %s", offer.get("uuid"), addr, e)

    async def _next(self, q: asyncio.Queue, context, rids: list[str]):
        """The next worker message of this request; None when the client went away (its requests aborted). Bounded:
        a request that hears nothing for STALL_S (queued behind a full pool, or a lost message) is aborted."""
        quiet = time.monotonic()
        while True:
            if context.is_stopped() or context.is_killed():
                for rid in rids:
                    await self._send("abort", rid=rid)
                return None
            try:
                return await asyncio.wait_for(q.get(), WAIT_S)
            except asyncio.TimeoutError:
                if self._thread is None or not self._thread.is_alive():
                    raise RuntimeError("the Tandem worker stopped") from None
                if time.monotonic() - quiet > STALL_S:
                    for rid in rids:
                        await self._send("abort", rid=rid)
                    raise RuntimeError(f"no progress from the Tandem worker in {STALL_S:.0f} s: aborted") from None

    # ---- requests ----------------------------------------------------------------------------------------------
    async def abort(self, context) -> None:
        for rid in self._by_context.get(context.id(), []):
            await self._send("abort", rid=rid)

    async def generate(self, request, context):
        try:
            wire, n, limit = request_options(request, self.max_model_len, self.vocab_size)
        except OptionError as e:   # Dynamo answers 400 and drops the text: say it here
            log.warning("request %s refused: %s", context.id(), e)
            raise
        prompt = [int(t) for t in request["token_ids"]]
        seed = request.get("sampling_options", {}).get("seed")
        prefill_result = request.get("prefill_result")
        offer = None
        if self.role == "prefill":
            n = 1
        elif prefill_result is not None:
            offer = (prefill_result.get("disaggregated_params") or {}).get("tandem_offer")
            if not isinstance(offer, dict):
                raise OptionError("prefill_result carries no Tandem offer (disaggregated_params.tandem_offer): "
                                  "was it prefilled by a Tandem prefill worker?")
            offer = dict(offer, draft_q=None if offer.get("draft_q") is None else base64.b64decode(offer["draft_q"]))
            if seed is None:
                seed = offer.get("seed")
        base = seed if seed is not None else secrets.randbelow(1 << 31)
        rids = [f"{context.id()}-{secrets.token_hex(3)}-{i}" for i in range(n)]
        q: asyncio.Queue = asyncio.Queue()
        for rid in rids:
            self._queues[rid] = q
        self._by_context[context.id()] = rids
        done = False
        try:
            if self.role == "prefill":
                async for chunk in self._prefill(rids[0], prompt, dict(wire, seed=base), q, context):
                    yield chunk
            else:
                async for chunk in self._decode(rids, prompt, wire, base, offer, q, context):
                    yield chunk
            done = True
        finally:
            if not done:   # closed early (client gone, an error): end whatever still runs; no await here
                for rid in rids:
                    self._sock.send(encode_message("abort", self.token, rid=rid), zmq.NOBLOCK)
            for rid in rids:
                self._queues.pop(rid, None)
            self._by_context.pop(context.id(), None)

    async def _prefill(self, rid, prompt, sampling, q, context):
        uuid = secrets.randbits(52)   # JSON-safe everywhere
        await self._send("prefill", rid=rid, prompt=prompt, sampling=sampling, uuid=uuid)
        msg = await self._next(q, context, [rid])
        if msg is None:
            yield _final([], 0, "cancelled", len(prompt), 0, 0)
            return
        if msg["type"] == "error":
            raise RuntimeError(f"Tandem prefill failed: {msg.get('error')}")
        offer = dict(msg["offer"], seed=sampling["seed"])
        if offer.get("draft_q") is not None:
            offer["draft_q"] = base64.b64encode(offer["draft_q"]).decode()
        chunk = _final([int(offer["first_token"])], 0, "length", len(prompt), 1, int(offer.get("cached_tokens", 0)))
        chunk["disaggregated_params"] = {"tandem_offer": offer}
        yield chunk

    async def _decode(self, rids, prompt, wire, base, offer, q, context):
        index = {rid: i for i, rid in enumerate(rids)}
        counts = dict.fromkeys(rids, 0)
        cached = dict.fromkeys(rids, 0)
        finished: dict[str, str] = {}
        for i, rid in enumerate(rids):
            # the offer serves one sequence; n > 1 prefills the others here (seeds base + i)
            await self._send("decode", rid=rid, prompt=prompt, limit=wire["max_tokens"], offer=offer if i == 0 else None,
                             sampling=dict(wire, seed=(base + i) % (1 << 31)))
        if offer is not None:
            cached[rids[0]] = int(offer.get("cached_tokens") or 0)
        live = set(rids)
        while live:
            msg = await self._next(q, context, sorted(live))
            if msg is None:
                for rid in sorted(live):
                    yield _final([], index[rid], "cancelled", len(prompt), counts[rid], cached[rid])
                return
            rid, t = msg["rid"], msg["type"]
            if t == "accepted":
                continue
            if t == "pulled":
                if not msg.get("ok"):   # the offer is gone or corrupt: prefill here instead, nothing is lost
                    log.warning("pull of %s failed (%s): prefilling locally", rid, msg.get("error"))
                    await self._send("decode", rid=rid, prompt=prompt, limit=wire["max_tokens"], offer=None,
                                     sampling=dict(wire, seed=base % (1 << 31)))
                    cached[rid] = 0
                await self._release_at(offer, consumed=bool(msg.get("ok")))
                continue
            if t == "error":
                raise RuntimeError(f"Tandem decode failed: {msg.get('error')}")
            toks = [int(x) for x in msg.get("tokens") or []]
            lp = self._logprobs(msg.get("logprobs"), len(toks))
            counts[rid] += len(toks)
            if not msg.get("finished"):
                if toks:
                    yield {"token_ids": toks, "index": index[rid], **lp}
                continue
            live.discard(rid)
            if msg.get("cached_tokens") and offer is None:
                cached[rid] = int(msg["cached_tokens"])
            reason = msg.get("reason") or "stop"
            finished[rid] = ("cancelled" if reason == "abort" else f"error: {msg.get('error')}" if reason == "error"
                             else reason)
            if toks and (live or len(rids) > 1):
                yield {"token_ids": toks, "index": index[rid], **lp}
                toks, lp = [], {}
            if live:
                continue
            # every choice done: their finish chunks together, since Dynamo 1.6.1 ends the whole stream at the first
            # finish_reason (the other choices then read "stop"); usage once, on the first
            for i, r in enumerate(rids):
                chunk = {"token_ids": toks, "index": index[r], "finish_reason": finished[r], **(lp if i == 0 else {})}
                if i == 0:
                    chunk["completion_usage"] = _usage(len(prompt), sum(counts.values()), max(cached.values()))
                yield chunk


    def _logprobs(self, wire, n: int) -> dict:
        """A worker's per-token logprobs (`TokenLogprobs.to_wire`) as Dynamo's chunk fields: `log_probs` and
        `top_logprobs` ({rank, token_id, token, logprob}, most likely first), aligned with the chunk's tokens."""
        if not wire or len(wire) != n:
            return {}
        if self._tok is None:
            self._tok = Tokenizer.of_checkpoint(self.worker.checkpoint) or False
        text = (lambda t: self._tok.decode([t])) if self._tok else (lambda t: f"token_id:{t}")
        return {"log_probs": [float(w[0]) for w in wire],
                "top_logprobs": [[{"rank": r + 1, "token_id": int(t), "token": text(int(t)), "logprob": float(v)}
                                  for r, (t, v) in enumerate(w[1])] for w in wire]}


def _usage(prompt_tokens: int, completion_tokens: int, cached: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def _final(tokens: list[int], index: int, reason: str, prompt_tokens: int, completion_tokens: int,
           cached: int) -> dict:
    return {"token_ids": tokens, "index": index, "finish_reason": reason,
            "completion_usage": _usage(prompt_tokens, completion_tokens, cached)}


def registration_of(engine, total_blocks: int) -> LlmRegistration:
    """What this worker tells Dynamo's router (`serving.config.dynamo_registration`)."""
    ec = engine.cfg
    return LlmRegistration(**dynamo_registration(
        page_size=ec.page_size, pages=total_blocks, max_model_len=ec.max_model_len,
        max_seqs=engine.decode_buckets[-1] if "decode" in engine.roles else 1,
        prefill_tokens=ec.prefill_tokens or max(DEFAULT_PREFILL_TOKENS, ec.prefill_buckets[-1])))


# ---- process entry point -----------------------------------------------------------------------------------------
def define_flags() -> None:
    f = flags
    f.DEFINE_enum("role", None, [*ROLES, "broker"], "aggregated (prefill + decode), prefill or decode worker, "
                  "or the loopback ZMQ event broker of one host")
    f.DEFINE_string("namespace", os.environ.get("DYN_NAMESPACE", "dynamo"), "Dynamo namespace")
    f.DEFINE_string("component", None, "Dynamo component (default: 'prefill' for prefill workers, else 'backend')")
    f.DEFINE_string("served_model_name", None, "model name clients use (default: the checkpoint folder's name)")
    f.DEFINE_string("discovery_backend", os.environ.get("DYN_DISCOVERY_BACKEND", "etcd"),
                    "Dynamo discovery: file (one host), etcd or kubernetes")
    f.DEFINE_string("request_plane", os.environ.get("DYN_REQUEST_PLANE", "tcp"), "Dynamo request plane")
    f.DEFINE_string("event_plane", os.environ.get("DYN_EVENT_PLANE"), "Dynamo event plane (zmq or nats)")
    f.DEFINE_string("card_dir", None, "where to write the model card when the checkpoint has no chat template "
                    "(default: a folder under the temp dir)")
    f.DEFINE_integer("xsub_port", 27101, "broker: the publishers' port")
    f.DEFINE_integer("xpub_port", 27102, "broker: the subscribers' port")
    f.DEFINE_bool("print_env", False, "print one-host Dynamo settings as shell exports and exit")
    f.DEFINE_string("state_dir", os.path.join(tempfile.gettempdir(), "tandem-dynamo"), "--print_env: where file "
                    "discovery keeps its state")
    serving_flags.define_worker_flags()


def main(argv) -> int:
    del argv
    F = flags.FLAGS
    if F.print_env:
        for k, v in local_env(F.state_dir, F.xsub_port, F.xpub_port).items():
            print(f"export {k}={json.dumps(v)}")
        return 0
    if F.role is None:
        raise app.UsageError("--role is required (aggregated, prefill, decode or broker)")
    if F.role == "broker":
        run_broker(F.host, F.xsub_port, F.xpub_port)
        return 0
    engine = build(F)
    if engine is None:   # a worker group's follower: its leader is the one Dynamo sees
        return 0
    from dynamo.common.backend.run import run

    async def factory(_argv):
        return engine, engine.worker_config(F)

    run(TandemEngine, [], engine_factory=factory)
    return 0


def build(F) -> TandemEngine | None:
    """The worker of a --role=aggregated|prefill|decode process from the flags (None on a worker group's follower,
    which has followed its leader to the end), announced on a TANDEM_DYNAMO_READY line."""
    t0 = time.perf_counter()
    w = worker_mod.start(F, "prefill" if F.role == "prefill" else "decode")
    if w is None:
        return None
    card = model_card(w.checkpoint, w.engine.cfg.max_model_len, F.card_dir)
    name = F.served_model_name or os.path.basename(os.path.abspath(w.checkpoint).rstrip("/"))
    engine = TandemEngine(w, F.role, card_dir=card, served_name=name, token=read_token(F.token_file))
    engine.ready_s = round(time.perf_counter() - t0, 2)
    print("TANDEM_DYNAMO_READY " + json.dumps({"role": F.role, "model": name, "control": w.address,
                                               "transfer": w.transport.address, "mesh": w.mesh_spec,
                                               "startup_s": engine.ready_s, "group": w.group_info,
                                               **{k: v for k, v in dataclasses.asdict(engine.registration()).items()
                                                  if v is not None}}), flush=True)
    return engine


if __name__ == "__main__":
    define_flags()
    app.run(main)
    sys.exit(0)
