"""The OpenAI API's request side, pure (no server needed to test it): sampling fields -> `SamplingParams` with 400s
naming the field, completion and chat prompts, chat templates (jinja2 sandbox)."""

from __future__ import annotations

import json
import os

from serving.logits import MAX_LOGPROBS
from serving.sampling import SamplingParams

# A template for checkpoints without one (the shipped model): role-tagged lines, then the assistant's tag.
DEFAULT_CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


class BadRequest(ValueError):
    """A client error: answered 400 with this message."""


# ---- request parsing (pure: unit-testable without a server) ---------------------------------------------------------
def _num(body: dict, key: str, kind, default, lo=None, hi=None):
    v = body.get(key, default)
    if v is None:
        return default
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise BadRequest(f"'{key}' must be an integer, got {v!r}")
    if kind is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
        raise BadRequest(f"'{key}' must be a number, got {v!r}")
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise BadRequest(f"'{key}'={v!r} is out of range [{lo}, {hi}]")
    return v


# Fields OpenAI / vLLM clients send that this engine does not implement, with the values that mean "off": a request
# setting one to anything else is refused (400 naming it), never accepted and ignored.
NOT_IMPLEMENTED = {"min_p": (0,), "use_beam_search": (False,), "length_penalty": (1,), "tools": ([],),
                   "tool_choice": ("none",), "prompt_logprobs": ()}


def structured_of(body: dict) -> dict | None:
    """The request's grammar in `SamplingParams.structured_output` form, from OpenAI's `response_format`
    (json_object, json_schema) or vLLM's `structured_outputs` / `guided_json|regex|choice|grammar`; at most one."""
    found = []
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise BadRequest("'response_format' must be {'type': 'text' | 'json_object' | 'json_schema', ...}")
        if rf["type"] == "json_object":
            found.append({"json_object": True})
        elif rf["type"] == "json_schema":
            js = rf.get("json_schema")
            if not isinstance(js, dict) or not isinstance(js.get("schema", {}), dict):
                raise BadRequest("'response_format.json_schema' must be an object with a 'schema' object")
            found.append({"json": js.get("schema", {})})
    if body.get("structured_outputs") is not None:
        found.append(body["structured_outputs"])
    for k in ("json", "regex", "choice", "grammar"):
        if body.get(f"guided_{k}") is not None:
            found.append({k: body[f"guided_{k}"]})
    if len(found) > 1:
        raise BadRequest("give one of 'response_format', 'structured_outputs', 'guided_*'")
    return found[0] if found else None


def _logprobs_of(body: dict, chat: bool) -> int | None:
    """The top-k a request asks for (None: no logprobs). Completions: `logprobs` = k; chat: `logprobs: true` with
    `top_logprobs` = k (OpenAI's rule: top_logprobs needs logprobs)."""
    if not chat:
        v = body.get("logprobs")
        return None if v is None else _num(body, "logprobs", int, None, 0, MAX_LOGPROBS)
    on, k = body.get("logprobs"), body.get("top_logprobs")
    if on is not None and not isinstance(on, bool):
        raise BadRequest("'logprobs' must be a boolean in chat completions (top_logprobs = how many)")
    if k not in (None, 0) and not on:
        raise BadRequest("'top_logprobs' needs 'logprobs': true")
    return (_num(body, "top_logprobs", int, 0, 0, MAX_LOGPROBS)) if on else None


def sampling_of(body: dict, default_max_tokens: int, chat: bool = False) -> tuple[SamplingParams, int]:
    """(SamplingParams, n) from an OpenAI request body; BadRequest naming the field."""
    bad = sorted(k for k, neutral in NOT_IMPLEMENTED.items() if body.get(k) is not None and body[k] not in neutral)
    if bad:
        raise BadRequest(f"not supported by this engine: {', '.join(repr(k) for k in bad)} (remove the field or "
                         "leave it at its neutral value)")
    if body.get("best_of") not in (None, 1) or body.get("suffix"):
        raise BadRequest("'best_of' and 'suffix' are not supported")
    if chat and body.get("echo"):
        raise BadRequest("'echo' is a completions option (not supported in chat completions)")
    logprobs = _logprobs_of(body, chat)
    n = _num(body, "n", int, 1, 1, 16)
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
        raise BadRequest("'stop' must be a string or a list of non-empty strings")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = default_max_tokens if max_tokens is None else _num({"max_tokens": max_tokens}, "max_tokens", int,
                                                                     None, 1)
    stop_ids = body.get("stop_token_ids") or ()
    if not isinstance(stop_ids, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in stop_ids):
        raise BadRequest("'stop_token_ids' must be a list of token ids")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31):
        raise BadRequest("'seed' must be an integer in [0, 2**31)")
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise BadRequest("'logit_bias' must be an object mapping token ids to biases")
    try:
        params = SamplingParams(
            max_tokens=max_tokens, temperature=float(_num(body, "temperature", float, 1.0, 0, 2)),
            top_p=float(_num(body, "top_p", float, 1.0)), top_k=_num(body, "top_k", int, 0), seed=seed,
            stop=tuple(stop), stop_token_ids=tuple(stop_ids), ignore_eos=bool(body.get("ignore_eos", False)),
            cache_salt=body.get("cache_salt"), logprobs=logprobs,
            prompt_logprobs=logprobs if body.get("echo") and logprobs is not None else None,
            presence_penalty=float(_num(body, "presence_penalty", float, 0.0)),
            frequency_penalty=float(_num(body, "frequency_penalty", float, 0.0)),
            repetition_penalty=float(_num(body, "repetition_penalty", float, 1.0)),
            min_tokens=_num(body, "min_tokens", int, 0), logit_bias=bias, structured_output=structured_of(body))
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return params, n


