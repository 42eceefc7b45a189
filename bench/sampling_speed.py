"""Decode throughput by sampling mode on the shipped model: greedy, temperature 1.0, temperature 1.0 + top_p 0.9.

    python -m bench.sampling_speed [--batch 16] [--new_tokens 64] [--runs 3]

`LLM` colocated (the platform's dtype), 32-token random prompts, decode bucket = batch, 4 steps per dispatch; best
of `--runs` generations after a warm-up. Plain temperature sampling is a softmax; top-k / top-p sort the vocabulary.
"""

from __future__ import annotations

import time

import numpy as np
from absl import app, flags

flags.DEFINE_integer("batch", 16, "prompts per generation (= the decode bucket)")
flags.DEFINE_integer("new_tokens", 64, "tokens generated per prompt")
flags.DEFINE_integer("runs", 3, "timed generations per mode (best taken)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from serving import LLM, EngineConfig, SamplingParams

    B, N = FLAGS.batch, FLAGS.new_tokens
    llm = LLM(engine_config=EngineConfig(page_size=16, num_pages=B * 8 + 2, max_model_len=256, decode_buckets=(B,),
                                         decode_steps=4))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(2, 4000, 32).tolist() for _ in range(B)]
    modes = {"greedy": SamplingParams(max_tokens=N, ignore_eos=True),
             "temperature 1.0": SamplingParams(max_tokens=N, temperature=1.0, seed=1, ignore_eos=True),
             "temperature 1.0, top_p 0.9": SamplingParams(max_tokens=N, temperature=1.0, top_p=0.9, seed=1,
                                                          ignore_eos=True)}
    for name, sp in modes.items():
        llm.generate(prompts, sp)
        best = float("inf")
        for _ in range(FLAGS.runs):
            t0 = time.perf_counter()
            llm.generate(prompts, sp)
            best = min(best, time.perf_counter() - t0)
        print(f"{name:>28}: {B * N / best:8.0f} tok/s", flush=True)
    llm.close()


if __name__ == "__main__":
    app.run(main)
