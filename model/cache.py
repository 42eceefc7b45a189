"""KV cache layouts behind one small interface.

A layout is a frozen object with `update(state, layer, kv_BTC, positions_BT) -> (state, kv_BSC, mask_BTS)`:
write the new tokens' latents, return the keys the queries attend to and which of them each query may see.
`state` is a plain array (a pytree leaf), so it can be donated to and returned from compiled steps.

* `NoCache`         — keys are the current tokens themselves (teacher-forced forward, training).
* `ContiguousCache` — state [layers, B, S, C]; token at absolute position p of row b lives at [:, b, p].
The paged layout used by the serving engine lives in `serving/kv_cache.py` and implements the same method.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class NoCache:
    def update(self, state, layer: int, kv_BTC, positions_BT):
        del layer
        mask_BTS = positions_BT[:, None, :] <= positions_BT[:, :, None]
        return state, kv_BTC, mask_BTS


@dataclasses.dataclass(frozen=True)
class ContiguousCache:
    """One latent row per (layer, batch row, position); positions past `max_len` are dropped on write."""

    def update(self, state, layer: int, kv_BTC, positions_BT):
        B = kv_BTC.shape[0]
        S = state.shape[2]
        rows_BT = jnp.broadcast_to(jnp.arange(B)[:, None], positions_BT.shape)
        state = state.at[layer, rows_BT, positions_BT].set(kv_BTC.astype(state.dtype), mode="drop")
        mask_BTS = jnp.arange(S)[None, None, :] <= positions_BT[:, :, None]
        return state, state[layer], mask_BTS

    @staticmethod
    def init(cfg: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> jax.Array:
        return jnp.zeros((cfg.num_hidden_layers, batch, max_len, cfg.cache_width), dtype)
