"""What happens to a row's logits inside the compiled steps besides sampling: vLLM's logits processors (logit bias,
min_tokens, repetition / frequency / presence penalties) before the sampler, and log-probabilities after it (the
sampled token's and the top k, of the raw model output — vLLM's default `raw_logprobs` mode — and, in prefill, the
prompt tokens').

Everything is per-row data of fixed shape (`Proc`), so one executable serves any mix of requests with no recompile;
each part runs under `lax.cond` only when some row of the call asks for it. A row's token history (`hist`, by
position, -1 where none) lives in the call's inputs — the prompt in prefill, prompt + output in decode (sized by
the decode window) — and each decode step writes its token into it, so the penalties of step s see the tokens of
steps < s of the same dispatch.
"""

from __future__ import annotations

import typing

import jax
import jax.numpy as jnp
import numpy as np

MAX_LOGPROBS = 20      # top log-probabilities a request may ask for (vLLM's default max_logprobs)
MAX_BIAS = 300         # logit_bias entries per request (OpenAI's limit)
MAX_BAN = 16           # token ids min_tokens holds back (EOS + stop_token_ids)
PROMPT_BLOCK = 128     # prompt logprobs: positions per head call (bounds the [R, block, vocab] logits buffer)


class Proc(typing.NamedTuple):
    """Per-row inputs of one call (R prefill rows or B decode rows); numpy on the host, arrays in the step."""

    logprobs: object         # [R] int32: -1 none, k >= 0: the sampled token's logprob and the top k
    prompt_logprobs: object  # [R] int32: the same for the prompt's tokens (prefill)
    presence: object         # [R] f32 presence_penalty (0 = off)
    frequency: object        # [R] f32 frequency_penalty (0 = off)
    repetition: object       # [R] f32 repetition_penalty (1 = off)
    min_left: object         # [R] int32 output tokens still to come before a `ban` id may be sampled
    ban: object              # [R, MAX_BAN] int32 EOS + stop ids (-1 padding)
    bias_ids: object         # [R, MAX_BIAS] int32 logit_bias token ids (-1 padding)
    bias: object             # [R, MAX_BIAS] f32 their biases
    hist: object             # [R, L] int32 the row's tokens by position (-1: none)
    n_prompt: object         # [R] int32 prompt length (hist positions >= it are output tokens)
    mask: object             # [R, ceil(W / 32)] int32 bitmask of the tokens a grammar allows (all bits: no grammar)


PROC_FILL = Proc(-1, -1, 0, 0, 1, 0, -1, -1, 0, -1, 0, -1)   # an empty row's values (padding rows)


