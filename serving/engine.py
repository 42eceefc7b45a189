"""One engine per mesh: placed weights, a paged latent cache and ahead-of-time compiled steps.

The seam with the scheduler is JetStream's, kept small:

    out = engine.prefill(prompt_ids, pages, sampling_row)           # writes the prompt's latents into `pages`
    outs = engine.prefill_batch([(prompt, chunk, pages, row), ...])     # one chunk each of several requests
    prefix = engine.extract(pages, ...)                                 # latent pages -> a Prefix (for transfer)
    engine.insert(prefix, pages)                                        # another engine: write them into its cache
    tokens = engine.generate(batch)                                     # `decode_steps` tokens for every row

Every executable is compiled at construction for a small set of padded buckets (prefill rows x chunk lengths, decode
batch sizes x attention windows, transfer page counts); the request path only runs them, on numpy inputs — no
tracing, no compile (`tests/test_serving.py::test_no_compilation_on_the_request_path` and its disaggregated, MTP
and worker-process variants check with JAX's compile events). The cache argument is donated, so XLA updates it
in place.

The engine takes a model already placed on its mesh (`checkpoints.load(path, mesh=, rules=)` or
`sharding.place(model, mesh, rules)`): weights are placed once, by whoever builds the engine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.deepseek import DeepseekV3
from model.flops import decode_flops
from pallas_kernels.compat import cuda_lowering
from model.paged_cache import FP8_SCALE_BYTES, SCRATCH_PAGE
from serving.config import EngineConfig, auto_num_pages, resolve_decode_buckets
from serving.pages import pages_for
from serving.logits import PROC_FILL, Proc, logprob_entry, needs_processing, proc_rows, proc_shapes
from serving.programs import Programs
from serving.exec_cache import ExecutableCache, fresh_compiles
from serving.expert_stats import ExpertStats
from serving.steps import DecodeBatch, DecodeOut, DeviceRows, PrefillOut, Prefix

log = logging.getLogger(__name__)


def cache_layout(cfg: EngineConfig, model, platform: str = "cuda") -> tuple[jnp.dtype, int]:
    """(storage dtype, row width) of the paged cache: the model's dtype (or `cache_dtype`) and C = L + R values per
    token, or for `cache_dtype="fp8"` uint8 rows of C e4m3 codes + a 4-byte f32 per-token scale
    (`model.paged_cache.encode_fp8_rows`). A bf16 cache on CPU is stored as its uint16 bits (`model.paged_cache`:
    XLA:CPU would convert the whole bf16 pool to f32 and back per layer per step)."""
    C = model.cfg.cache_width
    if cfg.cache_dtype == "fp8":
        return jnp.dtype(jnp.uint8), C + FP8_SCALE_BYTES
    dt = jnp.dtype(cfg.cache_dtype) if cfg.cache_dtype else jnp.dtype(model.dtype)
    return (jnp.dtype(jnp.uint16) if platform == "cpu" and dt == jnp.bfloat16 else dt), C


def _bucket(n: int, buckets: tuple[int, ...]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class Engine(Programs):
    """Owns one mesh: the model's weights placed on it, the paged cache, the compiled steps."""

    ROLES = frozenset({"prefill", "decode", "send", "receive"})

    def __init__(self, model: DeepseekV3, cfg: EngineConfig, *, mesh: Mesh | None = None, name: str = "engine",
                 roles=ROLES, compile: bool = True):
        """model: placed on `mesh` (None: one device, the default). roles: which executables to compile —
        "prefill", "decode", "send" (extract a Prefix), "receive" (insert one). A disaggregated prefill engine
        needs {prefill, send}, its decode engine {decode, receive}, a colocated one {prefill, decode}.
        An abstract model (ShapeDtypeStruct weights with shardings, e.g. `checkpoints.abstract_model`) gives an
        abstract engine: no cache is allocated and nothing compiled; `lowered()` builds its executables."""
        roles = frozenset(roles)
        if not roles or roles - self.ROLES:
            raise ValueError(f"roles={sorted(roles)}: choose from {sorted(self.ROLES)}")
        self.cfg, self.name, self.mesh, self.roles = cfg, name, mesh, roles
        self.model_cfg = model.cfg
        self.model_dtype = model.dtype
        self.runtime = model.runtime
        if mesh is not None:
            self._replicated = NamedSharding(mesh, PartitionSpec())
            devices = set(mesh.devices.flat)
        else:
            self._replicated = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            devices = {jax.devices()[0]}
        if cfg.mtp and not model.cfg.num_nextn_predict_layers:
            raise ValueError("EngineConfig.mtp=True but the model has no MTP module (the checkpoint has no "
                             f"model.layers.{model.cfg.num_hidden_layers}.* tensors)")
        self.graphdef, self.params = nnx.split(model)
        self._leaves_of, self._leaves = None, []
        self.abstract = any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(self.params))
        for path, leaf in jax.tree_util.tree_leaves_with_path(self.params):
            if self.abstract:
                continue
            if not set(leaf.devices()) <= devices:
                raise ValueError(f"engine {name!r}: weight {jax.tree_util.keystr(path)} lives on "
                                 f"{sorted(d.id for d in leaf.devices())}, outside this engine's devices "
                                 f"{sorted(d.id for d in devices)}; load it onto the mesh "
                                 "(checkpoints.load(path, mesh=mesh, rules=rules)) or place it "
                                 "(sharding.place(model, mesh, rules))")
        mc = model.cfg
        dtype, width = cache_layout(cfg, model, self.runtime.target_platform)
        # data-parallel attention: the mesh axes the rules put the cache's page axis on (each an attention rank)
        spec = self.runtime.spec(("pages",)) if mesh is not None else None
        part = None if spec is None else spec[0]
        self.rank_axes = () if part is None else (part,) if isinstance(part, str) else tuple(part)
        self.ranks = int(np.prod([mesh.shape[a] for a in self.rank_axes])) if self.rank_axes else 1
        platform = self.runtime.platform or (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
        if cfg.num_pages is None:   # a host KV budget (`serving.build` sizes GPU pools from device memory first)
            per_token = (mc.num_hidden_layers + mc.num_nextn_predict_layers) * width * jnp.dtype(dtype).itemsize
            cfg = dataclasses.replace(cfg, num_pages=auto_num_pages(cfg, per_token, platform))
            log.info("%s: %d KV pages (%.2f GB) per rank, sized from the host KV budget (--num_pages to change)",
                     name, cfg.num_pages, cfg.num_pages * cfg.page_size * per_token / 1e9)
        self.pages_per_rank = cfg.num_pages
        self.cfg = cfg = resolve_decode_buckets(cfg, platform, self.ranks)   # auto: sized from the KV pool
        self.decode_buckets = tuple(sorted({-(-b // self.ranks) * self.ranks for b in cfg.decode_buckets}))  # x ranks
        self.cache_shape = (mc.num_hidden_layers + mc.num_nextn_predict_layers, self.ranks * cfg.num_pages,
                            cfg.page_size, width)
        self._cache_sharding = (NamedSharding(mesh, PartitionSpec(None, self.rank_axes)) if self.ranks > 1
                                else self._replicated)
        self._q_width = mc.vocab_size if cfg.mtp else 1   # draft distributions exist only with MTP
        if self.abstract:
            self.cache = jax.ShapeDtypeStruct(self.cache_shape, dtype, sharding=self._cache_sharding)
        else:   # allocated in place on its devices (never whole on one device first)
            self.cache = jax.jit(lambda: jnp.zeros(self.cache_shape, dtype), out_shardings=self._cache_sharding)()
            # the last dispatch's rows by slot (`_decode_fn`'s prev_M3, prev_MW): read by the next one on device
            self._last = jax.jit(lambda: (jnp.zeros((self.max_batch, 3), jnp.int32), jnp.zeros(
                (self.max_batch, self._q_width), jnp.float32)), out_shardings=self._replicated)()
        self._prev_slot: np.ndarray | None = None   # row -> slot of the last decode dispatch
        self.page_bytes = int(np.prod(self.cache_shape[:1] + self.cache_shape[2:])) * jnp.dtype(dtype).itemsize
        if cfg.tiers:   # spilling to and reloading from the host/disk tiers moves pages with extract / insert
            self.roles = roles = roles | {"send", "receive"}
        self.compile_seconds = 0.0
        self.exec_cache_stats: dict | None = None   # hits/misses/stale/corrupt of the last compile
        self._zeros: dict = {}   # device-resident neutral `Proc` arrays per shape (`_proc_args`)
        self.mirror = None   # a worker group's leader: sends each call to the followers first (serving.group)
        # spans several processes (a worker group): device arrays are read only through this process's shards
        self.multiprocess = mesh is not None and {d.process_index for d in mesh.devices.flat} != {jax.process_index()}
        self.expert_stats = ExpertStats(self, model)   # routing counts (every executable updates them) and EPLB
        if compile and not self.abstract:
            self._compile()

    def fingerprint(self) -> str:
        """What a cached block's content depends on besides its tokens: model config, weights (a sample of the
        embedding), cache layout. Names the disk tier's subdirectory, so a cache dir is never read by a
        different model."""
        table = nnx.merge(self.graphdef, self.params).embed_tokens[...]
        if table.is_fully_addressable:
            emb = np.asarray(jax.device_get(table[:4]), np.float32)
        else:   # a group: the shard holding row 0 (no computation that the other processes would not run)
            shard = next(s for s in table.addressable_shards if all((i.start or 0) == 0 for i in s.index))
            emb = np.asarray(shard.data[:4], np.float32)
        d = hashlib.blake2b(digest_size=8)
        d.update(repr((self.model_cfg, self.cache_shape[0], self.cache_shape[2:], str(self.cache.dtype),
                       self.cfg.mtp)).encode())
        d.update(emb.tobytes())
        return d.hexdigest()

    def scratch(self, rank: int = 0) -> int:
        """Rank's scratch page (its local page 0): padding rows and unused page-table entries point there."""
        return rank * self.pages_per_rank + SCRATCH_PAGE

    def rank_of(self, page: int) -> int:
        """The attention rank whose pool holds global page `page`."""
        return page // self.pages_per_rank

    def rank_processes(self, rank: int) -> set[int]:
        """The processes whose devices hold attention rank `rank`'s pages (a worker group: usually one)."""
        if self.ranks == 1 or self.mesh is None:
            return {d.process_index for d in (self.mesh.devices.flat if self.mesh is not None else jax.devices())}
        if not hasattr(self, "_rank_procs"):   # (cached: the scheduler asks per insert)
            m = NamedSharding(self.mesh, PartitionSpec(self.rank_axes)).devices_indices_map((self.ranks,)).items()
            self._rank_procs = [{d.process_index for d, i in m if (i[0].start or 0) == r} for r in range(self.ranks)]
        return self._rank_procs[rank]

    @property
    def max_batch(self) -> int:
        """Rows of the largest decode dispatch (all ranks together)."""
        return self.decode_buckets[-1]

    def lower_decode(self, B: int, Pw: int, steps: int):
        i32, f32 = jnp.int32, jnp.float32
        cache_sds = jax.ShapeDtypeStruct(self.cache_shape, self.cache.dtype, sharding=self.cache.sharding)
        M, vec = self.max_batch, lambda dt: self._sds((B,), dt)
        return self._lower(self._flat(functools.partial(self._decode_fn, steps=steps)), *self._param_leaves(),
                           cache_sds, self._load_sds(), self._sds((M, 3), i32), self._sds((M, self._q_width), f32),
                           vec(i32), vec(i32), vec(i32), self._sds((B, Pw), i32), vec(f32), vec(i32),
                           vec(f32), vec(i32), vec(i32), self._sds((B, self._q_width), f32),
                           *(self._sds(*a) for a in proc_shapes(B, Pw * self.cfg.page_size, self.model_cfg.vocab_size)))

    def _load_sds(self):
        return jax.ShapeDtypeStruct(self.expert_stats.shape, jnp.int32, sharding=self._replicated)

    def _sds(self, shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated)

    def lowered(self, platform: str | None = None) -> dict[tuple, jax.stages.Lowered]:
        """Every executable of this engine's roles, lowered for its mesh (not compiled): ("prefill", R, T),
        ("decode", B, window), ("extract", n), ("insert", n). Works on an abstract engine (`compile=False` with
        ShapeDtypeStruct weights), which is how real-dims executables are built and measured without weights.
        platform: lower for another platform than the host's (e.g. "cuda"; give the model a Runtime with the
        same `platform` so its kernel choice follows)."""
        self._lower_platform = platform
        try:
            return {key: lower() for key, lower in self._lowerers().items()}
        finally:
            self._lower_platform = None

    def _lowerers(self) -> dict[tuple, "functools.partial"]:
        """`lowered()`'s keys, each with the call that lowers it (so a cached executable is never traced)."""
        cfg, i32, f32 = self.cfg, jnp.int32, jnp.float32
        cache_sds = jax.ShapeDtypeStruct(self.cache_shape, self.cache.dtype, sharding=self.cache.sharding)
        P = cfg.pages_per_seq
        out = {}
        for R, T in (cfg.prefill_shapes if "prefill" in self.roles else ()):
            vec = lambda dt, R=R: self._sds((R,), dt)
            out["prefill", R, T] = functools.partial(
                self._lower, self._flat(self._prefill_fn), *self._param_leaves(), cache_sds,
                self._load_sds(), self._sds((R, T), i32), vec(i32), vec(i32), vec(i32), self._sds((R, P), i32),
                vec(f32), vec(i32), vec(f32), vec(i32),
                *(self._sds(*a) for a in proc_shapes(R, P * cfg.page_size, self.model_cfg.vocab_size)))
        for B in (self.decode_buckets if "decode" in self.roles else ()):
            for Pw in cfg.windows:
                out["decode", B, Pw] = functools.partial(self.lower_decode, B, Pw, cfg.decode_steps)
        L, _, Z, C = self.cache_shape
        for n in cfg.transfer_buckets:
            if "send" in self.roles:
                out["extract", n] = functools.partial(self._lower, jax.jit(self._extract_fn), cache_sds,
                                                      self._sds((n,), i32))
            if "receive" in self.roles:
                out["insert", n] = functools.partial(self._lower, jax.jit(self._insert_fn, donate_argnums=(0,)),
                                                     cache_sds, self._sds((n,), i32),
                                                     self._sds((L, n, Z, C), self.cache.dtype))
        return out

    def identity(self) -> str:
        """Everything this engine's executables are built from besides their key and the software versions:
        model config and dtype, the weights' paths/shapes/dtypes/shardings, the graph, mesh and devices, cache
        layout, engine settings (the cache directories aside), runtime choices. Names `serving.exec_cache` slots."""
        leaves = [(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype), repr(getattr(x, "sharding", None)))
                  for p, x in jax.tree_util.tree_leaves_with_path(self.params)]
        cfg = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k not in ("executable_cache_dir",
                                                                                  "disk_cache_dir")}
        mesh = None if self.mesh is None else (self.mesh.axis_names, tuple(self.mesh.shape.values()),
                                               tuple((d.id, d.process_index) for d in self.mesh.devices.flat))
        d = hashlib.blake2b(digest_size=16)
        for part in (self.model_cfg, str(self.model_dtype), self.runtime, cfg, self.decode_buckets, mesh,
                     self.cache_shape, str(self.cache.dtype), repr(self.cache.sharding), repr(self._replicated),
                     self.expert_stats.shape, leaves, self.graphdef, jax.process_index()):   # (a group: per member)
            d.update(repr(part).encode() + b"\0")
        return d.hexdigest()

    def exported(self, platform: str = "cuda") -> dict[tuple, "jax.export.Exported"]:
        """`lowered()` as `jax.export` artifacts for `platform` (serializable; the Triton kernels' custom calls are
        allowed in). The model's runtime should target the same platform (`Runtime(platform=...)`)."""
        self._export = True
        try:
            return self.lowered(platform)
        finally:
            self._export = False

    def _lower(self, jitted, *args):
        platform = getattr(self, "_lower_platform", None)
        if platform is None:
            return jitted.lower(*args)
        with cuda_lowering(platform):   # a GPU target on a GPU-less host (jax 0.11 asks the device)
            if getattr(self, "_export", False):   # flat leaves in: the artifact's signature holds no nnx types
                leaves, treedef = jax.tree.flatten(args)
                flat = jax.jit(lambda *xs: jitted(*jax.tree.unflatten(treedef, xs)))
                return jax.export.export(flat, platforms=[platform], disabled_checks=[
                    jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*leaves)
            return jitted.trace(*args).lower(lowering_platforms=(platform,))

    def _compile(self):
        t0 = time.perf_counter()
        self._prefill_exe, self._decode_exe, self._extract_exe, self._insert_exe = {}, {}, {}, {}
        tables = {"prefill": self._prefill_exe, "decode": self._decode_exe, "extract": self._extract_exe,
                  "insert": self._insert_exe}
        cache = (ExecutableCache(self.cfg.executable_cache_dir, self.identity())
                 if self.cfg.executable_cache_dir else None)
        todo, found = self._lowerers(), {}
        if cache is not None:   # loaded first; what is missing is compiled afresh (not from XLA's cache) and stored
            found = {key: cache.load(key) for key in todo}
            todo = {k: v for k, v in todo.items() if found[k] is None}
        with fresh_compiles() if cache is not None and todo else contextlib.nullcontext():
            for key, lower in todo.items():
                found[key] = lower().compile() if cache is None else cache.store(key, lower().compile())
        for key, exe in found.items():
            tables[key[0]][key[1:] if len(key) > 2 else key[1]] = exe
        self.exec_cache_stats = None if cache is None else dict(cache.stats)
        if cache is not None:
            log.info("%s: executable cache %s: %s", self.name, cache.dir,
                     ", ".join(f"{k} {v}" for k, v in cache.stats.items() if v))
        self.compile_seconds = time.perf_counter() - t0
        log.info("%s: compiled %d prefill, %d decode, %d transfer executables in %.1fs", self.name,
                 len(self._prefill_exe), len(self._decode_exe), len(self._extract_exe) + len(self._insert_exe),
                 self.compile_seconds)
        mtp = 2 if self.cfg.mtp else 1
        choices = {f"prefill {R}x{T}": self.moe_impl(R * T) for R, T in self._prefill_exe}
        choices.update({f"decode {B}": self.moe_impl(B * mtp) for B in sorted({b for b, _ in self._decode_exe})})
        log.info("%s: MoE implementation per executable (rows): %s", self.name,
                 ", ".join(f"{k}: {v or 'expert-parallel'}" for k, v in choices.items()))

    def executables(self) -> dict[tuple, "jax.stages.Compiled"]:
        """The compiled executables, keyed like `lowered()`: ("prefill", R, T), ("decode", B, window), ("extract",
        n), ("insert", n) — for inspection (HLO, cost and memory analysis); the request path calls them itself."""
        out = {("prefill",) + k: v for k, v in self._prefill_exe.items()}
        out.update({("decode",) + k: v for k, v in self._decode_exe.items()})
        out.update({("extract", k): v for k, v in self._extract_exe.items()})
        out.update({("insert", k): v for k, v in self._insert_exe.items()})
        return out

    # ---- the request path: numpy in, compiled executables only ----------------------------------------------------
    def _run(self, kind: str, key, *args):
        """Run compiled executable (kind, key) on host inputs; a group's leader first hands the same call to its
        followers (`serving.group.Mirror`). Updates the cache; returns the other outputs."""
        if self.mirror is not None:   # inserted pages go only to the processes owning their rank (the others'
            # devices write nothing); pages a member pulled itself (`Held`) stay there: it gets a reference
            owners = self.rank_processes(self.rank_of(int(args[0][0]))) if kind == "insert" else None
            args = self.mirror(kind, key, args, data_owners=owners)
        return self.execute(kind, key, args)

    def execute(self, kind: str, key, args):
        """One executable call as `_run` makes it, without mirroring — what a group's follower runs for each call
        its leader sends (`serving.group.follow`)."""
        if kind in ("prefill", "decode"):
            if kind == "prefill":   # (no local holds the weights: `update` may move them, freeing the old)
                *out, self.cache, load = self._prefill_exe[key](*self._param_leaves(), self.cache,
                                                                self.expert_stats.load, *args)
            else:
                *out, last3, lastw, self.cache, load = self._decode_exe[key](
                    *self._param_leaves(), self.cache, self.expert_stats.load, *self._last, *args)
                self._last = (last3, lastw)
            self.expert_stats.update(load)
            return out
        if kind == "extract":
            return self._extract_exe[key](self.cache, *args)
        if kind == "insert":
            self.cache = self._insert_exe[key](self.cache, *args)
            return None
        raise ValueError(f"unknown executable kind {kind!r}")

    def page_table(self, pages: list[int], rank: int | None = None) -> np.ndarray:
        """A request's page table (global page ids), padded with its rank's scratch page."""
        if rank is None:
            rank = self.rank_of(pages[0]) if len(pages) else 0
        pt = np.full(self.cfg.pages_per_seq, self.scratch(rank), np.int32)
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
                      sampling: dict[str, np.ndarray]) -> PrefillOut:
        """Run one chunk of `prompt` (all tokens before it are already in `pages`); returns the token sampled
        after it (meaningful after the last chunk) and, with MTP, the draft of the one after that."""
        return self.prefill_batch([(prompt, chunk, pages, sampling)])[0]

    def prefill_batch(self, items: list[tuple[np.ndarray, tuple[int, int, int], list[int], dict]]
                      ) -> list[PrefillOut]:
        """One chunk each of several requests in one call: items of (prompt, chunk, pages, sampling row), every
        chunk of the same bucket T, at most `cfg.rows_for(T)[-1]` of them (padded to the next row bucket)."""
        T = items[0][1][2]
        if any(c[2] != T for _, c, _, _ in items):
            raise ValueError(f"prefill_batch: chunks of buckets {[c[2] for _, c, _, _ in items]}, expected one")
        R = next((r for r in self.cfg.rows_for(T) if r >= len(items)), None)
        if R is None:
            raise ValueError(f"prefill_batch: {len(items)} rows of T={T}; at most {self.cfg.rows_for(T)[-1]}")
        toks = np.zeros((R, T), np.int32)
        start, length, nxt = (np.zeros(R, np.int32) for _ in range(3))
        pt = np.full((R, self.cfg.pages_per_seq), self.scratch(0), np.int32)
        samp = {"temperature": np.zeros(R, np.float32), "top_k": np.zeros(R, np.int32),
                "top_p": np.ones(R, np.float32), "seed": np.zeros(R, np.int32)}
        for r, (prompt, (s, n, _), pages, sampling) in enumerate(items):
            toks[r, :n] = prompt[s:s + n]
            start[r], length[r] = s, n
            nxt[r] = int(prompt[s + n]) if s + n < len(prompt) else -1
            pt[r] = self.page_table(pages)
            for k in samp:
                samp[k][r] = sampling[k]
        params = [it[3].get("params") for it in items] + [None] * (R - len(items))
        prompts = [it[0] for it in items] + [None] * (R - len(items))
        masks = [it[3].get("mask") for it in items] + [None] * (R - len(items))
        proc = self._proc_args(params, prompts, [0 if p is None else len(p) for p in prompts], [0] * R,
                               self.cfg.pages_per_seq * self.cfg.page_size, R, lambda a, fill: a, masks)
        token, draft, q, lp, ids, lps, plp, pids, plps = self._run(
            "prefill", (R, T), toks, start, length, nxt, pt, samp["temperature"], samp["top_k"], samp["top_p"],
            samp["seed"], *proc)
        token, draft = np.asarray(token), np.asarray(draft)
        q = np.asarray(q) if self.cfg.mtp else None
        want = [-1 if p is None or p.logprobs is None else p.logprobs for p in params]
        pwant = [-1 if p is None or p.prompt_logprobs is None else p.prompt_logprobs for p in params]
        if max(want) >= 0:
            lp, ids, lps = np.asarray(lp), np.asarray(ids), np.asarray(lps)
        if max(pwant) >= 0:
            plp, pids, plps = np.asarray(plp), np.asarray(pids), np.asarray(plps)
        outs = []
        for r, (prompt, (s0, n, _), _, _) in enumerate(items):
            first = logprob_entry(lp[r], ids[r], lps[r], want[r]) if want[r] >= 0 else None
            chunk_lps = None
            if pwant[r] >= 0:   # position t predicts prompt token s0 + t + 1; the prompt's first token has none
                chunk_lps = [None] * (s0 == 0) + [logprob_entry(plp[r, t], pids[r, t], plps[r, t], pwant[r])
                                                   for t in range(min(n, len(prompt) - 1 - s0))]
            outs.append(PrefillOut(int(token[r]), int(draft[r]), q[r] if q is not None else None, first, chunk_lps))
        return outs

    def prefill(self, prompt: np.ndarray, pages: list[int], sampling: dict[str, np.ndarray],
                start: int = 0) -> PrefillOut:
        """The chunks of `prompt` from `start` (the tokens before it are already in `pages`, e.g. a cached
        prefix) into `pages`: the first generated token (and MTP draft)."""
        prompt_lps = []
        for chunk in self.prefill_chunks(len(prompt) - start, start):
            out = self.prefill_chunk(prompt, chunk, pages, sampling)
            prompt_lps += out.prompt_logprobs or []
        return out._replace(prompt_logprobs=prompt_lps) if out.prompt_logprobs is not None else out

    # ---- page I/O (the scheduler side's prefix cache moves pages to and from its host/disk tiers) -----------
    def read_pages(self, pages: list[int]) -> jax.Array:
        """[layers, n_bucket, Z, C] rows of `pages` (one rank's, at most the largest transfer bucket) padded to
        a transfer bucket, as a device array (dispatched, not waited for; no compile on the request path)."""
        n = _bucket(len(pages), self.cfg.transfer_buckets)
        ids = np.full(n, self.scratch(self.rank_of(pages[0])), np.int32)
        ids[: len(pages)] = pages
        return self._run("extract", n, ids)

    def write_pages(self, pages: list[int], data: np.ndarray) -> None:
        """Write host rows [layers, n, Z, C] into `pages` (one rank's)."""
        big = self.cfg.transfer_buckets[-1]
        for i in range(0, len(pages), big):
            part, chunk = pages[i:i + big], data[:, i:i + big]
            n = _bucket(len(part), self.cfg.transfer_buckets)
            pad = np.zeros((chunk.shape[0], n) + chunk.shape[2:], chunk.dtype)
            pad[:, : len(part)] = chunk
            self.insert(Prefix(pad, len(part), 0, 0), part)

    def extract(self, pages: list[int], length: int, out: PrefillOut) -> Prefix:
        """The request's latent pages (all layers, MTP's included) and first token, ready to move."""
        n = _bucket(len(pages), self.cfg.transfer_buckets)
        ids = np.full(n, self.scratch(self.rank_of(pages[0])), np.int32)
        ids[: len(pages)] = pages
        return Prefix(self._run("extract", n, ids), len(pages), length, out.token, out.draft, out.draft_q,
                      logprobs=out.logprobs, prompt_logprobs=out.prompt_logprobs)

    def receive(self, prefix: Prefix) -> Prefix:
        """Move a Prefix produced on another mesh onto this engine's devices (device_put reshards). A group's
        leader keeps it on the host: `insert` sends it to every member with the call."""
        move = np.asarray if self.multiprocess else lambda x: jax.device_put(x, self._replicated)
        return dataclasses.replace(prefix, pages=move(prefix.pages), rest=tuple((move(a), k) for a, k in prefix.rest))

    def insert(self, prefix: Prefix, pages: list[int]) -> None:
        """Write a received prefix into this engine's pages: each piece's real pages into the next of `pages`."""
        at = 0
        for data, k in ((prefix.pages, prefix.n_pages), *prefix.rest):
            ids = np.full(data.shape[1], self.scratch(self.rank_of(pages[0])), np.int32)
            ids[:k], at = pages[at: at + k], at + k
            self._run("insert", data.shape[1], ids, data)

    def window_for(self, positions: np.ndarray) -> int:
        """The decode window (pages) for rows at `positions`: every position the dispatch writes (MTP: up to 2
        per step, plus the draft) must fall inside it."""
        reach = int(np.max(positions)) + self.cfg.decode_steps * (2 if self.cfg.mtp else 1) + 1
        return _bucket(min(pages_for(reach, self.cfg.page_size), self.cfg.pages_per_seq), self.cfg.windows)

    def generate(self, batch: DecodeBatch) -> DecodeOut:
        """One dispatch of `decode_steps` steps for every row (with MTP each step emits 1 or 2 tokens).

        With R attention ranks the dispatch has R equal slices of rows; row i goes into the slice of its rank
        (`batch.ranks`), padding rows point at their slice's scratch page. Outputs come back in `batch` order."""
        return self.dispatch(batch)()

    def dispatch(self, batch: DecodeBatch) -> typing.Callable[[], DecodeOut]:
        """`generate` without waiting: queues the dispatch and returns the call that reads its outputs. Rows with
        `batch.src[i]` >= 0 continue row `src[i]` of the previous dispatch (its last token, position and MTP draft,
        on the device: unread), so the host may queue dispatch n+1 before reading n (their positions: a bound)."""
        n, R = len(batch.tokens), self.ranks
        ranks = batch.ranks if batch.ranks is not None else np.zeros(n, np.int64)
        per_rank = np.bincount(ranks, minlength=R)
        B = _bucket(R * int(per_rank.max()), self.decode_buckets)
        b = B // R
        slot = np.empty(n, np.int64)                  # row i -> its place in the dispatch
        seen = np.zeros(R, np.int64)
        for i, r in enumerate(ranks):
            slot[i] = r * b + seen[r]
            seen[r] += 1
        Pw = self.window_for(batch.positions)

        def place(a, fill):
            out = np.full((B,) + a.shape[1:], fill, a.dtype)
            out[slot] = a
            return out

        s = batch.sampling
        pt = np.repeat(np.arange(R, dtype=np.int32) * self.pages_per_rank, b)[:, None] + np.zeros(Pw, np.int32)
        pt[slot] = batch.page_tables[:, :Pw]
        drafts = batch.drafts if batch.drafts is not None else np.zeros(n, np.int32)
        q = batch.draft_q if batch.draft_q is not None else np.zeros((n, self._q_width), np.float32)
        params = batch.params or [None] * n
        n_prompt = batch.prompt_lens if batch.prompt_lens is not None else np.zeros(n, np.int32)
        proc = self._proc_args(params, batch.histories, n_prompt, batch.positions + 1 - n_prompt,
                               Pw * self.cfg.page_size, B, place, batch.masks)
        src = np.full(n, -1, np.int32)   # rows continuing the previous dispatch: their slots there
        if batch.src is not None and (use := batch.src >= 0).any():
            src[use] = self._prev_slot[batch.src[use]]
        self._prev_slot = slot
        outs = self._run(
            "decode", (B, Pw), place(batch.tokens, 0), place(src, -1), place(batch.positions, 0), pt,
            place(s["temperature"], 0), place(s["top_k"], 0), place(s["top_p"], 1.0), place(s["seed"], 0),
            place(drafts, 0), place(q, 0), *proc)
        return functools.partial(self._decode_out, outs, slot, params, n)

    def _decode_out(self, outs, slot: np.ndarray, params: list, n: int) -> DecodeOut:
        """Read one dispatch's outputs (waits for it) in its batch's row order."""
        toks, ok, d, q, lp, top_ids, top_lps = outs
        toks, ok = np.asarray(toks)[slot], np.asarray(ok)[slot]
        S, want = self.cfg.decode_steps, [-1 if p is None or p.logprobs is None else p.logprobs for p in params]
        if max(want) >= 0:   # [n, S(, 2)] -> per row, one entry per step (MTP: per emitted token)
            lp, top_ids, top_lps = (np.asarray(x)[slot] for x in (lp, top_ids, top_lps))
        if not self.cfg.mtp:
            lps = None if max(want) < 0 else [
                None if k < 0 else [logprob_entry(lp[i, j], top_ids[i, j], top_lps[i, j], k) for j in range(S)]
                for i, k in enumerate(want)]
            return DecodeOut(toks.tolist(), [[1] * S] * n, [[False] * S] * n, None, None, lps)
        rows = [[int(t) for step, a in zip(tr, ar) for t in (step if a else step[:1])] for tr, ar in zip(toks, ok)]
        sizes = [[2 if a else 1 for a in ar] for ar in ok.tolist()]
        lps = None if max(want) < 0 else [
            None if k < 0 else [logprob_entry(lp[i, j, m], top_ids[i, j, m], top_lps[i, j, m], k)
                                for j in range(S) for m in range(2 if ok[i, j] else 1)] for i, k in enumerate(want)]
        return DecodeOut(rows, sizes, ok.tolist(), np.asarray(d)[slot], DeviceRows(q, slot), lps)

    def neutral_proc(self, rows: int, L: int) -> list:
        """The `serving.logits.Proc` inputs of a call of `rows` rows none of which asks for logprobs, processors or a
        grammar (L: the token-history width — decode: window pages x page size; prefill: max_model_len)."""
        return self._proc_args([None] * rows, None, [0] * rows, [0] * rows, L, rows, lambda a, fill: a)

    def _proc_args(self, params, histories, n_prompt, n_out, L: int, rows: int, place, masks=None) -> list:
        """The `serving.logits.Proc` inputs of one call of `rows` rows (`place` lays the n request rows into
        them). With no row processing its logits the wide arrays are device-resident zeros, built once per shape,
        so a plain call moves no history to the device."""
        need = any(needs_processing(p) for p in params)
        W = self.model_cfg.vocab_size
        arrays = proc_rows(params, histories, n_prompt, n_out, self.model_cfg.eos_token_ids, L if need else None, W,
                           masks)
        out = []
        for name, fill, (shape, dt) in zip(Proc._fields, PROC_FILL, proc_shapes(rows, L, W)):
            if name in arrays:
                out.append(place(arrays[name], fill))
                continue
            key = (name, shape)
            if key not in self._zeros:
                z = np.full(shape, fill, dt)
                self._zeros[key] = z if self.multiprocess else jax.device_put(z, self._replicated)
            out.append(self._zeros[key])
        return out

    # ---- introspection --------------------------------------------------------------------------------------------
    @property
    def model(self) -> DeepseekV3:
        """The placed model this engine runs (weights shared with the engine, not copied)."""
        return nnx.merge(self.graphdef, self.params)

    def decode_cost(self, batch: int | None = None, window: int | None = None) -> dict:
        """FLOPs and bytes of ONE decode step at a batch and window bucket, three ways:

        * `xla_step_flops` / `xla_step_bytes`: XLA's cost analysis of a 1-step executable (compiled here, off the
          request path). The dispatch executable runs `decode_steps` steps in a `lax.scan`, and XLA:CPU's cost
          analysis counts a scan body once, so its own figure is *one step*, whatever decode_steps is.
        * `model_step_flops`: the analytic count (`model.flops.decode_flops`) for this batch attending over the
          window's positions.
        * `dispatch_flops` = decode_steps x the per-step figure: what one dispatch really computes."""
        B = batch or self.decode_buckets[-1]
        Pw = window or self.cfg.windows[-1]
        ca = self.lower_decode(B, Pw, 1).compile().cost_analysis()
        ca = ca[0] if isinstance(ca, (list, tuple)) else ca
        step = float(ca.get("flops", 0.0))
        model = decode_flops(self.model_cfg, B, Pw * self.cfg.page_size, tokens_per_row=2 if self.cfg.mtp else 1,
                             mtp=self.cfg.mtp)
        return {"xla_step_flops": step, "xla_step_bytes": float(ca.get("bytes accessed", 0.0)),
                "model_step_flops": model, "steps": self.cfg.decode_steps, "batch": B, "window_pages": Pw,
                "dispatch_flops": step * self.cfg.decode_steps}

    def pages_needed(self, tokens: int) -> int:
        return pages_for(tokens, self.cfg.page_size)

