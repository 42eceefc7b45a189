"""`LLM`: the programmatic API (vLLM-like), one frontend over two backends.

    from serving import LLM, SamplingParams
    llm = LLM()                                                     # shipped model, colocated on one device
    llm = LLM(mode="disagg", prefill_mesh="tp=2", decode_mesh="ep=4")   # PD on disjoint fake/real devices
    llm = LLM(workers=["127.0.0.1:7101", "127.0.0.1:7201"])         # worker processes, in-process router
    llm = LLM(router="127.0.0.1:7000")                              # a running `python -m serving.router`
    outs = llm.generate(["To be, or not"], SamplingParams(max_tokens=32))
    for ev in llm.generate_stream(prompts, params): ...             # tokens as they come

The frontend validates prompts and sampling params (`serving.api`), hands `Request`s to its backend
(`serving.backend`: the in-process scheduler, or the router) and turns their `Event`s into `RequestOutput`s.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import threading
import time
from typing import Iterator, Sequence

import checkpoints
from model.runtime import Runtime
from serving.api import Event, Request, RequestOutput, Tokenizer, as_prompt_list, new_request, output_of, params_list
from serving.backend import Backend, LocalBackend, RemoteBackend
from serving.build import build_engine
from serving.grammar import Grammars
from serving.config import DEFAULT_CHECKPOINT, OFFLINE_PREFILL_BUDGET, default_max_model_len, EngineConfig, parse_mesh_spec, SchedulerConfig
from serving.protocol import read_token
from serving.router import RouterConfig
from serving.sampling import SamplingParams
from serving.stops import TextStage
from serving import tracing
from serving.scheduler import Scheduler
from sharding import DECODE_RULES, PREFILL_RULES, Topology

log = logging.getLogger(__name__)


class LLM:
    def __init__(self, checkpoint: str | None = None, *, model=None, tokenizer: Tokenizer | None = None,
                 mode: str = "colocated", prefill_mesh: str | None = None, decode_mesh: str = "ep=1",
                 engine_config: EngineConfig | None = None, prefill_config: EngineConfig | None = None,
                 scheduler_config: SchedulerConfig | None = None, quant: str | None = None, dtype=None,
                 runtime: Runtime | None = None, topology: Topology | None = None, mtp: bool | None = None,
                 prefix_caching: bool | None = None, kv_memory_fraction: float | None = None,
                 device_memory_gb: float | None = None,
                 prefill_rules=None, decode_rules=None,
                 workers: Sequence[str] | None = None, router: str | None = None,
                 router_config: RouterConfig | None = None, token: str | None = None,
                 ready_timeout_s: float = 120.0):
        """Local engines (default) or worker processes (`workers=` / `router=`).

        checkpoint: HF DeepSeek-V3 directory (default: the shipped model); loaded straight onto each engine's
            mesh, in `dtype` (default: by platform, float32 on CPU and bfloat16 on GPU — `serving.config`), `quant` as in
            `checkpoints.load`. Or `model=`: an already built model, placed onto each engine's mesh.
        mode: "colocated" (one mesh prefills and decodes) or "disagg" (prefill on its own mesh and thread).
        prefill_mesh / decode_mesh: 'dp=..,ep=..,tp=..' over disjoint devices of `topology` (default prefill
            'tp=1').
        runtime: kernel choices (`model.runtime.Runtime`: matmul_impl "xla" / "pallas" / "pallas_interpret",
            moe_impl); the expert-parallel dispatch is set per mesh.
        mtp: speculative decoding with the checkpoint's MTP module (overrides engine_config.mtp).
        prefix_caching: reuse cached prompt prefixes (overrides engine_config.prefix_caching; host/disk tiers are
            EngineConfig fields, see `serving.prefix_cache`).
        kv_memory_fraction: size each engine's KV cache from this fraction of its device memory (minus weights and
            executable temporaries) instead of engine_config.num_pages; `device_memory_gb` where the devices do
            not report their memory (CPU).
        workers / router: serve through PD worker processes instead (`docs/pd_multiprocess.md`); the workers
            own engines and weights, so only `checkpoint` (for the tokenizer), `tokenizer`, `router_config` and
            `token` (default $TANDEM_TOKEN) apply; `ready_timeout_s` bounds the wait for a live decode worker.
        prefill_rules / decode_rules: the pools' `sharding.AxisRules` (default PREFILL_RULES / DECODE_RULES), e.g.
            `DECODE_RULES.replace(vocab="ep")` for a vocabulary-parallel embedding and head over the EP ranks.
        """
        self._ids = itertools.count()
        self._grammars: Grammars | None = None
        self.prefill_engine = self.decode_engine = self.scheduler = None
        if workers is not None or router is not None:
            given = dict(model=model, prefill_mesh=prefill_mesh, engine_config=engine_config,
                         prefill_config=prefill_config, scheduler_config=scheduler_config, quant=quant, dtype=dtype,
                         runtime=runtime, topology=topology, mtp=mtp, prefix_caching=prefix_caching,
                         kv_memory_fraction=kv_memory_fraction,
                         device_memory_gb=device_memory_gb, prefill_rules=prefill_rules, decode_rules=decode_rules)
            bad = sorted(k for k, v in given.items() if v is not None)
            if bad or mode != "colocated" or decode_mesh != "ep=1":
                raise ValueError(f"{bad or ['mode/decode_mesh']} do not apply with workers=/router=: the worker "
                                 "processes own the engines")
            self.tokenizer = tokenizer or Tokenizer.of_checkpoint(checkpoint)
            token = token if token is not None else read_token(None)
            self.backend: Backend = RemoteBackend.connect(workers=workers, router=router, token=token,
                                                          router_config=router_config,
                                                          ready_timeout_s=ready_timeout_s)
            self.text = TextStage(self.tokenizer.decode if self.tokenizer else None, self.backend.eos_ids)
            self.mode = "remote"
            return
        if mode not in ("colocated", "disagg"):
            raise ValueError(f"mode={mode!r}: expected 'colocated' or 'disagg'")
        if prefill_mesh is not None and mode != "disagg":
            raise ValueError("prefill_mesh is only meaningful with mode='disagg'")
        if model is None:
            checkpoint = checkpoint or DEFAULT_CHECKPOINT
            if not os.path.isdir(checkpoint):
                raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
            tokenizer = tokenizer or Tokenizer.of_checkpoint(checkpoint)
            mcfg = checkpoints.config_of(checkpoint)
        else:
            mcfg = model.cfg
        self.tokenizer, self.mode = tokenizer, mode
        ec = engine_config or EngineConfig(max_model_len=default_max_model_len(mcfg.max_position_embeddings, 16))
        if ec.max_model_len > mcfg.max_position_embeddings:
            log.warning("max_model_len=%d exceeds the model's max_position_embeddings=%d: positions past it were "
                        "never trained", ec.max_model_len, mcfg.max_position_embeddings)
        if mtp is not None:
            ec = dataclasses.replace(ec, mtp=mtp)
        if prefix_caching is not None:
            ec = dataclasses.replace(ec, prefix_caching=prefix_caching)
        pc = dataclasses.replace(prefill_config or ec, mtp=ec.mtp)
        if prefix_caching is not None:
            pc = dataclasses.replace(pc, prefix_caching=prefix_caching)
        self.engine_config = ec
        topo = topology or Topology.from_devices()
        self.topology = topo

        def engine(cfg, mesh, rules, name, roles):
            return build_engine(cfg, mesh=mesh, rules=rules, name=name, roles=roles,
                                checkpoint=checkpoint if model is None else None, model=model, dtype=dtype,
                                quant=quant, runtime=runtime, kv_memory_fraction=kv_memory_fraction,
                                device_memory_gb=device_memory_gb)

        dmesh = topo.allocate("decode", **parse_mesh_spec(decode_mesh))
        self.decode_engine = engine(ec, dmesh, decode_rules or DECODE_RULES, "decode",
                                    {"decode", "receive"} if mode == "disagg" else {"prefill", "decode"})
        self.engine_config = self.decode_engine.cfg
        if mode == "disagg":
            pmesh = topo.allocate("prefill", **parse_mesh_spec(prefill_mesh or "tp=1"))
            self.prefill_engine = engine(pc, pmesh, prefill_rules or PREFILL_RULES, "prefill", {"prefill", "send"})
        self.scheduler = Scheduler(self.decode_engine, self.prefill_engine,
                                   config=scheduler_config or SchedulerConfig(prefill_budget=OFFLINE_PREFILL_BUDGET),
                                   eos_ids=mcfg.eos_token_ids)   # token rules; text: the frontend's TextStage
        self.text = TextStage(tokenizer.decode if tokenizer else None, mcfg.eos_token_ids)
        self.backend: Backend = LocalBackend(self.scheduler, vocab_size=mcfg.vocab_size, max_model_len=ec.max_model_len)

    # ---- requests ---------------------------------------------------------------------------------------------------
    @property
    def max_model_len(self) -> int:
        return self.backend.max_model_len

    def make_request(self, prompt, params: SamplingParams, request_id: str | None = None,
                     arrival: float | None = None) -> Request:
        """A validated request (ValueError naming the problem); `add_request` submits it. `arrival`: when it came
        in (perf_counter; default now), where its queue time and its trace start."""
        rid = request_id if request_id is not None else f"r{os.getpid()}-{next(self._ids)}"
        req = new_request(prompt, params, rid, tokenizer=self.tokenizer, vocab_size=self.backend.vocab_size,
                          max_model_len=self.backend.max_model_len)
        req.arrival = req.arrival if arrival is None else arrival
        tracing.begin_request(req)   # tracing on: the root span of its trace (serving.tracing)
        if params.structured_output is not None:
            req.matcher = self.grammars().matcher(params.structured_output)   # ValueError: the grammar's problem
        return req

    def grammars(self) -> Grammars:
        """The structured-output matchers of this model's tokenizer (built on first use)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise ValueError("structured_output needs the checkpoint's tokenizer.json (this model has none)")
            self._grammars = Grammars(self.tokenizer.to_json(), self.backend.vocab_size, self.backend.eos_ids)
        return self._grammars

    def add_request(self, req: Request) -> None:
        self.backend.submit(req)

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> Request:
        req = self.make_request(prompt, params or SamplingParams(), request_id)
        self.add_request(req)
        return req

    def abort(self, request_id: str) -> None:
        self.backend.abort(request_id)

    def step(self, timeout: float = 1.0, text: bool = True) -> list[Event]:
        """Make progress (local: one scheduler step; remote: wait up to `timeout` for router events). text=False:
        the events carry tokens only; the caller runs `apply_text` on them (elsewhere, e.g. another thread)."""
        with self._steps():
            events = self.backend.events(timeout)
        return self.apply_text(events) if text else events

    def _steps(self) -> threading.RLock:
        """Held around each step, and around a whole `generate`: an LLM that a server's engine thread steps and
        that is also used directly (tests) is never stepped from two threads, nor its events taken by the other."""
        return self.__dict__.setdefault("_step_lock", threading.RLock())

    def apply_text(self, events: list[Event], abort=None) -> list[Event]:
        """Detokenize and apply stop strings (`serving.stops.TextStage`); a stop string aborts the rest of its
        request through `abort` (default: this LLM's; the HTTP server passes its engine thread's queue)."""
        t0 = time.perf_counter()
        out = self.text.apply(events, abort or self.abort)
        if tracing.enabled():   # the first token's detokenize span; at the end the engine phases, the root span
            tracing.frontend_spans(out, t0, time.perf_counter(), local=self.scheduler is not None)
        return out

    def has_work(self) -> bool:
        return self.backend.has_work()

    # ---- batch APIs -------------------------------------------------------------------------------------------------
    def _submit_all(self, prompts: Sequence, sampling_params) -> list[Request]:
        prompts = as_prompt_list(prompts)
        params = params_list(len(prompts), sampling_params)
        reqs = [self.make_request(p, sp) for p, sp in zip(prompts, params)]  # validate all before submitting any
        for r in reqs:
            self.add_request(r)
        return reqs

    def _stream(self, reqs: list[Request]) -> Iterator[Event]:
        pending = {r.id for r in reqs}
        while pending:
            for ev in self.step():
                yield ev
                if ev.finished:
                    pending.discard(ev.request.id)

    def generate_stream(self, prompts: Sequence, sampling_params=None) -> Iterator[Event]:
        """Submit all prompts, then yield `Event`s (new tokens/text per request) until every one has finished."""
        return self._stream(self._submit_all(prompts, sampling_params))

    def generate(self, prompts: Sequence, sampling_params=None) -> list[RequestOutput]:
        """Outputs in prompt order, each with text, token ids, finish reason and metrics."""
        with self._steps():
            reqs = self._submit_all(prompts, sampling_params)
            for _ in self._stream(reqs):
                pass
        return [output_of(r) for r in reqs]

    def page_pools(self) -> dict:
        """{engine name: its `serving.pages.PagePool`} of the local engines (the scheduler side owns the pages)."""
        return dict(self.backend.pools()) if self.scheduler is not None else {}

    def page_stats(self) -> dict[str, dict[str, int]]:
        """{engine or worker: {free, used, leased, cached, total}} KV pages."""
        return self.backend.page_stats()

    def prefix_cache_stats(self) -> dict[str, dict]:
        """{engine or worker: prefix-cache counters} (hits per tier, evictions, blocks/bytes per tier) of the
        engines with prefix caching on."""
        return self.backend.prefix_cache_stats()

    def expert_stats(self) -> dict[str, dict]:
        """{engine or worker: routing counts and EP balance} (`serving.expert_stats.ExpertStats.summary`)."""
        return self.backend.expert_stats()

    def close(self) -> None:
        self.backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
