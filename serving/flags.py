"""One absl flag definer for every launch script (batch job, HTTP server, worker, benches): the same engine flags
with the same defaults everywhere, read back into an `EngineConfig` / `SchedulerConfig` / `LLM` here.

    define_engine_flags()   # the engine: checkpoint, dtype, quant, KV cache, buckets, MTP, prefix caching
    define_pool_flags()     # in-process pools (batch job, server): mode, meshes, or worker processes / a router
"""

from __future__ import annotations

from absl import flags

from serving.config import (AUTO_BATCH_CAP, AUTO_BATCH_TOKENS, DEFAULT_AUTO_BATCH_CAP, DEFAULT_CHECKPOINT,
                            ONLINE_PREFILL_BUDGET, ONLINE_PREFILL_BUDGET_MAX, PREFILL_DRAIN_STEPS, EngineConfig,
                            SchedulerConfig, decode_buckets_up_to, default_max_model_len, default_mesh)

QUANTS = ["fp8", "nvfp4", "mxfp4", "nvfp4+dense", "mxfp4+dense"]


def _once(name: str) -> bool:
    return name in flags.FLAGS


def define_engine_flags() -> None:
    """Engine settings shared by every entry point (idempotent)."""
    if _once("page_size"):
        return
    f = flags
    f.DEFINE_string("checkpoint", None, "HF DeepSeek-V3 checkpoint dir (default: the shipped model)")
    f.DEFINE_enum("dtype", None, ["bfloat16", "float32"], "weight dtype; FP8 / FP4 weights stay packed (default: "
                  "by platform, float32 on CPU, bfloat16 on GPU; logged at start)")
    f.DEFINE_enum("quant", None, QUANTS, "quantize weights at load: fp8 = block-FP8 every decoder linear; nvfp4 / "
                  "mxfp4 = FP4 routed experts (+dense: also dense MLPs and shared experts)")
    f.DEFINE_enum("cache_dtype", None, ["bfloat16", "float32", "fp8"], "KV cache format (default: the weights' "
                  "dtype; fp8 = e4m3 + a per-token scale, half of bf16's bytes)")
    f.DEFINE_integer("page_size", 16, "KV page size (tokens)")
    f.DEFINE_integer("num_pages", 0, "KV pages per engine (per attention rank); 0: sized automatically — on GPUs "
                     "from device memory (--kv_memory_fraction, default 0.9), on CPU from a 2 GiB host budget, at most "
                     "what the batch limit's rows need at max_model_len")
    f.DEFINE_float("kv_memory_fraction", None, "size each KV cache from this fraction of device memory minus "
                   "weights and executable temporaries, instead of --num_pages (GPU default 0.9)")
    f.DEFINE_float("device_memory_gb", None, "device memory for --kv_memory_fraction where devices do not report "
                   "it (CPU)")
    f.DEFINE_integer("max_model_len", 0, "prompt + generated tokens per request (0: the checkpoint's "
                     "max_position_embeddings, at most 1024)")
    f.DEFINE_integer("max_batch", 0, "largest decode batch (running requests); 0: sized from the KV pool — its "
                     f"tokens / {AUTO_BATCH_TOKENS}, at most {AUTO_BATCH_CAP['cpu']} on CPU and "
                     f"{DEFAULT_AUTO_BATCH_CAP} on GPU")
    f.DEFINE_list("decode_buckets", None, "decode batch buckets (default: powers of two up to --max_batch)")
    f.DEFINE_list("prefill_buckets", None, "prefill chunk lengths (default: powers of two from 16 up to "
                  "max_model_len / 8, within [128, 512])")
    f.DEFINE_list("prefill_rows", [str(r) for r in EngineConfig.prefill_rows], "row buckets of batched prefill "
                  "(requests per prefill call; colocated and on prefill engines/workers)")
    f.DEFINE_integer("prefill_tokens", 0, "most prompt tokens one prefill call holds (0: 256 or the largest "
                     "prefill bucket if more); a dedicated prefill worker may take more")
    f.DEFINE_integer("decode_steps", EngineConfig.decode_steps, "decode steps per dispatch")
    f.DEFINE_integer("prefill_budget", 0, "colocated: prompt tokens prefilled per scheduler step (0: the entry "
                     f"point's policy: the batch job 2048, throughput; the server {ONLINE_PREFILL_BUDGET}, latency); the "
                     "least a step prefills when the budget grows with the backlog")
    f.DEFINE_integer("prefill_budget_max", ONLINE_PREFILL_BUDGET_MAX, "colocated: the most prompt tokens a step "
                     "prefills: each step takes the admitted prompts' tokens left / --prefill_drain_steps within "
                     "[--prefill_budget, this] (at or below --prefill_budget: a fixed budget)")
    f.DEFINE_integer("prefill_drain_steps", PREFILL_DRAIN_STEPS, "colocated: decode dispatches a prefill backlog "
                     "is spread over (see --prefill_budget_max)")
    f.DEFINE_bool("overlap_decode", True, "queue decode dispatch n+1 from dispatch n's tokens on the device before "
                  "the host reads dispatch n (off: read each dispatch first; always off with MTP, logits processors "
                  "or grammars in the batch)")
    f.DEFINE_bool("mtp", False, "speculative decoding with the checkpoint's MTP module (k = 1)")
    f.DEFINE_integer("redundant_experts", 0, "EPLB: extra routed-expert slots per MoE layer (e.g. 32: V3's 256 "
                     "experts in 288 slots), loaded in the uniform placement and rebalanced by --eplb_interval")
    f.DEFINE_integer("eplb_interval", 0, "EPLB: re-place the expert slots from the routing counts every this many "
                     "dispatches, between steps, without recompiling (0: never; needs --redundant_experts)")
    f.DEFINE_integer("expert_stats_interval", EngineConfig.expert_stats_interval, "dispatches between host reads of "
                     "the routing counts the executables keep on device (/metrics, worker stats)")
    f.DEFINE_bool("prefix_caching", False, "reuse the KV of cached prompt prefixes (full pages, chained token "
                  "hashes, LRU) instead of prefilling them again")
    f.DEFINE_integer("kv_host_pages", 0, "host-memory KV tier: pages evicted from the device are kept here "
                     "(0: none; needs --prefix_caching)")
    f.DEFINE_integer("kv_disk_pages", 0, "disk KV tier: pages the host tier evicts are written under "
                     "--kv_disk_dir (0: none; needs --kv_host_pages)")
    f.DEFINE_string("kv_disk_dir", None, "directory of the disk KV tier (one checksummed file per page; a "
                    "subdirectory per model fingerprint)")
    f.DEFINE_string("executable_cache_dir", None, "keep compiled executables here: a restart with the same model, "
                    "mesh and settings loads them instead of tracing, lowering and compiling (serving.exec_cache)")


