"""Disaggregated prefill, batched vs one request at a time, on the shipped model (in-process PD: prefill and
decode on separate fake devices).

    python -m bench.pd_prefill [--prompts 16] [--prompt_len 48] [--runs 3]

A burst of `--prompts` random prompts arrives at once; the prefill thread either runs them one request at a time
(`prefill_rows=(1,)`: what every prefill engine did before) or batched (the default row buckets, up to 4 rows of
the same chunk bucket per call). Reported per side, worst of `--runs` (alternating): TTFT p50 / p99 / max, the time
until every request has its first token, and the prefill thread's calls and rows. Tokens must be equal (greedy).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time

from absl import app, flags

flags.DEFINE_integer("prompts", 16, "requests in the burst")
flags.DEFINE_integer("prompt_len", 48, "tokens per prompt")
flags.DEFINE_integer("new_tokens", 4, "tokens generated per request")
flags.DEFINE_integer("runs", 3, "timed runs per side (worst reported)")
flags.DEFINE_string("out", "runs/pd_prefill.json", "JSON results")
FLAGS = flags.FLAGS


def _run(llm, prompts, sp):
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    wall = time.perf_counter() - t0
    ttft = sorted(o.metrics.ttft_s for o in outs)
    return {"ttft_p50_ms": statistics.median(ttft) * 1e3, "ttft_p99_ms": ttft[min(len(ttft) - 1,
                                                                                  int(0.99 * len(ttft)))] * 1e3,
            "ttft_max_ms": ttft[-1] * 1e3, "wall_s": wall}, [o.token_ids for o in outs]


def main(argv):
    del argv
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    import numpy as np

    from serving import LLM, SamplingParams
    from serving.config import EngineConfig

    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 1000, FLAGS.prompt_len).tolist() for _ in range(FLAGS.prompts)]
    sp = SamplingParams(max_tokens=FLAGS.new_tokens, ignore_eos=True)
    sides = {"one_at_a_time": EngineConfig(prefill_rows=(1,)), "batched": EngineConfig()}
    llms = {k: LLM(mode="disagg", prefill_mesh="tp=1", decode_mesh="ep=1", prefill_config=pc)
            for k, pc in sides.items()}
    res = {k: [] for k in sides}
    tokens = {}
    try:
        for k, llm in llms.items():
            _run(llm, prompts, sp)        # warm-up (compiles are done at start; caches, threads)
        for _ in range(FLAGS.runs):
            for k, llm in llms.items():
                before = dict(llm.scheduler.prefill_stats)
                r, tokens[k] = _run(llm, prompts, sp)
                after = llm.scheduler.prefill_stats
                r["calls"] = after["prefill_calls"] - before.get("prefill_calls", 0)
                r["rows"] = after["prefill_rows"] - before.get("prefill_rows", 0)
                res[k].append(r)
                print(k, json.dumps({a: round(b, 1) for a, b in r.items()}), flush=True)
    finally:
        for llm in llms.values():
            llm.close()
    worst = {k: {m: max(r[m] for r in rs) for m in rs[0]} for k, rs in res.items()}
    out = {"prompts": FLAGS.prompts, "prompt_len": FLAGS.prompt_len, "new_tokens": FLAGS.new_tokens,
           "runs": FLAGS.runs, "worst": worst, "all": res, "tokens_equal": tokens["batched"] == tokens["one_at_a_time"],
           "prefill_config": {k: dataclasses.asdict(v) for k, v in sides.items()}}
    os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
    with open(FLAGS.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps({"worst": worst, "tokens_equal": out["tokens_equal"]}, indent=1))


if __name__ == "__main__":
    app.run(main)
