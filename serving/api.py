"""The serving vocabulary every frontend and backend shares — a leaf module (it imports no other serving module
but `serving.sampling`).

* requests and their results: `Request`, `Event`, `RequestOutput`, `RequestMetrics`, `output_of`;
* prompt validation (`validate_prompt`, `new_request`) with errors that name the problem;
* `Tokenizer` (`tokenizer.json` through the `tokenizers` library).
"""

from __future__ import annotations

import dataclasses
import enum
import time

import numpy as np

from model.tokenizer import Tokenizer
from serving.sampling import SamplingParams, sampling_arrays

# ---- requests -----------------------------------------------------------------------------------------------------
class Status(enum.Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass
class Request:
    """One request as a backend tracks it: prompt, sampling, the tokens so far and the clock readings behind its
    metrics. Backends own the scheduling fields (pages, chunks, drafts); frontends read the rest."""

    id: str
    prompt_ids: np.ndarray
    params: SamplingParams
    seed: int
    limit: int                                   # max new tokens after capping by max_model_len
    arrival: float = dataclasses.field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list | None = None           # a TokenLogprobs per output token (params.logprobs set)
    prompt_logprobs: list | None = None           # per prompt token, the first None (params.prompt_logprobs set)
    text: str = ""
    finish_reason: str | None = None             # stop | length | abort | error
    error: str | None = None
    aborted: bool = False
    # scheduling state of the in-process scheduler
    pages: list[int] = dataclasses.field(default_factory=list)          # decode-side pages
    chunks: list = dataclasses.field(default_factory=list)              # colocated prefill progress
    draft: int = 0                                # MTP: drafted token after the last one
    draft_q: np.ndarray | None = None             # MTP: its distribution
    spec_proposed: int = 0                        # MTP drafts verified (of tokens kept)
    spec_accepted: int = 0                        # ... and accepted
    cached_tokens: int = 0                        # prompt tokens served from the prefix cache (not prefilled)
    send_all: bool = False                        # disaggregated: send every KV page (the decode cache lost some)
    skip_pages: int = 0                           # prefill worker: leading pages the decode worker holds (not offered)
    stream_parts: bool = False                    # prefill worker: offer finished pages of a long prompt early
    stop_rules: object = dataclasses.field(default=None, repr=False, compare=False)   # serving.stops.StopRules
    text_stopped: bool = False                    # a stop string ended it (the text stage; reason stays "stop")
    matcher: object = dataclasses.field(default=None, repr=False, compare=False)   # structured output (grammar)
    # metrics
    prefill_start: float | None = None
    prefill_end: float | None = None
    first_token_time: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    finish_time: float | None = None
    transfer_s: float | None = None               # multi-process PD: KV pull + checksum + reshard
    attempts: int | None = None                   # multi-process PD: prefill/decode attempts (migrations + 1)
    workers: list[str] | None = None              # multi-process PD: workers that served it
    router_metrics: dict | None = None            # multi-process PD: the router's split (queue, prefill, transfer)
    trace: str | None = None                      # W3C traceparent of its `request` span (serving.tracing), if traced
    trace_span: object = dataclasses.field(default=None, repr=False, compare=False)   # frontend: that span

    @property
    def position(self) -> int:
        """Position of the last token (the one the next decode step consumes)."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    @property
    def salt(self) -> str | None:
        """The prefix-cache namespace of this request (`SamplingParams.cache_salt`)."""
        return self.params.cache_salt

    @property
    def cacheable(self) -> bool:
        """Whether its prompt may reuse cached blocks: not with prompt_logprobs, which need every prompt position
        computed (vLLM makes the same exception)."""
        return self.params.prompt_logprobs is None

    def sampling_row(self) -> dict:
        """The per-row sampling scalars of the compiled samplers, plus the params themselves ("params": logprobs
        and logits processors)."""
        return {**{k: v[0] for k, v in sampling_arrays([self.params], [self.seed]).items()}, "params": self.params}


@dataclasses.dataclass
class Event:
    """A streamed update: tokens appended to `request` since the last event (and its new text)."""

    request: Request
    new_token_ids: list[int]
    new_text: str
    finished: bool
    new_logprobs: list | None = None   # a TokenLogprobs per new token (requests that asked for logprobs)


def validate_prompt(prompt, *, tokenizer: Tokenizer | None, vocab_size: int, max_model_len: int) -> np.ndarray:
    """A text or token-id prompt -> int32 ids; ValueError naming the problem (no tokenizer, ids outside the
    vocabulary, empty, too long for max_model_len)."""
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("text prompt given but this model has no tokenizer.json: pass token ids")
        ids = tokenizer.encode(prompt)
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        ids = list(prompt)
        if any(not isinstance(t, (int, np.integer)) or isinstance(t, bool) for t in ids):
            raise ValueError("a token-id prompt must be a list of ints")
        bad = [int(t) for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    else:
        raise ValueError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")
    if not ids:
        raise ValueError("empty prompt: it needs at least one token")
    if len(ids) >= max_model_len:
        raise ValueError(f"prompt has {len(ids)} tokens; max_model_len is {max_model_len} (prompt + at least one "
                         "generated token)")
    return np.asarray(ids, np.int32)


def new_request(prompt, params: SamplingParams, request_id: str, *, tokenizer: Tokenizer | None, vocab_size: int,
                max_model_len: int) -> Request:
    """A validated `Request` (max new tokens capped so prompt + output fit max_model_len)."""
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling params must be SamplingParams, got {type(params).__name__}")
    if params.stop and tokenizer is None:
        raise ValueError("SamplingParams.stop needs a tokenizer (this model has none); use stop_token_ids")
    ids = validate_prompt(prompt, tokenizer=tokenizer, vocab_size=vocab_size, max_model_len=max_model_len)
    bad = [t for t, _ in params.logit_bias if t >= vocab_size]
    if bad:
        raise ValueError(f"SamplingParams.logit_bias: token ids {bad[:5]} are outside the vocabulary [0, {vocab_size})")
    return Request(id=request_id, prompt_ids=ids, params=params, seed=params.resolved_seed(),
                   limit=min(params.max_tokens, max_model_len - len(ids)))


def as_prompt_list(prompts) -> list:
    """`generate`'s prompts: one string, one token list, or a list of either -> a list of prompts."""
    if isinstance(prompts, str) or (len(prompts) and isinstance(prompts[0], (int, np.integer))):
        return [prompts]
    return list(prompts)


def params_list(n: int, sampling_params) -> list[SamplingParams]:
    if sampling_params is None:
        return [SamplingParams()] * n
    if isinstance(sampling_params, SamplingParams):
        return [sampling_params] * n
    sp = list(sampling_params)
    if len(sp) != n:
        raise ValueError(f"{len(sp)} sampling params for {n} prompts")
    return sp


# ---- results ------------------------------------------------------------------------------------------------------
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
    spec_proposed: int = 0        # MTP drafts verified whose tokens were kept
    spec_accepted: int = 0        # ... of them accepted
    transfer_s: float | None = None   # multi-process PD: KV pull + checksum + reshard (part of prefill_s)
    cached_tokens: int = 0        # prompt tokens served from the prefix cache (not prefilled)

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
    logprobs: list | None = None          # per output token: `serving.logits.TokenLogprobs` (SamplingParams.logprobs)
    prompt_logprobs: list | None = None   # per prompt token, the first None (SamplingParams.prompt_logprobs)

    def to_dict(self) -> dict:
        """The batch job's output line: id, text, token_ids, finish_reason, error, metrics."""
        d = dataclasses.asdict(self)
        d.pop("prompt_token_ids")
        d["id"] = d.pop("request_id")
        d["metrics"].pop("arrival_s")  # a process-local clock reading: meaningless in a file
        for k in ("logprobs", "prompt_logprobs"):
            if d[k] is None:
                d.pop(k)
            else:   # [logprob, [[token id, logprob], ...]] per token
                d[k] = [None if e is None else [e[0], [list(t) for t in e[1]]] for e in d[k]]
        return {"id": d.pop("id"), **d}


def metrics_of(r: Request) -> RequestMetrics:
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
        spec_accepted=r.spec_accepted, transfer_s=r.transfer_s, cached_tokens=r.cached_tokens)


def output_of(r: Request) -> RequestOutput:
    return RequestOutput(r.id, r.prompt_ids.tolist(), r.text, list(r.output_ids), r.finish_reason, r.error,
                         metrics_of(r), None if r.output_logprobs is None else list(r.output_logprobs),
                         r.prompt_logprobs)