def define_pool_flags() -> None:
    """Where an in-process `LLM` runs (batch job, server): one mesh or two, or worker processes (idempotent)."""
    if _once("mode"):
        return
    f = flags
    f.DEFINE_enum("mode", "colocated", ["colocated", "disagg"], "one mesh prefills and decodes, or PD "
                  "disaggregation over two meshes")
    f.DEFINE_integer("prefill_devices", 1, "devices of the prefill pool (disagg)")
    f.DEFINE_integer("decode_devices", 1, "devices of the decode pool")
    f.DEFINE_string("prefill_mesh", None, "prefill mesh, e.g. 'tp=2' (default: tp over --prefill_devices when "
                    "the heads divide, else dp)")
    f.DEFINE_string("decode_mesh", None, "decode mesh, e.g. 'ep=4' or 'dp=2,ep=2' (default: ep over "
                    "--decode_devices when the experts divide, else dp)")
    f.DEFINE_list("workers", None, "serve through PD worker processes (their control addresses) instead")
    f.DEFINE_string("router", None, "serve through a running router (python -m serving.router) at host:port")


def checkpoint(F=flags.FLAGS) -> str:
    return F.checkpoint or DEFAULT_CHECKPOINT


def engine_config(mcfg, F=flags.FLAGS) -> EngineConfig:
    """The EngineConfig the engine flags describe, for a model config `mcfg` (its max_position_embeddings)."""
    return EngineConfig(
        page_size=F.page_size, num_pages=F.num_pages or None,
        max_model_len=F.max_model_len or default_max_model_len(mcfg.max_position_embeddings, F.page_size),
        prefill_buckets=tuple(int(b) for b in F.prefill_buckets) if F.prefill_buckets else None,
        prefill_rows=tuple(int(r) for r in F.prefill_rows), prefill_tokens=F.prefill_tokens or None,
        decode_buckets=(tuple(int(b) for b in F.decode_buckets) if F.decode_buckets
                        else decode_buckets_up_to(F.max_batch) if F.max_batch else None),
        decode_steps=F.decode_steps, mtp=F.mtp, cache_dtype=F.cache_dtype, prefix_caching=F.prefix_caching,
        host_cache_pages=F.kv_host_pages, disk_cache_pages=F.kv_disk_pages, disk_cache_dir=F.kv_disk_dir,
        redundant_experts=F.redundant_experts, eplb_interval=F.eplb_interval,
        expert_stats_interval=F.expert_stats_interval,
        executable_cache_dir=F.executable_cache_dir)


def scheduler_config(default_budget: int, F=flags.FLAGS) -> SchedulerConfig:
    return SchedulerConfig(max_batch=F.max_batch or None, prefill_budget=F.prefill_budget or default_budget,
                           prefill_budget_max=F.prefill_budget_max, prefill_drain_steps=F.prefill_drain_steps,
                           overlap_decode=F.overlap_decode)


def pool_meshes(mcfg, F=flags.FLAGS) -> tuple[str | None, str]:
    """(prefill mesh or None when colocated, decode mesh) from the pool flags."""
    heads, experts = mcfg.num_attention_heads, mcfg.n_routed_experts
    dmesh = F.decode_mesh or default_mesh("decode", F.decode_devices, heads, experts)
    pmesh = None
    if F.mode == "disagg":
        pmesh = F.prefill_mesh or default_mesh("prefill", F.prefill_devices, heads, experts)
    return pmesh, dmesh