# ---- logprobs in OpenAI's two response formats -----------------------------------------------------------------------
def completion_logprobs(token_ids, lps, piece, offset: int = 0) -> dict:
    """The legacy completions `logprobs` object for tokens (`lps`: TokenLogprobs or None — a prompt's first token):
    tokens (their text), token_logprobs, top_logprobs ({text: logprob}; null where none) and text_offset (from
    `offset`). `piece(id)` is a token's text."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, e in zip(token_ids, lps):
        s = piece(t)
        out["tokens"].append(s)
        out["token_logprobs"].append(None if e is None else e.logprob)
        out["top_logprobs"].append(None if e is None else {piece(i): lp for i, lp in e.top})
        out["text_offset"].append(offset)
        offset += len(s)
    return out


def chat_logprobs(token_ids, lps, piece) -> dict:
    """The chat `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}."""
    entry = lambda s, lp: {"token": s, "logprob": lp, "bytes": list(s.encode())}
    return {"content": [{**entry(piece(t), e.logprob), "top_logprobs": [entry(piece(i), lp) for i, lp in e.top]}
                        for t, e in zip(token_ids, lps)]}


MAX_PROMPTS = 256   # prompts in one completions request (a batch; each still counts against --max_queue)


def _ids(p) -> bool:
    return isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p)


def completion_prompts(body: dict) -> list:
    """`prompt` as OpenAI's completions API takes it — a string, a list of token ids, or a batch of either — as a
    list of prompts (each a string or a list of token ids)."""
    p = body.get("prompt")
    if p == [] or p == "":
        raise BadRequest("'prompt' is empty")
    if isinstance(p, str) or (_ids(p) and p):
        batch = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) or _ids(x) for x in p):
        batch = p
    else:
        raise BadRequest("'prompt' must be a string, a list of token ids, or a list of either (a batch)")
    if len(batch) > MAX_PROMPTS:
        raise BadRequest(f"'prompt' holds {len(batch)} prompts; at most {MAX_PROMPTS} per request")
    for k, x in enumerate(batch):
        if not x:
            raise BadRequest("'prompt' is empty" if len(batch) == 1 else f"'prompt'[{k}] is empty")
    return batch


def chat_prompt(body: dict, template: str) -> str:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise BadRequest("'messages' must be a non-empty list")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
            raise BadRequest(f"messages[{i}] needs a 'role' of system/user/assistant/developer")
        c = m.get("content")
        if isinstance(c, list):   # content parts: text only
            if any(not isinstance(x, dict) or x.get("type") != "text" for x in c):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            m = dict(m, content="".join(x.get("text", "") for x in c))
            msgs[i] = m
        elif not isinstance(c, str):
            raise BadRequest(f"messages[{i}].content must be a string")
    from jinja2.sandbox import ImmutableSandboxedEnvironment   # chat templates are untrusted code: sandboxed

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        return env.from_string(template).render(messages=msgs, add_generation_prompt=True, bos_token="",
                                                eos_token="")
    except Exception as e:  # a template error is the checkpoint's, but the request cannot proceed
        raise BadRequest(f"chat template failed: {e}") from None


def chat_template_of(checkpoint: str | None) -> str:
    """The checkpoint's `tokenizer_config.json` chat_template, else DEFAULT_CHAT_TEMPLATE."""
    p = os.path.join(checkpoint, "tokenizer_config.json") if checkpoint else ""
    if p and os.path.exists(p):
        with open(p) as f:
            t = json.load(f).get("chat_template")
        if isinstance(t, list):   # named templates: the default one
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        if isinstance(t, str) and t:
            return t
    return DEFAULT_CHAT_TEMPLATE
