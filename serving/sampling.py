"""Sampling parameters (validated on the host) and the sampler that runs inside the compiled steps.

Reproducibility: the random key of the token that will sit at absolute position p of a request is
`fold_in(PRNGKey(seed), p)`. It depends on nothing else — not on the batch the request shares, its slot, the
chunking of its prompt or the number of decode steps per dispatch — so a seeded request gives the same tokens
alone or under load, colocated or disaggregated.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from serving.grammar import normalize
from serving.logits import MAX_BAN, MAX_BIAS, MAX_LOGPROBS


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding controls (vLLM names and meanings).

    temperature 0 = greedy; top_k 0 or -1 = off; top_p 1 = off; seed None = a random seed; stop = strings that end
    the output (not included in it); stop_token_ids end it too; the checkpoint's EOS ends it unless ignore_eos.
    logprobs and processors follow vLLM: logprobs are of the raw model output (before penalties and temperature);
    the processors (bias, min_tokens, penalties) change what is sampled, greedy included.
    cache_salt: the request's prefix-cache namespace (vLLM's per-request `cache_salt`; a request option carried
    here so it travels with the request to every worker): cached blocks are shared only between equal salts.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    cache_salt: str | None = None
    logprobs: int | None = None           # the sampled token's logprob and the top k (0..20); None: none
    prompt_logprobs: int | None = None    # the same for every prompt token (the first has none)
    presence_penalty: float = 0.0         # minus this for tokens in the output ([-2, 2])
    frequency_penalty: float = 0.0        # minus this x the token's count in the output ([-2, 2])
    repetition_penalty: float = 1.0       # tokens in prompt or output: logit / p if > 0 else logit x p (> 0)
    min_tokens: int = 0                   # EOS and stop_token_ids cannot end the output before this many tokens
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias added to its logit) (a dict is accepted)
    structured_output: tuple[str, str] | None = None  # a grammar the output follows (`serving.grammar.normalize`:
    #   {"json": schema} | {"json_object": True} | {"regex": r} | {"choice": [...]} | {"grammar": lark})

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r}: {why}")

        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.max_tokens, (int, np.integer)) or isinstance(self.max_tokens, bool) \
                or self.max_tokens < 1:
            bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or not np.isfinite(self.temperature) \
                or self.temperature < 0:
            bad("temperature", "must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad("top_k", "must be an integer >= 0 (0 or -1 = no limit)")
        if self.seed is not None and (not isinstance(self.seed, (int, np.integer)) or isinstance(self.seed, bool)
                                      or not 0 <= self.seed < 2**31):
            bad("seed", "must be None or an integer in [0, 2**31)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "must be non-empty strings")
        if any(not isinstance(t, (int, np.integer)) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative token ids")
        if not isinstance(self.ignore_eos, bool):
            bad("ignore_eos", "must be a bool")
        if self.cache_salt is not None and (not isinstance(self.cache_salt, str) or not self.cache_salt):
            bad("cache_salt", "must be None or a non-empty string")
        for f in ("logprobs", "prompt_logprobs"):
            v = getattr(self, f)
            if v is not None and (not isinstance(v, (int, np.integer)) or isinstance(v, bool)
                                  or not 0 <= v <= MAX_LOGPROBS):
                bad(f, f"must be None or an integer in [0, {MAX_LOGPROBS}]")
        for f in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not -2 <= v <= 2:
                bad(f, "must be a number in [-2, 2]")
        rp = self.repetition_penalty
        if isinstance(rp, bool) or not isinstance(rp, (int, float)) or not np.isfinite(rp) or rp <= 0:
            bad("repetition_penalty", "must be a finite number > 0 (1 = off)")
        if not isinstance(self.min_tokens, (int, np.integer)) or isinstance(self.min_tokens, bool) \
                or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", "must be an integer in [0, max_tokens]")
        if self.min_tokens and len(self.stop_token_ids) > MAX_BAN - 4:
            bad("min_tokens", f"holds back at most {MAX_BAN - 4} stop_token_ids besides EOS")
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias, bad))
        try:
            object.__setattr__(self, "structured_output", normalize(self.structured_output))
        except (ValueError, TypeError) as e:
            bad("structured_output", str(e))

    @classmethod
    def from_dict(cls, d: dict) -> "SamplingParams":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown sampling field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def resolved_seed(self) -> int:
        return self.seed if self.seed is not None else int.from_bytes(os.urandom(4), "little") & 0x7FFFFFFF

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["stop"], d["stop_token_ids"] = list(self.stop), list(self.stop_token_ids)
        d["logit_bias"] = {str(t): b for t, b in self.logit_bias}   # JSON keys are strings (OpenAI's format)
        d["structured_output"] = None if self.structured_output is None else list(self.structured_output)
        return d


def _bias_pairs(bias, bad) -> tuple[tuple[int, float], ...]:
    """logit_bias as sorted (token id, bias) pairs from a dict (keys may be digit strings, as in OpenAI's JSON) or
    a sequence of pairs; ValueError via `bad` naming the problem."""
    if bias is None:
        return ()
    items = bias.items() if isinstance(bias, dict) else bias
    try:
        pairs = {int(t) if isinstance(t, str) else t: b for t, b in items}
    except (TypeError, ValueError):
        bad("logit_bias", "must map token ids to biases")
    if any(not isinstance(t, (int, np.integer)) or isinstance(t, bool) or t < 0 for t in pairs):
        bad("logit_bias", "keys must be non-negative token ids")
    if any(isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100 for b in pairs.values()):
        bad("logit_bias", "biases must be numbers in [-100, 100]")
    if len(pairs) > MAX_BIAS:
        bad("logit_bias", f"at most {MAX_BIAS} entries")
    return tuple(sorted((int(t), float(b)) for t, b in pairs.items()))


def sampling_arrays(params: Sequence[SamplingParams | None], seeds: Sequence[int]) -> dict[str, np.ndarray]:
    """Host-side per-row arrays fed to the compiled sampler (rows without a request get greedy defaults)."""
    n = len(params)
    out = {"temperature": np.zeros(n, np.float32), "top_k": np.zeros(n, np.int32),
           "top_p": np.ones(n, np.float32), "seed": np.zeros(n, np.int32)}
    for i, (p, s) in enumerate(zip(params, seeds)):
        if p is None:
            continue
        out["temperature"][i] = p.temperature
        out["top_k"][i] = max(p.top_k, 0)
        out["top_p"][i] = p.top_p
        out["seed"][i] = s
    return out


def argmax(x_BW: jax.Array) -> jax.Array:
    """The first index of each row's maximum, as int32 [B] — `jnp.argmax`'s result, computed as a max reduce then a
    min reduce over matching indices: two single-operand reductions that XLA:CPU vectorises (its variadic
    (value, index) argmax reduce is ~10x slower over a vocabulary)."""
    m_B1 = jnp.max(x_BW, axis=-1, keepdims=True)
    W = x_BW.shape[-1]
    iota = jax.lax.broadcasted_iota(jnp.int32, x_BW.shape, x_BW.ndim - 1)
    return jnp.min(jnp.where(x_BW == m_B1, iota, W), axis=-1).astype(jnp.int32)


def token_probs(logits_BW: jax.Array, temperature_B, top_k_B, top_p_B) -> jax.Array:
    """The distribution each row samples from [B, W]: one-hot argmax where temperature == 0, else
    softmax(logits / T) restricted to the top-k and then to the smallest top-p prefix, renormalised.

    When every row is greedy the vocabulary sort is skipped (`lax.cond` runs one branch)."""
    logits_BW = logits_BW.astype(jnp.float32)
    greedy_BW = jax.nn.one_hot(argmax(logits_BW), logits_BW.shape[-1], dtype=jnp.float32)
    return jax.lax.cond(jnp.any(temperature_B > 0),
                        lambda: _filtered_probs(logits_BW, greedy_BW, temperature_B, top_k_B, top_p_B),
                        lambda: greedy_BW)


def _filtered_probs(logits_BW, greedy_BW, temperature_B, top_k_B, top_p_B):
    t_B = jnp.where(temperature_B > 0, temperature_B, 1.0)
    scaled_BW = logits_BW / t_B[:, None]
    # the vocabulary sort only when some sampled row restricts its support (top-k or top-p): plain temperature
    # sampling is a softmax (the sort was 3/4 of a batch-16 step at T=1 on the shipped model)
    restricts = jnp.any((temperature_B > 0) & ((top_k_B > 0) | (top_p_B < 1)))
    probs_BW = jax.lax.cond(restricts, lambda: _restricted_probs(scaled_BW, top_k_B, top_p_B),
                            lambda: jax.nn.softmax(scaled_BW, axis=-1))
    return jnp.where((temperature_B > 0)[:, None], probs_BW, greedy_BW)


def _restricted_probs(scaled_BW, top_k_B, top_p_B):
    """softmax restricted to the top-k, then to the smallest top-p prefix of what is left, renormalised."""
    W = scaled_BW.shape[-1]
    sorted_BW = jnp.sort(scaled_BW, axis=-1)[:, ::-1]
    # top-k: keep values >= the k-th largest (k = 0 -> all)
    k_B = jnp.where(top_k_B > 0, jnp.minimum(top_k_B, W), W)
    kth_B = jnp.take_along_axis(sorted_BW, (k_B - 1)[:, None], axis=-1)[:, 0]
    # top-p over the top-k survivors: keep the smallest prefix whose probability reaches p
    in_k_BW = jnp.arange(W)[None, :] < k_B[:, None]
    probs_sorted_BW = jax.nn.softmax(jnp.where(in_k_BW, sorted_BW, -jnp.inf), axis=-1)
    before_BW = jnp.cumsum(probs_sorted_BW, axis=-1) - probs_sorted_BW  # mass strictly before each entry
    n_keep_B = jnp.maximum(((before_BW < top_p_B[:, None]) & in_k_BW).sum(-1), 1)
    pth_B = jnp.take_along_axis(sorted_BW, (n_keep_B - 1)[:, None], axis=-1)[:, 0]
    threshold_B = jnp.maximum(kth_B, pth_B)
    return jax.nn.softmax(jnp.where(scaled_BW >= threshold_B[:, None], scaled_BW, -jnp.inf), axis=-1)


def keys_for(seed_B, positions_B, stream: int = 0) -> jax.Array:
    """One key per row from (seed, position, stream); stream separates the draws of one position."""
    def one(s, p):
        k = jax.random.fold_in(jax.random.PRNGKey(s), p)
        return k if stream == 0 else jax.random.fold_in(k, stream)
    return jax.vmap(one)(seed_B, positions_B)


def draw(probs_BW: jax.Array, keys) -> jax.Array:
    """A token per row from probs (exactly the argmax for one-hot rows)."""
    argmax_B = argmax(probs_BW)
    is_onehot_B = probs_BW.max(-1) >= 1.0

    def drawn():  # random bits only when some row really samples
        logp_BW = jnp.where(probs_BW > 0, jnp.log(jnp.maximum(probs_BW, 1e-38)), -jnp.inf)
        return jax.vmap(jax.random.categorical)(keys, logp_BW).astype(jnp.int32)

    drawn_B = jax.lax.cond(jnp.all(is_onehot_B), lambda: argmax_B, drawn)
    return jnp.where(is_onehot_B, argmax_B, drawn_B)


def sample(logits_BW: jax.Array, positions_B: jax.Array, temperature_B, top_k_B, top_p_B, seed_B) -> jax.Array:
    """Next token per row: greedy where temperature == 0, else temperature / top-k / top-p sampling with the
    key of (seed, position). Runs inside jit; all arguments are per-row arrays. When every row is greedy it is
    one argmax (no distributions, no keys: `lax.cond` runs one branch)."""
    logits_BW = logits_BW.astype(jnp.float32)

    def sampled():
        return draw(token_probs(logits_BW, temperature_B, top_k_B, top_p_B), keys_for(seed_B, positions_B))

    return jax.lax.cond(jnp.any(temperature_B > 0), sampled, lambda: argmax(logits_BW))


def speculative_accept(p_BW, q_BW, draft_B, keys_accept, keys_resample) -> tuple[jax.Array, jax.Array]:
    """Distribution-preserving verification of one draft token per row (Leviathan et al. / Chen et al.).

    The draft d ~ q is kept with probability min(1, p(d)/q(d)); otherwise the token is drawn from
    max(p - q, 0) renormalised. The result is distributed exactly as p. With one-hot p and q (greedy) this is
    "keep d iff d == argmax p, else argmax p". Returns (token [B], accepted [B] bool).
    """
    rows = jnp.arange(p_BW.shape[0])
    p_d, q_d = p_BW[rows, draft_B], q_BW[rows, draft_B]
    u_B = jax.vmap(lambda k: jax.random.uniform(k))(keys_accept)
    accepted_B = u_B * q_d < p_d
    residual_BW = jnp.maximum(p_BW - q_BW, 0.0)
    mass_B = residual_BW.sum(-1, keepdims=True)
    residual_BW = jnp.where(mass_B > 0, residual_BW / jnp.maximum(mass_B, 1e-30), p_BW)
    resampled_B = draw(residual_BW, keys_resample)
    return jnp.where(accepted_B, draft_B, resampled_B), accepted_B