def llm(default_budget: int, F=flags.FLAGS, **kw):
    """The `LLM` the engine and pool flags describe (local engines, or worker processes / a router)."""
    import checkpoints
    from serving.llm import LLM
    from serving.protocol import read_token

    ckpt = checkpoint(F)
    if F.workers or F.router:
        return LLM(ckpt, workers=F.workers, router=F.router, token=read_token(None), **kw)
    mcfg = checkpoints.config_of(ckpt)
    pmesh, dmesh = pool_meshes(mcfg, F)
    return LLM(ckpt, mode=F.mode, prefill_mesh=pmesh, decode_mesh=dmesh, engine_config=engine_config(mcfg, F),
               scheduler_config=scheduler_config(default_budget, F), dtype=F.dtype, quant=F.quant,
               kv_memory_fraction=F.kv_memory_fraction, device_memory_gb=F.device_memory_gb, **kw)


def define_worker_flags():
    """The worker flags (all but --role; serving.worker, serving.dynamo): endpoints, transport, leases, groups,
    drain, and the shared engine flags (idempotent)."""
    if _once("lease_s"):
        return flags.FLAGS
    f = flags
    f.DEFINE_string("host", "127.0.0.1", "address to bind the control endpoint and the transfer server")
    f.DEFINE_integer("port", 0, "control port (0: pick a free one; printed on the READY line)")
    f.DEFINE_integer("transfer_port", 0, "KV transfer server port (0: pick a free one)")
    f.DEFINE_enum("transport", "jax", ["jax", "tcp"], "KV data plane: jax.experimental.transfer or plain TCP")
    f.DEFINE_integer("devices", 1, "CPU devices of this process (jax_num_cpu_devices; ignored on GPU/TPU)")
    f.DEFINE_string("mesh", None, "engine mesh, e.g. 'tp=2' (default: tp over --devices for prefill, ep for "
                    "decode)")
    f.DEFINE_float("lease_s", 30.0, "an offered KV lease expires after this many seconds without an ack")
    f.DEFINE_float("drain_timeout_s", 30.0, "SIGTERM: stop taking work, finish in-flight requests and leases within "
                   "this, then exit 0 (the router stops sending first and lets the worker go once it is idle)")
    f.DEFINE_float("pull_timeout_s", 20.0, "a KV pull that takes longer fails")
    f.DEFINE_string("weights_from", None, "HOST:PORT of a running worker with the same checkpoint: take its weights "
                    "over the transfer server instead of reading the checkpoint (which stays the fallback)")
    f.DEFINE_float("weights_timeout_s", 60.0, "--weights_from: the peer's answer and the pull must finish within this")
    f.DEFINE_bool("verify_checksums", True, "verify per-page checksums of pulled KV")
    f.DEFINE_string("token_file", None, "file holding the shared-secret token (default: $TANDEM_TOKEN if set)")
    f.DEFINE_string("compilation_cache_dir", None, "persistent XLA compilation cache (faster restarts)")
    f.DEFINE_float("fault_pull_delay_s", 0.0, "fault injection for tests: wait this long before each pull")
    f.DEFINE_float("fault_corrupt_pages", 0.0, "fault injection (bench.chaos): this share of KV pulls arrive with a "
                   "flipped bit (caught by the checksum; the request migrates)")
    f.DEFINE_float("fault_step_delay_s", 0.0, "fault injection for tests: wait this long before each decode step")
    # worker groups: one engine over the devices of several processes (serving/group.py, docs/multihost.md)
    f.DEFINE_string("coordinator_address", None, "worker group: HOST:PORT of jax.distributed's coordinator "
                    "(process 0 serves it)")
    f.DEFINE_integer("num_processes", 1, "worker group: processes in the group (1: no group)")
    f.DEFINE_integer("process_id", 0, "worker group: this process (0 is the leader: the control endpoint)")
    f.DEFINE_float("fence_s", 10.0, "worker group: a member silent this long fences the whole group")
    f.DEFINE_float("group_timeout_s", 120.0, "worker group: forming the group must finish within this")
    f.DEFINE_float("group_step_timeout_s", 120.0, "worker group: the leader's engine step stuck this long (a "
                   "collective that never completes) fences the group")
    f.DEFINE_enum("group_kv", "member", ["member", "leader"], "decode group: KV pulled by the member owning the "
                  "request's attention rank (member), or by the leader and relayed with the insert (leader)")
    f.DEFINE_string("otlp_traces_endpoint", None, "OTLP/HTTP traces URL: export this worker's spans of traced "
                    "requests itself (default: they go back to the router on the control plane)")
    f.DEFINE_bool("allow_cross_domain", False, "let EP/TP groups span hosts (domains) when the mesh needs it")
    define_engine_flags()   # the engine flags every entry point shares
    return flags.FLAGS
