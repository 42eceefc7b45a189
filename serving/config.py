"""Every serving setting and its default, in one module: what gets compiled (`EngineConfig`), the batching policy
(`SchedulerConfig`), and the defaults the entry points share (checkpoint, max_model_len, meshes, weight dtype per
platform, decode buckets). The launch scripts read these through one flag definer (`serving.flags`) and build
engines through one builder (`serving.build`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re

import jax.numpy as jnp

from model.runtime import platform_dtype

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                  "shakespeare-moe")
# max_model_len when none is given: the checkpoint's max_position_embeddings, at most this, in whole pages.
DEFAULT_MAX_MODEL_LEN_CAP = 1024


# ---- defaults ---------------------------------------------------------------------------------------------------
def default_max_model_len(max_position_embeddings: int, page_size: int, cap: int = DEFAULT_MAX_MODEL_LEN_CAP) -> int:
    """min(max_position_embeddings, cap) rounded down to whole pages (at least one page)."""
    return max(page_size, min(cap, max_position_embeddings) // page_size * page_size)


def parse_mesh_spec(spec: str) -> dict[str, int]:
    """'tp=2' / 'ep=4' / 'dp=2,ep=2' -> {'dp':.., 'ep':.., 'tp':..} (missing axes are 1)."""
    out = {"dp": 1, "ep": 1, "tp": 1}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        m = re.fullmatch(r"(dp|ep|tp)=(\d+)", part)
        if not m or int(m.group(2)) < 1:
            raise ValueError(f"bad mesh spec {spec!r}: expected comma-separated dp=N, ep=N, tp=N")
        out[m.group(1)] = int(m.group(2))
    return out


def default_mesh(role: str, n: int, num_attention_heads: int, n_routed_experts: int) -> str:
    """The mesh of a pool of n devices: tp over heads for prefill, ep over experts for decode, when they divide;
    else data parallel."""
    if role == "prefill":
        return f"tp={n}" if num_attention_heads % n == 0 else f"dp={n}"
    return f"ep={n}" if n_routed_experts % n == 0 else f"dp={n}"


# The most prompt tokens one batched prefill call holds by default: the online prefill budget, so a burst of 4
# chat prompts (<= 64 tokens) prefills in one call (shipped-model server at 8 aiperf clients: TTFT p50 92 -> 70 ms;
# at 32: 1,500 -> 1,714 out tok/s, against one largest 128-token chunk per call before).
DEFAULT_PREFILL_TOKENS = 256


def default_prefill_buckets(max_model_len: int) -> tuple[int, ...]:
    """Prefill chunk lengths by default: powers of two from 16 up to max_model_len / 8, within [128, 512]. Each chunk
    attends over (naive prefill: decompresses) every key before it again, so long prompts prefill faster in longer
    chunks — latent-32e, 2 Zen 4 cores, a 2,048-token prompt: 6.2 s in 128-token chunks, 3.2 s up to 512
    (docs/BENCHMARKS.md); short contexts keep 128, as a chunk is also the stall it puts between two decode steps."""
    top = min(512, max(128, max_model_len // 8))
    return tuple(1 << i for i in range(4, 10) if (1 << i) <= top)


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    page_size: int = 16
    # KV pages per attention rank, including the scratch page. None: sized by the engine — on GPUs from device
    # memory (`serving.build`: kv_memory_fraction 0.9), elsewhere `auto_num_pages` (a host KV budget)
    num_pages: int | None = None
    max_model_len: int = 512                   # prompt + generated tokens per request
    # chunk lengths; longer prompts are chunked (None: `default_prefill_buckets(max_model_len)`)
    prefill_buckets: tuple[int, ...] | None = None
    # batched prefill: rows (requests) per prefill call. A (rows, T) executable exists for every rows x T within
    # `prefill_tokens` (default: DEFAULT_PREFILL_TOKENS or the largest bucket's tokens if more — the bound on what
    # one call holds: activations, the stall before the next decode step): with the defaults 4 prompts of <= 64
    # tokens prefill in one call, longer ones alone.
    prefill_rows: tuple[int, ...] = (1, 4)
    prefill_tokens: int | None = None
    # decode batch sizes; the largest is the batch limit. None: sized from the KV pool (`auto_max_batch`), resolved
    # by the engine for its platform and attention ranks
    decode_buckets: tuple[int, ...] | None = None
    decode_steps: int = 4                      # decode steps per dispatch (each emits 1, or 1-2 with MTP)
    mtp: bool = False                          # speculative decoding with the model's MTP module (k = 1)
    # Attention windows of decode, in pages: a dispatch attends over the smallest window that holds every row's
    # positions (short requests do not pay for max_model_len). Default: pages_per_seq / 4, / 2 and all of it.
    decode_windows: tuple[int, ...] | None = None
    cache_dtype: str | None = None             # default: the model's dtype; "fp8": e4m3 + a per-token f32 scale
    # prefix caching (serving.prefix_cache): full pages keyed by their tokens' chained hash, shared between
    # requests, kept after release (LRU); evicted pages spill to host memory, then to disk
    prefix_caching: bool = False
    host_cache_pages: int = 0                  # host-memory tier, in pages (0: none)
    disk_cache_pages: int = 0                  # disk tier, in pages (0: none; needs the host tier and a dir)
    disk_cache_dir: str | None = None
    # routing counts per MoE layer and expert (serving.expert_stats): read by the host every this many dispatches
    expert_stats_interval: int = 32
    # EPLB: extra routed-expert slots per MoE layer (checkpoints.load(redundant_experts=...), sharding.eplb)
    redundant_experts: int = 0
    # EPLB (needs redundant experts): place the expert slots from the counts every this many dispatches (0: never
    # automatically), when the predicted max/mean copies per EP rank improves by at least eplb_min_gain
    eplb_interval: int = 0
    eplb_min_gain: float = 0.05
    # compiled executables kept on disk (serving.exec_cache): a restart with the same model, mesh and settings
    # loads them instead of tracing, lowering and compiling (None: off)
    executable_cache_dir: str | None = None

    def __post_init__(self):
        if self.max_model_len % self.page_size:
            raise ValueError(f"max_model_len={self.max_model_len} must be a multiple of page_size={self.page_size}")
        if self.prefill_buckets is None:
            object.__setattr__(self, "prefill_buckets", default_prefill_buckets(self.max_model_len))
        if sorted(set(self.prefill_buckets)) != list(self.prefill_buckets) or not self.prefill_buckets:
            raise ValueError(f"prefill_buckets={self.prefill_buckets} must be strictly increasing")
        if sorted(set(self.prefill_rows)) != list(self.prefill_rows) or self.prefill_rows[:1] != (1,):
            raise ValueError(f"prefill_rows={self.prefill_rows} must be strictly increasing and start at 1")
        if self.num_pages is not None and self.num_pages < 2:
            raise ValueError(f"num_pages={self.num_pages}: need at least one page besides the scratch page (None: "
                             "sized automatically)")
        if self.prefill_tokens is not None and self.prefill_tokens < 1:
            raise ValueError(f"prefill_tokens={self.prefill_tokens} must be >= 1")
        if self.decode_buckets is not None and (sorted(set(self.decode_buckets)) != list(self.decode_buckets)
                                                or not self.decode_buckets):
            raise ValueError(f"decode_buckets={self.decode_buckets} must be strictly increasing")
        if self.expert_stats_interval < 0 or self.eplb_interval < 0 or self.redundant_experts < 0:
            raise ValueError("expert_stats_interval / eplb_interval / redundant_experts must be >= 0")
        if self.decode_steps < 1:
            raise ValueError(f"decode_steps={self.decode_steps} must be >= 1")
        if self.host_cache_pages < 0 or self.disk_cache_pages < 0:
            raise ValueError("host_cache_pages / disk_cache_pages must be >= 0")
        if (self.host_cache_pages or self.disk_cache_pages) and not self.prefix_caching:
            raise ValueError("host/disk KV tiers hold prefix-cache blocks: set prefix_caching=True")
        if self.disk_cache_pages and not (self.host_cache_pages and self.disk_cache_dir):
            raise ValueError("disk_cache_pages needs host_cache_pages > 0 (the disk tier takes what the host tier "
                             "evicts) and disk_cache_dir")

    @property
    def tiers(self) -> bool:
        return self.host_cache_pages > 0

    @property
    def pages_per_seq(self) -> int:
        return self.max_model_len // self.page_size

    @property
    def windows(self) -> tuple[int, ...]:
        if self.decode_windows is not None:
            w = tuple(self.decode_windows)
            if sorted(set(w)) != list(w) or w[-1] != self.pages_per_seq or w[0] < 1:
                raise ValueError(f"decode_windows={w} must increase and end at pages_per_seq={self.pages_per_seq}")
            return w
        P = self.pages_per_seq
        return tuple(sorted({max(1, P // 4), max(1, P // 2), P}))

    @property
    def max_batch(self) -> int:
        """The largest decode batch this engine can run (its largest bucket; resolve auto buckets first)."""
        if self.decode_buckets is None:
            raise ValueError("decode_buckets=None (auto) is resolved by the engine: use resolve_decode_buckets")
        return self.decode_buckets[-1]

    @property
    def prefill_shapes(self) -> tuple[tuple[int, int], ...]:
        """(rows, T) of every prefill executable: each chunk bucket T with the row buckets R of `prefill_rows`
        whose R x T tokens fit in `prefill_tokens` (default max(DEFAULT_PREFILL_TOKENS, the largest bucket); always
        R = 1)."""
        big = self.prefill_tokens or max(DEFAULT_PREFILL_TOKENS, self.prefill_buckets[-1])
        return tuple((R, T) for T in self.prefill_buckets for R in self.prefill_rows if R == 1 or R * T <= big)

    def rows_for(self, T: int) -> tuple[int, ...]:
        """The row buckets of chunk bucket T."""
        return tuple(R for R, t in self.prefill_shapes if t == T)

    @property
    def transfer_buckets(self) -> tuple[int, ...]:
        """Page counts a Prefix is padded to: powers of two up to pages_per_seq."""
        out, n = [], 1
        while n < self.pages_per_seq:
            out.append(n)
            n *= 2
        return tuple(out) + (self.pages_per_seq,)


# Offline use (`LLM` without a scheduler_config, the batch job): every request is known up front and only throughput
# counts, so a step may prefill many prompts before the next decode dispatch (fewer dispatches at partial batch).
# Online (the server), each step prefills backlog / PREFILL_DRAIN_STEPS tokens, at least ONLINE_PREFILL_BUDGET (the
# stall a lone prompt puts between two decode dispatches) and at most ONLINE_PREFILL_BUDGET_MAX: a fixed 256 kept a
# 119 ms ITL at 64 clients of 512-token prompts but left 3 of 4 rows prefilling and a 44 s TTFT (docs/BENCHMARKS.md).
OFFLINE_PREFILL_BUDGET = 2048
ONLINE_PREFILL_BUDGET = 256
ONLINE_PREFILL_BUDGET_MAX = 2048
PREFILL_DRAIN_STEPS = 4


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Batching policy (the engine's buckets bound what can run; this decides what does)."""

    max_batch: int | None = None   # running requests at once; None = the decode engine's largest bucket
    # colocated: prompt tokens prefilled per step (at least one chunk): the admitted prompts' tokens left over
    # prefill_drain_steps, within [prefill_budget, prefill_budget_max] (a max <= prefill_budget: fixed at it)
    prefill_budget: int = ONLINE_PREFILL_BUDGET
    prefill_budget_max: int = ONLINE_PREFILL_BUDGET_MAX
    prefill_drain_steps: int = PREFILL_DRAIN_STEPS
    # queue decode dispatch n+1 (from dispatch n's tokens on the device) before reading dispatch n (Scheduler._decode)
    overlap_decode: bool = True

    def __post_init__(self):
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch={self.max_batch} must be >= 1")
        for name in ("prefill_budget", "prefill_budget_max", "prefill_drain_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")

    def step_budget(self, backlog: int) -> int:
        """Prompt tokens one step prefills when `backlog` admitted prompt tokens are left: a backlog drains within
        about prefill_drain_steps decode dispatches (so prefill keeps pace with arrivals and rows do not sit
        prefilling while the decode batch runs part-empty), never below prefill_budget nor above prefill_budget_max."""
        return max(self.prefill_budget, min(self.prefill_budget_max, -(-backlog // self.prefill_drain_steps)))


# The batch limit when none is given: as many rows as the KV pool holds requests of AUTO_BATCH_TOKENS tokens (a
# chat turn, ~64 in + 64 out) — the pool, not a constant, bounds concurrency (admission still reserves each request's
# pages, so rows never outgrow it) — at most the platform's cap per attention rank: on CPU 64 (2 cores: the shipped
# model decodes 4,888 tok/s at batch 64 vs 3,107 at 16 offline, and every bucket is one more compile at start),
# elsewhere 256 (vLLM's max_num_seqs).
AUTO_BATCH_TOKENS = 128
AUTO_BATCH_CAP = {"cpu": 64}
DEFAULT_AUTO_BATCH_CAP = 256


def auto_max_batch(num_pages: int, page_size: int, platform: str, ranks: int = 1) -> int:
    """Rows of all `ranks` (data-parallel attention: each rank has `num_pages` and a device of its own):
    ranks x min(platform cap, one rank's KV tokens / AUTO_BATCH_TOKENS), at least 1 per rank."""
    cap = AUTO_BATCH_CAP.get(platform, DEFAULT_AUTO_BATCH_CAP)
    return ranks * max(1, min(cap, num_pages * page_size // AUTO_BATCH_TOKENS))


# Host KV budget of an engine on CPU when num_pages is not given: what bench.vs_vllm gives vLLM's CPU engine
# (VLLM_CPU_KVCACHE_SPACE=2) — at most what the auto batch limit's rows need at max_model_len each.
CPU_KV_BYTES = 2 << 30
DEFAULT_KV_MEMORY_FRACTION = 0.9   # GPUs: like vLLM's gpu_memory_utilization


def auto_num_pages(cfg: EngineConfig, kv_bytes_per_token: int, platform: str) -> int:
    """Pages per rank (+ the scratch page) for num_pages=None off-GPU: min(the platform's auto-batch rows x
    max_model_len, CPU_KV_BYTES / bytes per token) tokens, at least one max_model_len sequence."""
    rows = AUTO_BATCH_CAP.get(platform, DEFAULT_AUTO_BATCH_CAP)
    tokens = min(rows * cfg.max_model_len, CPU_KV_BYTES // max(1, kv_bytes_per_token))
    return max(cfg.pages_per_seq, tokens // cfg.page_size) + 1


def resolve_decode_buckets(cfg: EngineConfig, platform: str, ranks: int = 1) -> EngineConfig:
    """`cfg` with auto decode buckets (None) made concrete: powers of two up to `auto_max_batch`."""
    if cfg.decode_buckets is not None:
        return cfg
    return dataclasses.replace(cfg, decode_buckets=decode_buckets_up_to(
        auto_max_batch(cfg.num_pages, cfg.page_size, platform, ranks)))


def dynamo_registration(*, page_size: int, pages: int, max_model_len: int, max_seqs: int, prefill_tokens: int
                        ) -> dict[str, int]:
    """What a worker registers with NVIDIA Dynamo's router (`serving.dynamo`; `planner.memory --dynamo` prints it
    for real dims): Tandem's pages are Dynamo's blocks, and the worker is one router rank — its attention-DP ranks
    are placed by Tandem's own scheduler (KV-aware per rank), so the rank's capacity is every attention rank's
    pages (`pages`, scratch pages excluded) and `max_seqs` every rank's rows."""
    return {"kv_cache_block_size": page_size, "total_kv_blocks": int(pages), "context_length": max_model_len,
            "max_num_seqs": int(max_seqs), "max_num_batched_tokens": int(prefill_tokens), "data_parallel_size": 1}


def decode_buckets_up_to(max_batch: int) -> tuple[int, ...]:
    """Decode batch buckets: powers of two below `max_batch`, then `max_batch` itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch={max_batch} must be >= 1")
    return tuple(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch) + (max_batch,)


def default_dtype(platform: str) -> jnp.dtype:
    """The weight dtype when none is asked for, from the platform the engine runs on (`model.runtime`): float32 on
    CPU (XLA:CPU runs bf16 dots ~2x slower than f32, and f32 makes disaggregated and colocated tokens agree),
    bfloat16 on GPU/TPU."""
    return platform_dtype(platform)
