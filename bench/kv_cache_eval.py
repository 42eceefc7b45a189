"""Held-out perplexity through the serving cache layout: latents stored in the model's dtype vs the FP8 latent
cache (e4m3 codes + a per-token f32 scale), and the cache's bytes per token.

    python -m bench.kv_cache_eval [--checkpoint DIR] [--text FILE] [--max_tokens 8192] [--dtypes float32,bfloat16]

Windows of `--context` tokens of the held-out text (as `tools.evaluate`), each fed in chunks of `--chunk` tokens
through `PagedCache`: every chunk writes its latents into the pages first and then attends by reading them back,
so every attention read of the FP8 run sees quantized latents (its own chunk's too). Perplexity = exp(mean NLL) of
every token after the first of each window.
"""

from __future__ import annotations

import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

import checkpoints
from model.evaluate import encode, load_tokenizer
from serving.config import DEFAULT_CHECKPOINT
from model.paged_cache import FP8_SCALE_BYTES, PagedCache
from sharding.plan import kv_bytes_per_token

FLAGS = flags.FLAGS


def _define_flags():   # at run time only: tests import this module's functions next to other flag owners
    flags.DEFINE_string("checkpoint", None, "checkpoint (default: the shipped model)")
    flags.DEFINE_string("text", None, "held-out text (default: the checkpoint's heldout_sample.txt)")
    flags.DEFINE_integer("max_tokens", 8192, "tokens of the text to score")
    flags.DEFINE_integer("context", 128, "window length")
    flags.DEFINE_integer("chunk", 16, "tokens per forward (a prefill chunk)")
    flags.DEFINE_integer("page_size", 16, "cache page size")
    flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "model dtypes")


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5))
def _window_nll(graphdef, params, tokens_BW, chunk: int, page_size: int, fp8: bool):
    model = nnx.merge(graphdef, params)
    cfg = model.cfg
    B, W1 = tokens_BW.shape
    W = W1 - 1
    n_pages = -(-W // page_size)
    width = cfg.cache_width + (FP8_SCALE_BYTES if fp8 else 0)
    state = jnp.zeros((cfg.num_hidden_layers, 1 + B * n_pages, page_size, width),
                      jnp.uint8 if fp8 else model.dtype)
    pt = 1 + jnp.arange(B * n_pages, dtype=jnp.int32).reshape(B, n_pages)      # page 0 is scratch
    nll = jnp.zeros((), jnp.float32)
    for c in range(0, W, chunk):
        toks = tokens_BW[:, c:c + chunk]
        pos = jnp.broadcast_to(jnp.arange(c, c + toks.shape[1], dtype=jnp.int32), toks.shape)
        layout = PagedCache(pt, jnp.ones(toks.shape, bool))
        logits, _, state = model.forward(toks, pos, cache=layout, state=state)
        tgt = tokens_BW[:, c + 1:c + 1 + toks.shape[1]]
        lp = jax.nn.log_softmax(logits.astype(jnp.float32), -1)
        nll = nll - jnp.take_along_axis(lp, tgt[..., None], -1).sum()
    return nll


def perplexity(model, ids: np.ndarray, context: int, chunk: int, page_size: int, fp8: bool) -> float:
    graphdef, params = nnx.split(model)
    n = (len(ids) - 1) // context
    wins = np.stack([ids[i * context:(i + 1) * context + 1] for i in range(n)])
    total, count = 0.0, 0
    for i in range(0, n, 8):
        b = wins[i:i + 8]
        total += float(_window_nll(graphdef, params, jnp.asarray(b), chunk, page_size, fp8))
        count += b.shape[0] * context
    return float(np.exp(total / count)), count


def main(argv):
    del argv
    path = FLAGS.checkpoint or DEFAULT_CHECKPOINT
    text = FLAGS.text or os.path.join(path, "heldout_sample.txt")
    cfg = checkpoints.config_of(path)
    ids = encode(load_tokenizer(path), open(text, encoding="utf-8").read(), cfg.bos_token_id)[:FLAGS.max_tokens + 1]
    print(f"{path}: {len(ids)} tokens of {text}; windows {FLAGS.context}, chunks {FLAGS.chunk}, page "
          f"{FLAGS.page_size}; {os.cpu_count()} cores, jax {jax.__version__}")
    print(f"{'model dtype':>11} {'cache':>8} {'bytes/token':>12} {'ratio':>6} {'perplexity':>11} {'vs same-dtype cache':>20}")
    for name in FLAGS.dtypes:
        model = checkpoints.load(path, dtype=name)
        base = None
        for fp8 in (False, True):
            t0 = time.perf_counter()
            ppl, n = perplexity(model, ids, FLAGS.context, FLAGS.chunk, FLAGS.page_size, fp8)
            by = kv_bytes_per_token(cfg, "fp8" if fp8 else name)
            base = base or (ppl, by)
            print(f"{name:>11} {'fp8' if fp8 else name:>8} {by:12d} {by / base[1]:6.3f} {ppl:11.3f} "
                  f"{(ppl / base[0] - 1) * 100:+19.2f}%   ({n} tokens, {time.perf_counter() - t0:.0f}s)", flush=True)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
