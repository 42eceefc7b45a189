"""XLA:CPU's library and threading options on Tandem's real decode and prefill steps, per weight dtype.

    python -m bench.xla_cpu_flags                          # latent-8e, f32 and bf16, every flag set, worst of 2
    python -m bench.xla_cpu_flags --configs latent-8e,latent-32e,shipped --sets default,onednn --runs 3

Each (config, dtype, flag set) is one `LLM` at Tandem's defaults in its own process with `XLA_FLAGS` set (XLA reads
them once, at backend start): the offline measurement of `bench.vs_vllm` — decode tok/s at `--batches` (32-token
prompts, 64 greedy tokens, two warm-ups) and the TTFT of one `--ttft_lens` prompt. Greedy tokens are compared with
the default set's of the same dtype: a set that changes them is flagged (fast-math may). The checkpoints are
`bench.vs_vllm`'s (written once under --workdir). Writes --json_out and prints a markdown table; the CPU default
kept in `serving` is the fastest set whose tokens match.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS

# jax 0.10.2's XLA:CPU options (names from its flag registry); each set is added to an empty XLA_FLAGS
SETS = {
    "default": "",
    "no-xnnpack": "--xla_cpu_use_xnnpack=false",
    "xnn-fusion": "--xla_cpu_experimental_xnn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
    "xnn-graph": "--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
    "onednn": "--xla_cpu_use_onednn=true --xla_cpu_experimental_onednn_custom_call=true",
    "onednn-fusion": "--xla_cpu_experimental_onednn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
    "ynn-fusion": "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_ELTWISE",
    "fast-math": "--xla_cpu_enable_fast_math=true",
    "eigen-1-thread": "--xla_cpu_multi_thread_eigen=false",
    "vector-512": "--xla_cpu_prefer_vector_width=512",
    "no-thunks": "--xla_cpu_use_thunk_runtime=false",   # the pre-thunk runtime: one compiled function, no op dispatch
}


def define_flags() -> None:
    flags.DEFINE_list("configs", ["latent-8e"], "bench.vs_vllm checkpoints (shipped, latent-8e, latent-32e)")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "weight dtypes")
    flags.DEFINE_list("sets", list(SETS), "flag sets (names in SETS)")
    flags.DEFINE_list("batches", ["1", "16"], "decode batch sizes")
    flags.DEFINE_list("ttft_lens", ["512"], "TTFT prompt lengths")
    flags.DEFINE_integer("runs", 2, "runs per point; the worst is reported")
    flags.DEFINE_string("workdir", "/tmp/tandem-vs-vllm", "bench.vs_vllm's checkpoints")
    flags.DEFINE_string("json_out", "runs/xla_cpu_flags.json", "results (resumable)")
    flags.DEFINE_float("timeout_s", 1800.0, "bound on one measurement process")


def run_point(ckpt: str, dtype: str, xla_flags: str) -> dict:
    from bench import vs_vllm

    info = vs_vllm.model_info(ckpt)
    mlen = min(info["max_pos"], 4096)
    a = {"checkpoint": ckpt, "vocab_size": info["vocab_size"], "max_model_len": mlen, "dtype": dtype,
         "batches": [int(b) for b in FLAGS.batches], "ttft_lens": [int(n) for n in FLAGS.ttft_lens if int(n) < mlen]}
    env = vs_vllm.tandem_env()
    env["XLA_FLAGS"] = xla_flags   # replaces make's fake-device flag: one CPU device, as a user's process has
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "bench.vs_vllm", "--worker=tandem_offline", f"--worker_args={json.dumps(a)}"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=FLAGS.timeout_s, env=env)
    if p.returncode:
        return {"error": f"exit {p.returncode}: {(p.stdout + p.stderr)[-600:]}"}
    return vs_vllm._result_line(p.stdout)


def worst(runs: list[dict]) -> dict:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[-1]
    return {"decode_tok_s": {b: min(r["decode_tok_s"][b] for r in ok) for b in ok[0]["decode_tok_s"]},
            "ttft_s": {n: max(r["ttft_s"][n] for r in ok) for n in ok[0]["ttft_s"]},
            "tokens": ok[0]["tokens"]}


def table(res: dict) -> str:
    bs, ls = FLAGS.batches, FLAGS.ttft_lens
    head = ("| config | dtype | flag set | " + " | ".join(f"decode b{b} tok/s" for b in bs) + " | "
            + " | ".join(f"TTFT {n} ms" for n in ls) + " | tokens = default |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for cfg, by_dtype in res.items():
        for dt, by_set in by_dtype.items():
            ref = by_set.get("default", {}).get("worst", {}).get("tokens")
            for name, r in by_set.items():
                w = r.get("worst", {})
                if "error" in w or not w:
                    lines.append(f"| {cfg} | {dt} | {name} | error: {w.get('error', 'not run')[:80]!r} |")
                    continue
                d, t = w["decode_tok_s"], w["ttft_s"]
                same = "—" if ref is None else ("yes" if w["tokens"] == ref else "**no**")
                lines.append(f"| {cfg} | {dt} | {name} | " + " | ".join(f"{d.get(b, 0):,.0f}" for b in bs) + " | "
                             + " | ".join(f"{1e3 * t[n]:,.0f}" if n in t else "—" for n in ls) + f" | {same} |")
    return "\n".join(lines)


def main(argv):
    del argv
    from bench import vs_vllm

    unknown = [s for s in FLAGS.sets if s not in SETS]
    if unknown:
        raise app.UsageError(f"--sets: unknown {unknown} (known: {', '.join(SETS)})")
    res = json.load(open(FLAGS.json_out)).get("results", {}) if os.path.exists(FLAGS.json_out) else {}
    os.makedirs(os.path.dirname(FLAGS.json_out) or ".", exist_ok=True)
    for cfg in FLAGS.configs:
        ckpt = vs_vllm.prepare(cfg, FLAGS.workdir)
        for dt in FLAGS.dtypes:
            for name in FLAGS.sets:
                r = res.setdefault(cfg, {}).setdefault(dt, {}).setdefault(name, {"flags": SETS[name], "runs": []})
                while len(r["runs"]) < FLAGS.runs:
                    t0 = time.perf_counter()
                    r["runs"].append(run_point(ckpt, dt, SETS[name]))
                    print(f"{cfg} {dt} {name} run {len(r['runs'])}: {time.perf_counter() - t0:.0f} s "
                          f"{json.dumps(r['runs'][-1])[:200]}", flush=True)
                    _save(res)
                r["worst"] = worst(r["runs"][: FLAGS.runs])
        _save(res)
    print(table(res))


def _save(res: dict) -> None:
    from bench import vs_vllm

    tmp = FLAGS.json_out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"machine": vs_vllm._machine(), "results": res}, f, indent=1)
    os.replace(tmp, FLAGS.json_out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
