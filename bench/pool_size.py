"""Decode time against the KV pool's size at a fixed context: a decode step should cost what the live rows attend
over, not the pages the engine owns.

    python -m bench.pool_size [--dtypes float32,bfloat16] [--pages 256,1024,4096] [--bf16_pool]

The shipped model, one device, batch 8 at position 100 (window 16 pages = 256 positions), 4 decode steps per
dispatch; median of 15 dispatches per pool size. `--bf16_pool` stores a bf16 cache as bf16 instead of the uint16
bits the engine keeps on CPU (`serving.engine.cache_layout`): the before/after of that fix.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from absl import app, flags

from bench.timing import median_time

flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "weight (and cache) dtypes")
flags.DEFINE_list("pages", ["256", "1024", "4096"], "KV pages of the engine")
flags.DEFINE_bool("bf16_pool", False, "store a bf16 cache as bf16 on CPU (not as uint16 bits)")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import checkpoints
    from serving.config import DEFAULT_CHECKPOINT, EngineConfig
    import serving.engine
    from serving.engine import DecodeBatch, Engine
    from serving.sampling import sampling_arrays

    if FLAGS.bf16_pool:
        layout = serving.engine.cache_layout
        serving.engine.cache_layout = lambda cfg, model, platform="cuda": layout(cfg, model)
    B = 8
    print("| weights | " + " | ".join(f"{p} pages" for p in FLAGS.pages) + " |  (ms per 4-step dispatch)")
    for name in FLAGS.dtypes:
        model = checkpoints.load(DEFAULT_CHECKPOINT, dtype=jnp.dtype(name))
        cells = []
        for P in map(int, FLAGS.pages):
            ec = EngineConfig(page_size=16, num_pages=P, max_model_len=256, prefill_buckets=(16,), prefill_rows=(1,),
                              decode_buckets=(B,), decode_steps=4, decode_windows=(16,))
            eng = Engine(model, ec, roles={"decode"})
            pt = np.stack([np.arange(1 + 16 * i, 1 + 16 * (i + 1)) for i in range(B)]).astype(np.int32)
            batch = DecodeBatch(np.full(B, 3, np.int32), np.full(B, 100, np.int32), pt,
                                sampling_arrays([None] * B, [0] * B))
            cells.append(f"{median_time(lambda: eng.generate(batch), 15) * 1e3:.1f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    app.run(main)
