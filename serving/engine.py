"""One engine per mesh: placed weights, a paged latent cache and ahead-of-time compiled steps.

The seam with the scheduler is JetStream's, kept small:

    first, hidden = engine.prefill(prompt_ids, pages, sampling_row)   # writes the prompt's latents into `pages`
    prefix = engine.extract(pages, ...)                                 # latent pages -> a Prefix (for transfer)
    engine.insert(prefix, pages)                                        # another engine: write them into its cache
    tokens = engine.generate(batch)                                     # `decode_steps` tokens for every row

Every executable is compiled at construction for a small set of padded buckets (prefill chunk lengths, decode
batch sizes, transfer page counts); the request path only runs them, on numpy inputs — no tracing, no compile
(`tests/test_engine.py` checks with JAX's compile events). The cache argument is donated, so XLA updates it in
place.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.deepseek import DeepseekV3
from serving.kv_cache import SCRATCH_PAGE, PageAllocator, PagedCache, pages_for
from serving.sampling import sample

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    num_pages: int = 256                       # including the scratch page
    max_model_len: int = 512                   # prompt + generated tokens per request
    prefill_buckets: tuple[int, ...] = (16, 32, 64, 128)   # chunk lengths; longer prompts are chunked
    decode_buckets: tuple[int, ...] = (1, 2, 4, 8, 16)     # batch sizes; the largest is the batch limit
    decode_steps: int = 4                      # tokens per row per decode dispatch
    cache_dtype: str | None = None             # default: the model's dtype

    def __post_init__(self):
        if self.max_model_len % self.page_size:
            raise ValueError(f"max_model_len={self.max_model_len} must be a multiple of page_size={self.page_size}")
        if sorted(set(self.prefill_buckets)) != list(self.prefill_buckets) or not self.prefill_buckets:
            raise ValueError(f"prefill_buckets={self.prefill_buckets} must be strictly increasing")
        if sorted(set(self.decode_buckets)) != list(self.decode_buckets) or not self.decode_buckets:
            raise ValueError(f"decode_buckets={self.decode_buckets} must be strictly increasing")
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps={self.decode_steps} must be >= 1")

    @property
    def pages_per_seq(self) -> int:
        return self.max_model_len // self.page_size

    @property
    def max_batch(self) -> int:
        return self.decode_buckets[-1]

    @property
    def transfer_buckets(self) -> tuple[int, ...]:
        """Page counts a Prefix is padded to: powers of two up to pages_per_seq."""
        out, n = [], 1
        while n < self.pages_per_seq:
            out.append(n)
            n *= 2
        return tuple(out) + (self.pages_per_seq,)


@dataclasses.dataclass
class Prefix:
    """What prefill hands to decode: the request's latent pages and its first token."""

    pages: jax.Array          # [layers, n_bucket, Z, C]; the first n_pages are real
    n_pages: int
    length: int               # prompt tokens
    first_token: int
    hidden: jax.Array         # [D] hidden state of the last prompt token (MTP drafts from it)


