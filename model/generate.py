"""Prefill / decode over a contiguous latent cache, and greedy generation built on them.

These are the model-level steps (the serving engine adds paging, batching buckets and sampling). Both are pure
functions of (graphdef, params) so they jit once per shape and can be compiled ahead of time.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from model.cache import ContiguousCache
from model.deepseek import DeepseekV3

_CACHE = ContiguousCache()


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _prefill(graphdef, params, tokens_BT, lengths_B, cache):
    model = nnx.merge(graphdef, params)
    B, T = tokens_BT.shape
    positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits_BTW, hidden_BTD, cache = model.forward(tokens_BT, positions_BT, cache=_CACHE, state=cache)
    last = lengths_B - 1
    rows = jnp.arange(B)
    return logits_BTW[rows, last], hidden_BTD[rows, last], cache


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _decode_step(graphdef, params, tokens_B, positions_B, cache):
    model = nnx.merge(graphdef, params)
    logits_BTW, hidden_BTD, cache = model.forward(tokens_B[:, None], positions_B[:, None], cache=_CACHE,
                                                  state=cache, absorbed=True)
    return logits_BTW[:, 0], hidden_BTD[:, 0], cache


def prefill(model: DeepseekV3, tokens_BT: Int[Array, "B T"], lengths_B: Int[Array, "B"], cache: jax.Array
            ) -> tuple[Float[Array, "B W"], Float[Array, "B D"], jax.Array]:
    """Naive MLA over right-padded prompts; writes their latents into `cache` (donated).

    Returns the logits and hidden state at each row's last prompt token, and the new cache.
    """
    graphdef, params = nnx.split(model)
    return _prefill(graphdef, params, jnp.asarray(tokens_BT, jnp.int32), jnp.asarray(lengths_B, jnp.int32), cache)


def decode_step(model: DeepseekV3, tokens_B: Int[Array, "B"], positions_B: Int[Array, "B"], cache: jax.Array
                ) -> tuple[Float[Array, "B W"], Float[Array, "B D"], jax.Array]:
    """One absorbed-MLA step: token `tokens_B[b]` at position `positions_B[b]`; cache donated."""
    graphdef, params = nnx.split(model)
    return _decode_step(graphdef, params, jnp.asarray(tokens_B, jnp.int32), jnp.asarray(positions_B, jnp.int32),
                        cache)


def greedy_generate(model: DeepseekV3, prompts: list[list[int]], max_new_tokens: int,
                    max_len: int | None = None) -> list[list[int]]:
    """Greedy continuation of each prompt (batched, contiguous cache): returns the new tokens per prompt."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    B, T = len(prompts), max(len(p) for p in prompts)
    max_len = max_len or T + max_new_tokens
    if T + max_new_tokens > max_len:
        raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) exceed max_len={max_len}")
    tokens = np.zeros((B, T), np.int32)
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = p
    lengths = np.array([len(p) for p in prompts], np.int32)
    cache = ContiguousCache.init(model.cfg, B, max_len, model.dtype)
    logits, _, cache = prefill(model, tokens, lengths, cache)
    out = [jnp.argmax(logits, -1).astype(jnp.int32)]
    positions = jnp.asarray(lengths)
    for _ in range(max_new_tokens - 1):
        logits, _, cache = decode_step(model, out[-1], positions, cache)
        out.append(jnp.argmax(logits, -1).astype(jnp.int32))
        positions = positions + 1
    return np.stack([np.asarray(t) for t in out], axis=1).tolist()
