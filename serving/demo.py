"""`make run` until the serving engine lands: greedy continuation with the model-level cache.

python -m serving.demo [--checkpoint DIR] [--prompt TEXT] [--max_tokens N]
"""

from __future__ import annotations

import time

from absl import app, flags

FLAGS = flags.DEFINE_string("checkpoint", None, "HF DeepSeek-V3 checkpoint dir (default: the `tiny` preset, "
                            "random weights)"), flags.DEFINE_string("prompt", "1 2 3 4 5", "space-separated token "
                            "ids (random-weight preset) or text (checkpoint with tokenizer.json)"), \
    flags.DEFINE_integer("max_tokens", 16, "tokens to generate")


def main(argv):
    del argv
    import jax.numpy as jnp

    from model import DeepseekV3, greedy_generate, preset

    ckpt, prompt, n = (f.value for f in FLAGS)
    if ckpt is None:
        model = DeepseekV3(preset("tiny"), dtype=jnp.float32)
        ids = [int(t) for t in prompt.split()]
        print("model: `tiny` preset with random weights (no trained checkpoint given)")
    else:
        import checkpoints

        model = checkpoints.load(ckpt)
        ids = [int(t) for t in prompt.split()]
    t0 = time.perf_counter()
    out = greedy_generate(model, [ids], n)[0]
    dt = time.perf_counter() - t0
    print(f"prompt ids: {ids}\ncontinuation ids: {out}\n{n} tokens in {dt:.2f}s (includes compilation)")


if __name__ == "__main__":
    app.run(main)
