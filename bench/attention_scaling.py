"""Attention that scales with what is there: prefill vs prompt length at a fixed max_model_len, and decode
throughput / KV capacity vs data-parallel attention ranks at a fixed device count. Every comparison in one run.

    python -m bench.attention_scaling --part=prefill   # shipped model, max_model_len 4096
    python -m bench.attention_scaling --part=dp        # 8 fake CPU devices: replicated cache vs DP attention

part=prefill: time to first token of one request (prefill only) for prompts of 64..4000 tokens, with the prefill
attention over the executable's whole page window (`Runtime(prefill_attention="window")`, the first version) and
blockwise over only the blocks the chunk reaches (`"blockwise"`, default); plus the analytic attention FLOPs of
both (`model.flops`). part=dp: the same model decoding a batch of requests on 8 devices with the cache replicated
(pages on no mesh axis, the first version) and with data-parallel attention over 2, 4 and 8 ranks: tok/s, KV
capacity (tokens the engine can hold) and pages per device.
"""

from __future__ import annotations

import os
import time

import jax
from absl import app, flags

flags.DEFINE_enum("part", "prefill", ["prefill", "dp"], "what to measure")
flags.DEFINE_list("prompts", ["64", "256", "1024", "4000"], "prompt lengths (part=prefill)")
flags.DEFINE_integer("max_model_len", 4096, "max_model_len (part=prefill)")
flags.DEFINE_integer("batch", 32, "requests decoding at once (part=dp)")
flags.DEFINE_integer("new_tokens", 32, "tokens per request (part=dp)")
flags.DEFINE_integer("reps", 3, "repetitions (best of)")
FLAGS = flags.FLAGS


def prefill_part():
    import numpy as np

    import checkpoints
    from model.flops import attention_flops
    from model.runtime import Runtime
    from serving import LLM, EngineConfig, SamplingParams
    from serving.config import DEFAULT_CHECKPOINT

    L = FLAGS.max_model_len
    model = checkpoints.load(DEFAULT_CHECKPOINT, dtype="float32")
    cfg = model.cfg
    ec = EngineConfig(page_size=16, num_pages=L // 16 + 2, max_model_len=L, prefill_buckets=(512,),
                      decode_buckets=(1,), decode_steps=1)
    rng = np.random.default_rng(0)
    lens = [int(x) for x in FLAGS.prompts]
    res = {}
    for mode in ("window", "blockwise"):
        with LLM(model=model, engine_config=ec, runtime=Runtime(prefill_attention=mode)) as llm:
            for n in lens:
                p = rng.integers(2, cfg.vocab_size, n).tolist()
                llm.generate([p], SamplingParams(max_tokens=1))           # warm the chunk path
                best = float("inf")
                for _ in range(FLAGS.reps):
                    t0 = time.perf_counter()
                    llm.generate([p], SamplingParams(max_tokens=1))
                    best = min(best, time.perf_counter() - t0)
                res[mode, n] = best
    print(f"shipped model, f32, chunk 512, max_model_len {L}; {os.cpu_count()} cores, jax {jax.__version__}")
    print(f"{'prompt':>7} {'window ms':>10} {'blockwise ms':>13} {'ratio':>6} {'attn GFLOP window':>18} "
          f"{'blockwise':>10}")
    for n in lens:
        chunks = [(s, min(512, n - s)) for s in range(0, n, 512)]
        f_win = sum(attention_flops(cfg, 512, L, absorbed=False) for _ in chunks) * cfg.num_hidden_layers
        f_blk = sum(attention_flops(cfg, 512, -(-(s + t) // 256) * 256, absorbed=False) for s, t in chunks) \
            * cfg.num_hidden_layers
        print(f"{n:7d} {res['window', n] * 1e3:10.1f} {res['blockwise', n] * 1e3:13.1f} "
              f"{res['window', n] / res['blockwise', n]:5.2f}x {f_win / 1e9:18.2f} {f_blk / 1e9:10.2f}")


def dp_part():
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np

    import checkpoints
    from serving import LLM, EngineConfig, SamplingParams
    from serving.config import DEFAULT_CHECKPOINT
    from sharding import DECODE_RULES

    model = checkpoints.load(DEFAULT_CHECKPOINT, dtype="float32")
    ec = EngineConfig(page_size=16, num_pages=64, max_model_len=256, prefill_buckets=(16, 64), decode_buckets=(32,),
                      decode_steps=8)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, model.cfg.vocab_size, 16).tolist() for _ in range(FLAGS.batch)]
    sp = SamplingParams(max_tokens=FLAGS.new_tokens, ignore_eos=True)
    print(f"shipped model, f32, {FLAGS.batch} requests x {FLAGS.new_tokens} tokens, 8 fake CPU devices on "
          f"{os.cpu_count()} cores, jax {jax.__version__}; num_pages=64 per pool")
    print(f"{'decode mesh / cache':>34} {'ranks':>6} {'KV tokens':>10} {'pages/device':>13} {'tok/s':>8}")
    for label, mesh, rules in (("ep=8, replicated cache", "ep=8", DECODE_RULES.replace(pages=None)),
                               ("dp=2 ranks (pages over dp), ep=4", "dp=2,ep=4", DECODE_RULES.replace(pages="dp")),
                               ("dp=4 ranks (pages over dp), ep=2", "dp=4,ep=2", DECODE_RULES.replace(pages="dp")),
                               ("ep=8, DP attention over all 8", "ep=8", DECODE_RULES)):
        with LLM(model=model, engine_config=ec, decode_mesh=mesh, decode_rules=rules) as llm:
            eng = llm.decode_engine
            llm.generate(prompts, sp)
            best = float("inf")
            for _ in range(FLAGS.reps):
                t0 = time.perf_counter()
                outs = llm.generate(prompts, sp)
                best = min(best, time.perf_counter() - t0)
            tok = sum(len(o.token_ids) for o in outs) / best
            per_dev = eng.cache.sharding.shard_shape(eng.cache.shape)[1]
            print(f"{label:>34} {eng.ranks:6d} {llm.scheduler.pages.allocator.total * ec.page_size:10d} {per_dev:13d} {tok:8.1f}",
                  flush=True)


def main(argv):
    del argv
    return prefill_part() if FLAGS.part == "prefill" else dp_part()


if __name__ == "__main__":
    app.run(main)
