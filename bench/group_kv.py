"""KV into a decode worker group: relayed by the leader (`--group_kv=leader`) vs pulled by the member owning each
request's rank (`--group_kv=member`, the default). One prefill worker process and two 2-process decode groups
(dp=2,ep=2: 2 attention ranks per process), one per mode, on this machine's CPU; alternating rounds of N prompts
sent at once. Per mode: the KV bytes each process pulled, the bytes the leader sent its follower on the step
channel, and the router's per-request transfer time and TTFT.

    python -m bench.group_kv [--requests=16 --prompt_len=500 --rounds=2]
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
import zmq
from absl import app, flags

_N = flags.DEFINE_integer("requests", 16, "prompts per round, sent at once")
_LEN = flags.DEFINE_integer("prompt_len", 500, "prompt tokens (+-10%)")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "alternating rounds per mode")
_MML = flags.DEFINE_integer("max_model_len", 1024, "the workers' max_model_len")
_OVERRIDES = flags.DEFINE_string(
    "ckpt_overrides", '{"kv_lora_rank": 512, "qk_rope_head_dim": 64, "hidden_size": 256, "num_hidden_layers": 8, '
    '"intermediate_size": 512, "moe_intermediate_size": 128}', "config overrides of the tiny checkpoint built here "
    "(default: DeepSeek's latent width, 576 per token and layer, 8 layers)")
_JSON = flags.DEFINE_string("json_out", "runs/group_kv.json", "results")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def _stats(addr: str) -> dict:
    from serving.protocol import decode_message, encode_message

    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://{addr}")
    try:
        s.send(encode_message("stats"))
        if not s.poll(10_000):
            raise TimeoutError(f"{addr}: no stats within 10 s")
        return decode_message(s.recv())
    finally:
        s.close(0)


def _counters(addr: str) -> dict:
    h = _stats(addr)
    fk = h["group"]["member_kv"].get("1", {})
    return {"leader_pulled": h["metrics"].get("pulled_bytes", 0), "follower_pulled": fk.get("pulled_bytes", 0),
            "step_channel": h["group"]["mirror"]["bytes"]["m1"], "member_pulls": h["metrics"].get("member_pulls", 0),
            "held_on_follower": fk.get("held", 0)}


def main(argv):
    del argv
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import hf_reference
    from serving import LLM, SamplingParams
    from serving.router import RouterConfig

    tmp = tempfile.mkdtemp(prefix="groupkv-")
    ckpt = os.path.join(tmp, "ckpt")
    hf_reference.build(ckpt, {"max_position_embeddings": _MML.value, **json.loads(_OVERRIDES.value)}, seed=11)
    cache = os.path.expanduser("~/.cache/tandem/xla_bench_cache")
    common = [f"--checkpoint={ckpt}", "--dtype=float32", "--page_size=16", f"--max_model_len={_MML.value}",
              f"--num_pages={_N.value * _MML.value // 16 + 8}", "--prefill_buckets=32,128", "--decode_buckets=8,16",
              "--decode_steps=4", f"--compilation_cache_dir={cache}"]
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    procs, groups = [], {}
    pre = f"127.0.0.1:{_port()}"
    procs.append(subprocess.Popen([sys.executable, "-m", "serving.worker", "--role=prefill", f"--port={pre.split(':')[1]}",
                                   *common], env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=1"),
                                  stdout=open(os.path.join(tmp, "prefill.log"), "w"), stderr=subprocess.STDOUT))
    for mode in ("leader", "member"):
        addr, coord = f"127.0.0.1:{_port()}", f"127.0.0.1:{_port()}"
        for k in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "serving.worker", "--role=decode", "--devices=2", "--mesh=dp=2,ep=2",
                 f"--coordinator_address={coord}", "--num_processes=2", f"--process_id={k}", f"--group_kv={mode}",
                 *([f"--port={addr.split(':')[1]}"] if k == 0 else []), *common], env=env,
                stdout=open(os.path.join(tmp, f"{mode}-{k}.log"), "w"), stderr=subprocess.STDOUT))
        groups[mode] = addr
    rng = np.random.default_rng(0)
    out = {m: [] for m in groups}
    try:
        for _ in range(_ROUNDS.value):
            for mode, addr in groups.items():
                with LLM(workers=[pre, addr], router_config=RouterConfig(max_prefill_inflight=1 << 20),
                         ready_timeout_s=900) as llm:   # (every prompt prefilled on the prefill worker)
                    llm.backend.router.wait_until(lambda s: all(w["alive"] for w in s["workers"].values()), 900)
                    llm.generate([[1, 2, k] * 60 for k in range(4)], SamplingParams(max_tokens=2))   # warm: both
                    # members' connections to the prefill worker's transfer server
                    before = _counters(addr)
                    lens = rng.integers(int(_LEN.value * 0.9), int(_LEN.value * 1.1) + 1, _N.value)
                    prompts = [rng.integers(1, 90, int(n)).tolist() for n in lens]
                    t0 = time.perf_counter()
                    reqs = [llm.submit(p, SamplingParams(max_tokens=8, ignore_eos=True)) for p in prompts]
                    for _ in llm._stream(reqs):
                        pass
                    wall = time.perf_counter() - t0
                    time.sleep(1.0)   # the follower's counters come with its heartbeats
                    after = _counters(addr)
                rm = [r.router_metrics for r in reqs]
                assert all(not x["local_prefill"] for x in rm), rm
                out[mode].append({"wall_s": wall, **{k: after[k] - before[k] for k in before if k != "held_on_follower"},
                                  "held_on_follower": after["held_on_follower"],
                                  "transfer_ms": [x["transfer_s"] * 1e3 for x in rm],
                                  "ttft_ms": [x["ttft_s"] * 1e3 for x in rm]})
                r = out[mode][-1]
                print(f"{mode}: {wall:.2f}s, KV pulled by leader {r['leader_pulled'] / 1e6:.1f} MB, by follower "
                      f"{r['follower_pulled'] / 1e6:.1f} MB, step channel to follower {r['step_channel'] / 1e6:.2f} "
                      f"MB, member pulls {r['member_pulls']}, transfer p50 {np.median(r['transfer_ms']):.1f} ms, "
                      f"TTFT p50 {np.median(r['ttft_ms']):.0f} ms", flush=True)
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=30)
    rows = ["| KV into the group | KV pulled by the leader | by the follower | step channel leader -> follower | "
            "transfer p50 / p90 | TTFT p50 / p90 | wall (worst) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for mode, runs in out.items():
        worst = max(runs, key=lambda r: r["wall_s"])
        tr, tt = np.concatenate([r["transfer_ms"] for r in runs]), np.concatenate([r["ttft_ms"] for r in runs])
        rows.append(f"| {mode} | {worst['leader_pulled'] / 1e6:.1f} MB | {worst['follower_pulled'] / 1e6:.1f} MB | "
                    f"{worst['step_channel'] / 1e6:.2f} MB | {np.median(tr):.1f} / {np.percentile(tr, 90):.1f} ms | "
                    f"{np.median(tt):.0f} / {np.percentile(tt, 90):.0f} ms | {worst['wall_s']:.2f} s |")
    print("\n".join(rows))
    os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
    with open(_JSON.value, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    app.run(main)