@dataclasses.dataclass
class DecodeBatch:
    """Host-side arrays of one decode dispatch (rows = running requests, padded to a bucket by the engine)."""

    tokens: np.ndarray        # [n] int32: last token of each row
    positions: np.ndarray     # [n] int32: its position
    page_tables: np.ndarray   # [n, pages_per_seq] int32
    sampling: dict[str, np.ndarray]   # temperature/top_k/top_p/seed, [n] each


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class Engine:
    """Owns one mesh: the model's weights placed on it, the paged cache, the compiled steps."""

    def __init__(self, model: DeepseekV3, cfg: EngineConfig, *, mesh: Mesh | None = None, rules=None,
                 name: str = "engine"):
        self.cfg, self.name, self.mesh = cfg, name, mesh
        self.model_cfg = model.cfg
        if mesh is not None:
            from sharding.apply import shard_model
            from sharding.rules import DECODE_RULES

            model = shard_model(nnx.clone(model), mesh, rules or DECODE_RULES)
            self._replicated = NamedSharding(mesh, PartitionSpec())
        else:
            self._replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        self.graphdef, self.params = nnx.split(model)
        mc = model.cfg
        dtype = jnp.dtype(cfg.cache_dtype) if cfg.cache_dtype else model.dtype
        self.cache_shape = (mc.num_hidden_layers + mc.num_nextn_predict_layers, cfg.num_pages, cfg.page_size,
                            mc.cache_width)
        self.cache = jax.device_put(jnp.zeros(self.cache_shape, dtype), self._replicated)
        self.allocator = PageAllocator(cfg.num_pages)
        self.compile_seconds = 0.0
        self._compile()

    # ---- compiled functions (pure; traced once per bucket at start-up) -------------------------------------------
    def _prefill_fn(self, params, cache, tokens_T, start, length, page_table_P, temperature, top_k, top_p, seed):
        model = nnx.merge(self.graphdef, params)
        T = tokens_T.shape[0]
        positions_T = start + jnp.arange(T, dtype=jnp.int32)
        valid_T = jnp.arange(T) < length
        layout = PagedCache(page_table_P[None], valid_T[None])
        logits_BTW, hidden_BTD, cache = model.forward(tokens_T[None], positions_T[None], cache=layout, state=cache)
        last = jnp.maximum(length - 1, 0)
        logits_W, hidden_D = logits_BTW[0, last], hidden_BTD[0, last]
        token = sample(logits_W[None], (start + length)[None], temperature[None], top_k[None], top_p[None],
                       seed[None])[0]
        return token, hidden_D, cache

    def _decode_fn(self, params, cache, tokens_B, positions_B, page_tables_BP, temperature, top_k, top_p, seed):
        model = nnx.merge(self.graphdef, params)
        valid_B1 = (page_tables_BP[:, :1] != SCRATCH_PAGE)  # padding rows have an all-scratch page table

        def step(carry, _):
            cache, tok_B, pos_B = carry
            layout = PagedCache(page_tables_BP, valid_B1)
            logits, hidden, cache = model.forward(tok_B[:, None], pos_B[:, None], cache=layout, state=cache,
                                                  absorbed=True)
            nxt_B = sample(logits[:, 0], pos_B + 1, temperature, top_k, top_p, seed)
            return (cache, nxt_B, pos_B + 1), (nxt_B, hidden[:, 0])

        (cache, _, _), (toks_SB, hid_SBD) = jax.lax.scan(step, (cache, tokens_B, positions_B), None,
                                                          length=self.cfg.decode_steps)
        return toks_SB.T, hid_SBD[-1], cache

    def _extract_fn(self, cache, pages_N):
        return cache[:, pages_N]

    def _insert_fn(self, cache, pages_N, data):
        return cache.at[:, pages_N].set(data.astype(cache.dtype))

    def _sds(self, shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated)

    def _compile(self):
        t0 = time.perf_counter()
        cfg, i32, f32 = self.cfg, jnp.int32, jnp.float32
        cache_sds = jax.ShapeDtypeStruct(self.cache.shape, self.cache.dtype, sharding=self.cache.sharding)
        P = cfg.pages_per_seq
        scalar = lambda dt: self._sds((), dt)
        samp_row = (scalar(f32), scalar(i32), scalar(f32), scalar(i32))
        self._prefill_exe = {}
        for T in cfg.prefill_buckets:
            self._prefill_exe[T] = jax.jit(self._prefill_fn, donate_argnums=(1,)).lower(
                self.params, cache_sds, self._sds((T,), i32), scalar(i32), scalar(i32), self._sds((P,), i32),
                *samp_row).compile()
        self._decode_exe = {}
        for B in cfg.decode_buckets:
            vec = lambda dt: self._sds((B,), dt)
            self._decode_exe[B] = jax.jit(self._decode_fn, donate_argnums=(1,)).lower(
                self.params, cache_sds, vec(i32), vec(i32), self._sds((B, P), i32),
                vec(f32), vec(i32), vec(f32), vec(i32)).compile()
        self._extract_exe, self._insert_exe = {}, {}
        L, _, Z, C = self.cache_shape
        for n in cfg.transfer_buckets:
            self._extract_exe[n] = jax.jit(self._extract_fn).lower(cache_sds, self._sds((n,), i32)).compile()
            self._insert_exe[n] = jax.jit(self._insert_fn, donate_argnums=(0,)).lower(
                cache_sds, self._sds((n,), i32), self._sds((L, n, Z, C), self.cache.dtype)).compile()
        self.compile_seconds = time.perf_counter() - t0
        log.info("%s: compiled %d prefill, %d decode, %d transfer executables in %.1fs", self.name,
                 len(self._prefill_exe), len(self._decode_exe), 2 * len(self._extract_exe), self.compile_seconds)

    # ---- the request path: numpy in, compiled executables only ----------------------------------------------------
    def page_table(self, pages: list[int]) -> np.ndarray:
        pt = np.full(self.cfg.pages_per_seq, SCRATCH_PAGE, np.int32)
        pt[: len(pages)] = pages
        return pt

    def prefill_chunks(self, n_tokens: int, start: int = 0) -> list[tuple[int, int, int]]:
        """(start, length, bucket) of each chunk: the largest bucket while it is full, then the smallest fit."""
        out, pos, big = [], start, self.cfg.prefill_buckets[-1]
        while pos < start + n_tokens:
            n = min(big, start + n_tokens - pos)
            out.append((pos, n, _bucket(n, self.cfg.prefill_buckets)))
            pos += n
        return out

    def prefill_chunk(self, prompt: np.ndarray, chunk: tuple[int, int, int], pages: list[int],
                      sampling: dict[str, np.ndarray]) -> tuple[int, jax.Array]:
        """Run one chunk of `prompt` (all tokens so far are in `pages`); returns the token sampled after it."""
        start, n, T = chunk
        toks = np.zeros(T, np.int32)
        toks[:n] = prompt[start:start + n]
        token, hidden, self.cache = self._prefill_exe[T](
            self.params, self.cache, toks, np.int32(start), np.int32(n), self.page_table(pages),
            np.float32(sampling["temperature"]), np.int32(sampling["top_k"]), np.float32(sampling["top_p"]),
            np.int32(sampling["seed"]))
        return token, hidden

    def prefill(self, prompt: np.ndarray, pages: list[int], sampling: dict[str, np.ndarray]) -> tuple[int, jax.Array]:
        """All chunks of `prompt`; returns (first generated token, hidden state of the last prompt token)."""
        for chunk in self.prefill_chunks(len(prompt)):
            token, hidden = self.prefill_chunk(prompt, chunk, pages, sampling)
        return int(token), hidden

    def extract(self, pages: list[int], length: int, first_token: int, hidden: jax.Array) -> Prefix:
        n = _bucket(len(pages), self.cfg.transfer_buckets)
        ids = np.full(n, SCRATCH_PAGE, np.int32)
        ids[: len(pages)] = pages
        return Prefix(self._extract_exe[n](self.cache, ids), len(pages), length, first_token, hidden)

    def receive(self, prefix: Prefix) -> Prefix:
        """Move a Prefix produced on another mesh onto this engine's devices (device_put reshards)."""
        return dataclasses.replace(prefix, pages=jax.device_put(prefix.pages, self._replicated),
                                   hidden=jax.device_put(prefix.hidden, self._replicated))

    def insert(self, prefix: Prefix, pages: list[int]) -> None:
        """Write a received prefix into this engine's pages (the first prefix.n_pages of `pages`)."""
        n = prefix.pages.shape[1]
        ids = np.full(n, SCRATCH_PAGE, np.int32)
        ids[: prefix.n_pages] = pages[: prefix.n_pages]
        self.cache = self._insert_exe[n](self.cache, ids, prefix.pages)

    def generate(self, batch: DecodeBatch) -> tuple[np.ndarray, jax.Array]:
        """`decode_steps` tokens for each row: ([n, decode_steps] int32 on the host, last hidden [B, D])."""
        n = len(batch.tokens)
        B = _bucket(n, self.cfg.decode_buckets)
        pad = lambda a, v=0: np.concatenate([a, np.full((B - n,) + a.shape[1:], v, a.dtype)]) if B > n else a
        s = batch.sampling
        toks, hidden, self.cache = self._decode_exe[B](
            self.params, self.cache, pad(batch.tokens), pad(batch.positions), pad(batch.page_tables, SCRATCH_PAGE),
            pad(s["temperature"]), pad(s["top_k"]), pad(s["top_p"], 1.0), pad(s["seed"]))
        return np.asarray(toks)[:n], hidden

    # ---- introspection --------------------------------------------------------------------------------------------
    def decode_cost(self, batch: int | None = None) -> dict:
        """XLA's cost analysis of one decode dispatch (flops, bytes accessed) for a batch bucket."""
        B = batch or self.cfg.decode_buckets[-1]
        ca = self._decode_exe[B].cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        return {"flops": float(ca.get("flops", 0.0)), "bytes": float(ca.get("bytes accessed", 0.0)),
                "steps": self.cfg.decode_steps, "batch": B}

    def pages_needed(self, tokens: int) -> int:
        return pages_for(tokens, self.cfg.page_size)

