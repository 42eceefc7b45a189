"""`LLM`: the programmatic API (vLLM-like) over engines and the scheduler.

    from serving import LLM, SamplingParams
    llm = LLM()                                                     # shipped model, colocated on one device
    llm = LLM(mode="disagg", prefill_mesh="tp=2", decode_mesh="ep=4")   # PD on disjoint fake/real devices
    outs = llm.generate(["To be, or not"], SamplingParams(max_tokens=32))
    for ev in llm.generate_stream(prompts, params): ...             # tokens as they come
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import re
import time
from typing import Iterator, Sequence

import numpy as np

from serving.engine import Engine, EngineConfig
from serving.scheduler import Event, Request, Scheduler, Status
from serving.sampling import SamplingParams

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                  "shakespeare-moe")


@dataclasses.dataclass
class RequestMetrics:
    arrival_s: float
    ttft_s: float | None          # arrival -> first token (queue + prefill + transfer)
    tpot_s: float | None          # (e2e - ttft) / (output tokens - 1)
    e2e_s: float | None
    itl_s: list[float]            # gaps between streamed chunks
    queue_s: float | None         # arrival -> prefill start
    prefill_s: float | None       # prefill start -> first token ready on the decode side (incl. transfer)
    prompt_tokens: int
    output_tokens: int
    spec_proposed: int = 0        # MTP drafts verified
    spec_accepted: int = 0        # MTP drafts accepted
    transfer_s: float | None = None   # multi-process PD: KV pull + checksum + reshard (part of prefill_s)

    @property
    def acceptance_rate(self) -> float | None:
        return self.spec_accepted / self.spec_proposed if self.spec_proposed else None


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: str | None     # "stop" | "length" | "abort" | "error"
    error: str | None
    metrics: RequestMetrics

    def to_dict(self) -> dict:
        """The batch job's output line: id, text, token_ids, finish_reason, error, metrics."""
        d = dataclasses.asdict(self)
        d.pop("prompt_token_ids")
        d["id"] = d.pop("request_id")
        d["metrics"].pop("arrival_s")  # a process-local clock reading: meaningless in a file
        return {"id": d.pop("id"), **d}


def _metrics(r: Request) -> RequestMetrics:
    ttft = None if r.first_token_time is None else r.first_token_time - r.arrival
    e2e = None if r.finish_time is None else r.finish_time - r.arrival
    n = len(r.output_ids)
    tpot = (e2e - ttft) / (n - 1) if (ttft is not None and e2e is not None and n > 1) else None
    times = sorted(set(r.token_times))
    return RequestMetrics(
        arrival_s=r.arrival, ttft_s=ttft, tpot_s=tpot, e2e_s=e2e, itl_s=list(np.diff(times).tolist()),
        queue_s=None if r.prefill_start is None else r.prefill_start - r.arrival,
        prefill_s=(None if r.prefill_start is None or r.prefill_end is None else r.prefill_end - r.prefill_start),
        prompt_tokens=len(r.prompt_ids), output_tokens=n, spec_proposed=r.spec_proposed,
        spec_accepted=r.spec_accepted, transfer_s=getattr(r, "transfer_s", None))


def output_of(r: Request) -> RequestOutput:
    return RequestOutput(r.id, r.prompt_ids.tolist(), r.text, list(r.output_ids), r.finish_reason, r.error,
                         _metrics(r))


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'tp=2' / 'ep=4' / 'dp=2,ep=2' -> {'dp':.., 'ep':.., 'tp':..}."""
    out = {"dp": 1, "ep": 1, "tp": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(dp|ep|tp)=(\d+)", part)
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"bad mesh spec {spec!r}: expected comma-separated dp=N, ep=N, tp=N")
        out[m.group(1)] = int(m.group(2))
    return out


class Tokenizer:
    """`tokenizer.json` through the `tokenizers` library."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as _T

        self._t = _T.from_file(path)

    def encode(self, text: str) -> list[int]:
        return self._t.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._t.decode(ids)