def proc_shapes(R: int, L: int, W: int) -> Proc:
    i32, f32 = jnp.int32, jnp.float32
    return Proc(((R,), i32), ((R,), i32), ((R,), f32), ((R,), f32), ((R,), f32), ((R,), i32), ((R, MAX_BAN), i32),
                ((R, MAX_BIAS), i32), ((R, MAX_BIAS), f32), ((R, L), i32), ((R,), i32), ((R, -(-W // 32)), i32))


def needs_processing(p) -> bool:
    """Whether SamplingParams `p` changes logits (penalties, bias, min_tokens)."""
    return p is not None and (p.presence_penalty != 0 or p.frequency_penalty != 0 or p.repetition_penalty != 1
                              or bool(p.logit_bias) or p.min_tokens > 0 or p.structured_output is not None)


def proc_rows(params: typing.Sequence, histories: typing.Sequence, n_prompt: typing.Sequence[int],
              n_out: typing.Sequence[int], eos_ids: typing.Sequence[int], L: int | None, W: int = 0,
              masks: typing.Sequence | None = None) -> dict:
    """Host arrays of `Proc` for n rows (params None = an empty row). `histories[i]`: row i's tokens so far (prompt
    + output; may be None when no row needs processing), `n_out[i]` its output tokens so far, `masks[i]` its grammar
    bitmask (None: unconstrained). L: hist width, or None to leave `ban`/`bias_ids`/`bias`/`hist`/`mask` out (no
    row needs processing: the caller passes its neutral arrays)."""
    n = len(params)
    out = {"logprobs": np.full(n, -1, np.int32), "prompt_logprobs": np.full(n, -1, np.int32),
           "presence": np.zeros(n, np.float32), "frequency": np.zeros(n, np.float32),
           "repetition": np.ones(n, np.float32), "min_left": np.zeros(n, np.int32),
           "n_prompt": np.asarray(n_prompt, np.int32).reshape(n)}
    if L is not None:
        out.update(ban=np.full((n, MAX_BAN), -1, np.int32), bias_ids=np.full((n, MAX_BIAS), -1, np.int32),
                   bias=np.zeros((n, MAX_BIAS), np.float32), hist=np.full((n, L), -1, np.int32),
                   mask=np.full((n, -(-W // 32)), -1, np.int32))
    for i, p in enumerate(params):
        if p is None:
            continue
        out["logprobs"][i] = -1 if p.logprobs is None else p.logprobs
        out["prompt_logprobs"][i] = -1 if p.prompt_logprobs is None else p.prompt_logprobs
        if L is None or not needs_processing(p):
            continue
        out["presence"][i], out["frequency"][i] = p.presence_penalty, p.frequency_penalty
        out["repetition"][i] = p.repetition_penalty
        out["min_left"][i] = max(0, p.min_tokens - n_out[i])
        ban = list(dict.fromkeys(list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))))[:MAX_BAN]
        out["ban"][i, :len(ban)] = ban
        if p.logit_bias:
            ids, vals = zip(*p.logit_bias)
            out["bias_ids"][i, :len(ids)], out["bias"][i, :len(ids)] = ids, vals
        h = np.asarray(histories[i], np.int32)[:L]
        out["hist"][i, :len(h)] = h
        if masks is not None and masks[i] is not None:
            out["mask"][i] = masks[i]
    return out


# ---- inside the compiled steps -------------------------------------------------------------------------------------
OPTIONAL_SCOPE = "row_features"   # names the branches taken only when a row asks (the planner leaves them out)


def _scoped(fn):
    def run():
        with jax.named_scope(OPTIONAL_SCOPE):
            return fn()
    return run

def active(proc: Proc):
    """Whether any row of the call changes its logits (a traced bool)."""
    return jnp.any((proc.presence != 0) | (proc.frequency != 0) | (proc.repetition != 1) | (proc.min_left > 0)
                   | jnp.any(proc.bias != 0, axis=-1) | jnp.any(proc.mask != -1, axis=-1))


def process(logits_BW, proc: Proc, hist_BL, min_left_B, masked=True):
    """vLLM's processors on f32 logits, in its order: the grammar's mask (when `masked`: a decode dispatch applies
    it at its first step only), logit bias, min_tokens (EOS / stop ids to -inf while output tokens are still owed),
    then repetition (tokens in prompt or output: positive logits divided, negative multiplied), frequency (minus
    penalty x output count) and presence (minus penalty if in the output)."""
    logits_BW = logits_BW.astype(jnp.float32)

    def run():
        B, W = logits_BW.shape
        rows = jnp.arange(B)[:, None]
        w = jnp.arange(W)
        allowed = ((proc.mask[:, w // 32] >> (w % 32)[None]) & 1) == 1
        out = jnp.where(allowed | jnp.logical_not(masked), logits_BW, -jnp.inf)
        out = out.at[rows, jnp.where(proc.bias_ids >= 0, proc.bias_ids, W)].add(proc.bias, mode="drop")
        banned = (proc.ban >= 0) & (min_left_B[:, None] > 0)
        out = out.at[rows, jnp.where(banned, proc.ban, W)].set(-jnp.inf, mode="drop")
        valid = hist_BL >= 0
        pos = jnp.arange(hist_BL.shape[1])[None]
        ids = jnp.where(valid, hist_BL, W)
        seen = jnp.zeros((B, W), jnp.int32).at[rows, ids].add(1, mode="drop") > 0
        counts = jnp.zeros((B, W), jnp.float32).at[rows, jnp.where(pos >= proc.n_prompt[:, None], ids, W)].add(
            1.0, mode="drop")
        rep = proc.repetition[:, None]
        out = jnp.where(seen, jnp.where(out > 0, out / rep, out * rep), out)
        return out - proc.frequency[:, None] * counts - proc.presence[:, None] * (counts > 0)

    return jax.lax.cond(active(proc), _scoped(run), lambda: logits_BW)


def token_logprobs(raw_BW, token_B, want_B):
    """(logprob of token [B], top ids [B, K], top logprobs [B, K]) of log_softmax(raw logits), K = MAX_LOGPROBS;
    zeros unless some row wants them (want >= 0)."""
    B = raw_BW.shape[0]

    def run():
        logp = jax.nn.log_softmax(raw_BW.astype(jnp.float32), axis=-1)
        top_lp, top_id = jax.lax.top_k(logp, MAX_LOGPROBS)
        return logp[jnp.arange(B), token_B], top_id.astype(jnp.int32), top_lp

    zeros = lambda: (jnp.zeros((B,), jnp.float32), jnp.zeros((B, MAX_LOGPROBS), jnp.int32),
                     jnp.zeros((B, MAX_LOGPROBS), jnp.float32))
    return jax.lax.cond(jnp.any(want_B >= 0), _scoped(run), zeros)


def prompt_logprobs(head, hidden_RTD, next_RT, want_R):
    """Per chunk position t: the logprob of the prompt token at t + 1 (`next_RT`) and the top K, from `head` on the
    hidden states, PROMPT_BLOCK positions at a time (zeros unless a row wants them)."""
    R, T, D = hidden_RTD.shape
    blk = min(T, PROMPT_BLOCK)
    n = -(-T // blk)

    def run():
        pad = n * blk - T
        h = jnp.pad(hidden_RTD, ((0, 0), (0, pad), (0, 0))).reshape(R, n, blk, D).transpose(1, 0, 2, 3)
        nx = jnp.pad(next_RT, ((0, 0), (0, pad))).reshape(R, n, blk).transpose(1, 0, 2)

        def one(args):
            h_RbD, nx_Rb = args
            logp = jax.nn.log_softmax(head(h_RbD).astype(jnp.float32), axis=-1)
            lp = jnp.take_along_axis(logp, jnp.maximum(nx_Rb, 0)[..., None], axis=-1)[..., 0]
            top_lp, top_id = jax.lax.top_k(logp, MAX_LOGPROBS)
            return lp, top_id.astype(jnp.int32), top_lp

        lp, ids, lps = jax.lax.map(one, (h, nx))
        back = lambda x: jnp.moveaxis(x, 0, 1).reshape((R, n * blk) + x.shape[3:])[:, :T]
        return back(lp), back(ids), back(lps)

    zeros = lambda: (jnp.zeros((R, T), jnp.float32), jnp.zeros((R, T, MAX_LOGPROBS), jnp.int32),
                     jnp.zeros((R, T, MAX_LOGPROBS), jnp.float32))
    return jax.lax.cond(jnp.any(want_R >= 0), _scoped(run), zeros)


# ---- on the host -----------------------------------------------------------------------------------------------------
class TokenLogprobs(typing.NamedTuple):
    """One generated (or prompt) token's log-probability and the k most likely tokens at its position."""

    logprob: float
    top: tuple[tuple[int, float], ...]     # (token id, logprob), most likely first; k = the request's logprobs

    def to_wire(self) -> list:
        return [self.logprob, [[t, lp] for t, lp in self.top]]

    @classmethod
    def from_wire(cls, w) -> "TokenLogprobs":
        return cls(float(w[0]), tuple((int(t), float(lp)) for t, lp in w[1]))


def logprob_entry(lp: float, ids: np.ndarray, lps: np.ndarray, k: int) -> TokenLogprobs:
    return TokenLogprobs(float(lp), tuple(zip(ids[:k].tolist(), lps[:k].tolist())))


def logprobs_to_wire(prefix) -> dict:
    """A Prefix's logprobs as msgpack-able offer fields (none when the request asked for none)."""
    out = {}
    if prefix.logprobs is not None:
        out["logprobs"] = prefix.logprobs.to_wire()
    if prefix.prompt_logprobs is not None:
        out["prompt_logprobs"] = [None if e is None else e.to_wire() for e in prefix.prompt_logprobs]
    return out


def logprobs_from_wire(d: dict, params=None) -> dict:
    """`logprobs_to_wire`'s fields back as Prefix keyword arguments; ValueError when `params` (the request's
    SamplingParams) asks for logprobs the offer does not carry (a prefill worker of an older version)."""
    lp, plp = d.get("logprobs"), d.get("prompt_logprobs")
    if params is not None and ((params.logprobs is not None and lp is None)
                               or (params.prompt_logprobs is not None and plp is None)):
        raise ValueError("the request asks for logprobs but the offer carries none (a prefill worker of an older "
                         "version?)")
    return {"logprobs": None if lp is None else TokenLogprobs.from_wire(lp),
            "prompt_logprobs": None if plp is None else [None if e is None else TokenLogprobs.from_wire(e)
                                                         for e in plp]}


def event_logprobs_to_wire(ev, prompt_sent: set) -> dict:
    """A worker's token-event fields for `ev`: its tokens' logprobs and, once per request (the ids in
    `prompt_sent`), the prompt's."""
    out, r = {}, ev.request
    if ev.new_logprobs:
        out["logprobs"] = [e.to_wire() for e in ev.new_logprobs]
    if r.prompt_logprobs is not None and r.id not in prompt_sent:
        prompt_sent.add(r.id)
        out["prompt_logprobs"] = [None if e is None else e.to_wire() for e in r.prompt_logprobs]
    return out
