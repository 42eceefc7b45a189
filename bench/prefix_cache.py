"""Prefix caching, KV tiers and KV-aware routing on shared-prefix workloads, in one run.

    python -m bench.prefix_cache [--part=local,routing,pd_chat] [--json out.json]

Workloads (random token ids, a random DeepSeek-V3-shaped checkpoint written with `transformers`):
* system prompts: S long system prompts and many short questions; request i = system[i % S] + question i, sent in
  waves of `--wave` concurrent requests (consecutive waves touch different system prompts);
* multi-turn chat: C conversations x T turns; each turn resends the whole history (prompts + answers) plus a new
  user message.

Part `local` (one colocated engine, the device cache sized to hold the running requests plus about one system
prompt): caching off / on (device only) / on + host tier / on + small host tier + disk tier. Part `routing`
(2 prefill workers with --prefix_caching, each able to keep about half of the system prompts, + 1 decode worker, real
processes): least-loaded vs KV-aware routing, each on fresh system prompts. Part `pd_chat` (1 prefill + 1 decode
worker with --prefix_caching): the chat workload with every prompt page sent vs only those the decode worker does not
cache (`RouterConfig.kv_skip_cached`), plus the transfer time and the pages not sent. Reported per configuration: TTFT
p50/p99, prompt tokens prefilled (computed) vs served from the cache, hits per tier, wall time.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

flags.DEFINE_list("part", ["local", "routing", "pd_chat"], "local (engine tiers), routing (worker processes), "
                 "pd_chat (multi-turn chat over 1P+1D: cached pages sent or not)")
flags.DEFINE_integer("runs", 3, "pd_chat: runs per side, alternating (worst reported)")
flags.DEFINE_integer("systems", 8, "distinct system prompts")
flags.DEFINE_integer("system_len", 192, "tokens per system prompt")
flags.DEFINE_integer("questions", 32, "requests of the system-prompt workload")
flags.DEFINE_integer("wave", 4, "concurrent requests per wave")
flags.DEFINE_integer("conversations", 4, "multi-turn workload: conversations (one wave per turn)")
flags.DEFINE_integer("turns", 4, "multi-turn workload: turns per conversation")
flags.DEFINE_integer("new_tokens", 8, "generated tokens per request")
flags.DEFINE_string("json", None, "write the results here")
FLAGS = flags.FLAGS

PAGE = 16
MAX_LEN = 512
HF = dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256, num_hidden_layers=4,
          num_attention_heads=8, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=1,
          topk_group=1, kv_lora_rank=128, q_lora_rank=192, qk_rope_head_dim=16, v_head_dim=32, qk_nope_head_dim=32,
          first_k_dense_replace=1, max_position_embeddings=MAX_LEN, rope_interleave=True)


def _pct(xs, q):
    return float(np.percentile(np.asarray(xs) * 1e3, q)) if xs else float("nan")


def _system_waves(rng) -> list[list[list[int]]]:
    """Waves of `--wave` prompts: system[i % S] + a short question."""
    systems = [rng.integers(2, 4096, FLAGS.system_len).tolist() for _ in range(FLAGS.systems)]
    qs = [systems[i % FLAGS.systems] + rng.integers(2, 4096, int(rng.integers(8, 24))).tolist()
          for i in range(FLAGS.questions)]
    return [qs[i:i + FLAGS.wave] for i in range(0, len(qs), FLAGS.wave)]


def _run_system(llm, waves, sp):
    outs = []
    for w in waves:
        outs += llm.generate(w, sp)
    return outs


def _run_chat(llm, rng, sp):
    hist = [rng.integers(2, 4096, 64).tolist() for _ in range(FLAGS.conversations)]   # a first user message
    outs = []
    for _ in range(FLAGS.turns):
        got = llm.generate(hist, sp)
        outs += got
        hist = [h + o.token_ids + rng.integers(2, 4096, 24).tolist() for h, o in zip(hist, got)]
    return outs


def _summary(outs, wall, stats) -> dict:
    ttft = [o.metrics.ttft_s for o in outs if o.metrics.ttft_s is not None]
    prompt = sum(o.metrics.prompt_tokens for o in outs)
    cached = sum(o.metrics.cached_tokens for o in outs)
    return {"requests": len(outs), "ttft_p50_ms": _pct(ttft, 50), "ttft_p99_ms": _pct(ttft, 99),
            "prompt_tokens": prompt, "prefilled_tokens": prompt - cached, "cached_tokens": cached,
            "wall_s": wall, "hits": {k: stats.get(f"hits_{k}", 0) for k in ("device", "host", "disk")},
            "evictions": stats.get("evictions", 0), "corrupt": stats.get("corrupt", 0)}


def part_local(path, model) -> list[dict]:
    from serving import LLM, EngineConfig, SamplingParams

    sp = SamplingParams(max_tokens=FLAGS.new_tokens, ignore_eos=True)
    sys_pages = -(-FLAGS.system_len // PAGE)
    running = FLAGS.wave * -(-(FLAGS.system_len + 24 + FLAGS.new_tokens) // PAGE)
    chat_running = FLAGS.conversations * -(-(64 + FLAGS.turns * (FLAGS.new_tokens + 24)) // PAGE)
    num_pages = max(running, chat_running) + sys_pages + 1      # the running requests + about one system prompt
    disk = tempfile.mkdtemp(prefix="tandem-kv-disk-")
    big = FLAGS.systems * sys_pages * 2
    configs = [("caching off", {}),
               ("device only", dict(prefix_caching=True)),
               ("device + host", dict(prefix_caching=True, host_cache_pages=big)),
               ("device + host (small) + disk", dict(prefix_caching=True, host_cache_pages=sys_pages,
                                                     disk_cache_pages=big, disk_cache_dir=disk))]
    rows = []
    for name, kw in configs:
        ec = EngineConfig(page_size=PAGE, num_pages=num_pages, max_model_len=MAX_LEN, prefill_buckets=(16, 64, 256),
                          decode_buckets=(1, 2, 4), decode_steps=4, **kw)
        with LLM(model=model, engine_config=ec) as llm:
            llm.generate([[5] * 40], sp)    # warm-up (the executables are compiled already; first-call costs)
            for wl in ("system prompts", "multi-turn chat"):
                rng = np.random.default_rng(0)   # the same requests for every configuration
                before = dict(next(iter(llm.prefix_cache_stats().values()), {}))
                t0 = time.perf_counter()
                if wl == "system prompts":
                    outs = _run_system(llm, _system_waves(rng), sp)
                else:
                    outs = _run_chat(llm, rng, sp)
                wall = time.perf_counter() - t0
                after = next(iter(llm.prefix_cache_stats().values()), {})
                delta = {k: after.get(k, 0) - before.get(k, 0) for k in after if isinstance(after.get(k), int)}
                row = {"workload": wl, "config": name, "num_pages": num_pages, **_summary(outs, wall, delta)}
                rows.append(row)
                print(_fmt(row), flush=True)
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def part_routing(path) -> list[dict]:
    from serving import LLM, SamplingParams
    from serving.router import RouterConfig

    sys_pages = -(-FLAGS.system_len // PAGE)
    # a prefill worker holds the requests it is prefilling / leasing plus about half of the system prompts
    pre_pages = 3 * (sys_pages + 2) + (FLAGS.systems // 2) * sys_pages + 1
    procs, addrs = _spawn(path, (("prefill", ["--prefix_caching", f"--num_pages={pre_pages}"]),
                                 ("prefill", ["--prefix_caching", f"--num_pages={pre_pages}"]),
                                 ("decode", ["--num_pages=256"])))
    rows = []
    sp = SamplingParams(max_tokens=FLAGS.new_tokens, ignore_eos=True)
    try:
        for i, (name, kv) in enumerate((("least-loaded", False), ("KV-aware", True))):
            cfg = RouterConfig(kv_routing=kv, max_prefill_inflight=3, step_timeout_s=120.0)
            with LLM(workers=addrs, router_config=cfg, ready_timeout_s=600) as llm:
                llm.backend.router.wait_until(lambda s: all(w["alive"] for w in s["workers"].values()), 600)
                llm.generate([[5] * 40], sp)
                rng = np.random.default_rng(100 + i)      # fresh system prompts: the other run's cache is no help
                waves = _system_waves(rng)
                before = llm.prefix_cache_stats()
                t0 = time.perf_counter()
                outs = _run_system(llm, waves, sp)
                wall = time.perf_counter() - t0
                after = llm.prefix_cache_stats()
                m = llm.backend.router.snapshot()["metrics"]
            hits = sum(after[a].get("hits_device", 0) - before.get(a, {}).get("hits_device", 0) for a in after)
            queried = sum(after[a].get("blocks_queried", 0) - before.get(a, {}).get("blocks_queried", 0)
                          for a in after)
            row = {"workload": "system prompts, 2P+1D", "config": name, **_summary(outs, wall, {}),
                   "prefill_block_hits": hits, "prefill_blocks_looked_up": queried,
                   "kv_routed_requests": m.get("kv_routed_requests", 0)}
            row["cached_tokens"] = hits * PAGE
            row["hits"]["device"] = hits
            row["prefilled_tokens"] = row["prompt_tokens"] - row["cached_tokens"]
            rows.append(row)
            print(_fmt(row), flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    return rows


def _spawn(path, roles) -> tuple[list, list[str]]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
               PYTHONPATH=root)
    common = [f"--checkpoint={path}", "--dtype=float32", f"--page_size={PAGE}", f"--max_model_len={MAX_LEN}",
              "--prefill_buckets=16,64,256", "--decode_buckets=1,2,4", "--decode_steps=4",
              f"--compilation_cache_dir={os.path.expanduser('~/.cache/tandem/xla_bench_cache')}"]
    procs, addrs = [], []
    for role, extra in roles:
        port = _free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "serving.worker", f"--role={role}", f"--port={port}",
                                       *common, *extra], env=env, cwd=root, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        addrs.append(f"127.0.0.1:{port}")
    return procs, addrs


def part_pd_chat(path) -> list[dict]:
    """Multi-turn chat through one prefill and one decode worker (--prefix_caching): each turn resends the history,
    which the decode worker cached when the last turn ended. `kv_skip_cached` off: every page of each prompt
    crosses; on: only the pages after the ones it holds. Worst of `--runs` per side, alternating."""
    from serving import LLM, SamplingParams
    from serving.router import RouterConfig

    procs, addrs = _spawn(path, (("prefill", ["--num_pages=256"]), ("decode", ["--prefix_caching",
                                                                                "--num_pages=512"])))
    sp = SamplingParams(max_tokens=FLAGS.new_tokens, ignore_eos=True)
    rows = {False: [], True: []}
    try:
        for run in range(FLAGS.runs):
            for skip in (False, True):
                cfg = RouterConfig(kv_skip_cached=skip, step_timeout_s=120.0)
                with LLM(workers=addrs, router_config=cfg, ready_timeout_s=600) as llm:
                    llm.backend.router.wait_until(lambda s: all(w["alive"] for w in s["workers"].values()), 600)
                    llm.generate([[5] * 40], sp)
                    rng = np.random.default_rng(1000 + 2 * run + skip)   # fresh conversations: no earlier hits
                    t0 = time.perf_counter()
                    outs = _run_chat(llm, rng, sp)
                    wall = time.perf_counter() - t0
                    m = llm.backend.router.snapshot()["metrics"]
                xfer = [o.metrics.transfer_s for o in outs if o.metrics.transfer_s is not None]
                pages = sum(-(-len(o.prompt_token_ids) // PAGE) for o in outs)
                row = {"workload": "multi-turn chat, 1P+1D", "config": "cached pages not sent" if skip else
                       "every page sent", **_summary(outs, wall, {}), "transfer_p50_ms": _pct(xfer, 50),
                       "transfer_mean_ms": float(np.mean(xfer) * 1e3), "prompt_pages": pages,
                       "pages_not_sent": m.get("kv_pages_not_sent", 0), "transfers": m.get("transfers", 0),
                       "e2e_p50_ms": _pct([o.metrics.e2e_s for o in outs], 50)}
                rows[skip].append(row)
                print(_fmt(row), f"| transfer p50 {row['transfer_p50_ms']:.2f} ms mean "
                      f"{row['transfer_mean_ms']:.2f} ms | pages not sent {row['pages_not_sent']} of {pages}"
                      f" | e2e p50 {row['e2e_p50_ms']:.1f} ms", flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=10)
    worst = []
    for skip in (False, True):   # the worst run per figure
        rs = rows[skip]
        w = dict(rs[0])
        for k in ("ttft_p50_ms", "ttft_p99_ms", "transfer_p50_ms", "transfer_mean_ms", "e2e_p50_ms", "wall_s"):
            w[k] = max(r[k] for r in rs)
        w["config"] += f" (worst of {len(rs)})"
        worst.append(w)
        print(_fmt(w), f"| transfer p50 {w['transfer_p50_ms']:.2f} ms mean {w['transfer_mean_ms']:.2f} ms"
              f" | e2e p50 {w['e2e_p50_ms']:.1f} ms", flush=True)
    return rows[False] + rows[True] + worst


def _fmt(r) -> str:
    return (f"{r['workload']:<22} {r['config']:<30} TTFT p50 {r['ttft_p50_ms']:7.1f} ms p99 {r['ttft_p99_ms']:7.1f} ms"
            f" | prefilled {r['prefilled_tokens']:6d} of {r['prompt_tokens']:6d} prompt tokens"
            f" | hits dev/host/disk {r['hits']['device']}/{r['hits']['host']}/{r['hits']['disk']}"
            f" | {r['wall_s']:.2f} s")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp

    import checkpoints
    import hf_reference

    print(f"{os.cpu_count()} CPU cores, jax {jax.__version__}; page {PAGE}, model {HF['hidden_size']}d "
          f"x{HF['num_hidden_layers']} layers, {HF['n_routed_experts']} experts", flush=True)
    path = tempfile.mkdtemp(prefix="tandem-prefix-bench-")
    hf_reference.build(path, HF, seed=3)
    rows = []
    if "local" in FLAGS.part:
        rows += part_local(path, checkpoints.load(path, dtype=jnp.float32))
    if "routing" in FLAGS.part:
        rows += part_routing(path)
    if "pd_chat" in FLAGS.part:
        rows += part_pd_chat(path)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    app.run(main)