class LLM:
    def __new__(cls, *args, workers=None, router=None, **kwargs):
        """`LLM(workers=["host:port", ...])` or `LLM(router="host:port")`: the same API over worker processes
        (serving.router.RemoteLLM; see docs/pd_multiprocess.md)."""
        if workers is not None or router is not None:
            from serving.router import RemoteLLM

            return RemoteLLM(*args, workers=workers, router=router, **kwargs)
        return super().__new__(cls)

    def __init__(self, checkpoint: str | None = None, *, model=None, tokenizer: Tokenizer | None = None,
                 mode: str = "colocated", prefill_mesh: str | None = None, decode_mesh: str = "ep=1",
                 engine_config: EngineConfig | None = None, prefill_config: EngineConfig | None = None,
                 quant: str | None = None, dtype=None, topology=None, mtp: bool | None = None):
        """mode: "colocated" (one mesh prefills and decodes) or "disagg" (prefill on its own mesh and thread).
        prefill_mesh / decode_mesh: 'dp=..,ep=..,tp=..' over disjoint devices (default prefill 'tp=1').
        mtp: speculative decoding with the checkpoint's MTP module (overrides engine_config.mtp)."""
        import jax.numpy as jnp

        import checkpoints
        from sharding.rules import DECODE_RULES, PREFILL_RULES
        from sharding.topology import Topology

        if mode not in ("colocated", "disagg"):
            raise ValueError(f"mode={mode!r}: expected 'colocated' or 'disagg'")
        if model is None:
            checkpoint = checkpoint or DEFAULT_CHECKPOINT
            if not os.path.isdir(checkpoint):
                raise FileNotFoundError(f"checkpoint directory {checkpoint} does not exist")
            model = checkpoints.load(checkpoint, dtype=dtype if dtype is not None else jnp.float32, quant=quant)
            tok_path = os.path.join(checkpoint, "tokenizer.json")
            if tokenizer is None and os.path.exists(tok_path):
                tokenizer = Tokenizer(tok_path)
        self.model, self.tokenizer, self.mode = model, tokenizer, mode
        mpe = model.cfg.max_position_embeddings
        self.engine_config = engine_config or EngineConfig(max_model_len=max(16, min(512, mpe) // 16 * 16))
        if self.engine_config.max_model_len > mpe:
            log.warning("max_model_len=%d exceeds the model's max_position_embeddings=%d: positions past it were "
                        "never trained", self.engine_config.max_model_len, mpe)
        if mtp is not None:
            self.engine_config = dataclasses.replace(self.engine_config, mtp=mtp)
        if prefill_config is not None:
            prefill_config = dataclasses.replace(prefill_config, mtp=self.engine_config.mtp)
        topo = topology or Topology.from_devices()
        self.topology = topo
        dec = parse_mesh_spec(decode_mesh)
        self.decode_engine = Engine(model, self.engine_config, mesh=topo.allocate("decode", **dec),
                                    rules=DECODE_RULES, name="decode",
                                    roles={"decode", "receive"} if mode == "disagg" else {"prefill", "decode"})
        self.prefill_engine = None
        if mode == "disagg":
            pre = parse_mesh_spec(prefill_mesh or "tp=1")
            self.prefill_engine = Engine(model, prefill_config or self.engine_config,
                                         mesh=topo.allocate("prefill", **pre), rules=PREFILL_RULES, name="prefill",
                                         roles={"prefill", "send"})
        elif prefill_mesh is not None:
            raise ValueError("prefill_mesh is only meaningful with mode='disagg'")
        eos = model.cfg.eos_token_ids
        self.scheduler = Scheduler(self.decode_engine, self.prefill_engine, eos_ids=eos,
                                   detokenize=tokenizer.decode if tokenizer else None)
        self._ids = itertools.count()

    # ---- requests ---------------------------------------------------------------------------------------------------
    def _prompt_ids(self, prompt) -> np.ndarray:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("text prompt given but this model has no tokenizer.json: pass token ids")
            ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)):
            ids = list(prompt)
            if any(not isinstance(t, (int, np.integer)) or isinstance(t, bool) for t in ids):
                raise ValueError("a token-id prompt must be a list of ints")
            bad = [t for t in ids if not 0 <= t < self.model.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, "
                                 f"{self.model.cfg.vocab_size})")
        else:
            raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not ids:
            raise ValueError("empty prompt: it needs at least one token")
        if len(ids) >= self.engine_config.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {self.engine_config.max_model_len} "
                             "(prompt + at least one generated token)")
        return np.asarray(ids, np.int32)

    def make_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> Request:
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise ValueError("SamplingParams.stop needs a tokenizer (this model has none); use stop_token_ids")
        ids = self._prompt_ids(prompt)
        limit = min(params.max_tokens, self.engine_config.max_model_len - len(ids))
        return Request(id=request_id if request_id is not None else str(next(self._ids)), prompt_ids=ids,
                       params=params, seed=params.resolved_seed(), limit=limit)

    def submit(self, prompt, params: SamplingParams | None = None, request_id: str | None = None) -> Request:
        req = self.make_request(prompt, params or SamplingParams(), request_id)
        self.scheduler.add(req)
        return req

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def step(self) -> list[Event]:
        return self.scheduler.step()

    # ---- batch APIs -------------------------------------------------------------------------------------------------
    def _params_list(self, n: int, sampling_params) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * n
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        sp = list(sampling_params)
        if len(sp) != n:
            raise ValueError(f"{len(sp)} sampling params for {n} prompts")
        return sp

    def _submit_all(self, prompts: Sequence, sampling_params) -> list[Request]:
        if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
            prompts = [prompts]
        params = self._params_list(len(prompts), sampling_params)
        reqs = [self.make_request(p, sp) for p, sp in zip(prompts, params)]  # validate all before submitting any
        for r in reqs:
            self.scheduler.add(r)
        return reqs

    def _stream(self, reqs: list[Request]) -> Iterator[Event]:
        pending = {r.id for r in reqs}
        while pending:
            for ev in self.scheduler.step():
                yield ev
                if ev.finished:
                    pending.discard(ev.request.id)

    def generate_stream(self, prompts: Sequence, sampling_params=None) -> Iterator[Event]:
        """Submit all prompts, then yield `Event`s (new tokens/text per request) until every one has finished."""
        return self._stream(self._submit_all(prompts, sampling_params))

    def generate(self, prompts: Sequence, sampling_params=None) -> list[RequestOutput]:
        """Outputs in prompt order, each with text, token ids, finish reason and metrics."""
        reqs = self._submit_all(prompts, sampling_params)
        for _ in self._stream(reqs):
            pass
        return [output_of(r) for r in reqs]

    def page_stats(self) -> dict[str, dict[str, int]]:
        out = {}
        for eng in filter(None, (self.prefill_engine, self.decode_engine)):
            a = eng.allocator
            out[eng.name] = {"free": a.free, "used": a.used, "leased": a.leased, "total": a.total}
        return out

    def close(self) -> None:
        self.scheduler.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
