"""Held-out evaluation of an HF-layout checkpoint: perplexity (f32 and bf16 compute) and the MTP head's t+2 accuracy.

    python -m tools.evaluate --checkpoint assets/shakespeare-moe --text assets/shakespeare-moe/heldout_sample.txt
    python -m tools.evaluate --checkpoint assets/shakespeare-moe --text FILE --max_tokens 20000 --context 128

The checkpoint is loaded through `checkpoints.load` (once per compute dtype) and the tokenizer from its
`tokenizer.json`; the metrics are `model.evaluate.evaluate`'s (see there).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax.numpy as jnp

import checkpoints
from model.evaluate import encode, evaluate, load_tokenizer


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", required=True, help="HF-layout checkpoint directory (with tokenizer.json)")
    ap.add_argument("--text", required=True, help="UTF-8 text file to evaluate on")
    ap.add_argument("--max_tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    ap.add_argument("--context", type=int, default=128, help="inputs per window")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward")
    ap.add_argument("--dtypes", default="float32,bfloat16", help="compute dtypes, comma-separated")
    ap.add_argument("--json", default="", help="also write the results to this JSON file")
    args = ap.parse_args(argv)

    cfg = json.load(open(os.path.join(args.checkpoint, "config.json")))
    tok = load_tokenizer(args.checkpoint)
    with open(args.text, encoding="utf-8") as f:
        ids = encode(tok, f.read(), cfg.get("bos_token_id"))
    if args.max_tokens:
        ids = ids[: args.max_tokens]
    print(f"checkpoint {args.checkpoint}; text {args.text}: {len(ids)} tokens; context {args.context}")
    results = {}
    for name in args.dtypes.split(","):
        t0 = time.time()
        model = checkpoints.load(args.checkpoint, dtype=getattr(jnp, name))
        r = evaluate(model, ids, args.context, args.batch)
        r["seconds"] = round(time.time() - t0, 2)
        results[name] = r
        mtp = "n/a" if r["mtp_top1_t+2"] is None else f"{r['mtp_top1_t+2']:.4f}"
        print(f"{name:>8}: perplexity {r['perplexity']:.3f} (nll {r['nll']:.4f}) over {r['tokens_scored']} tokens; "
              f"top-1 t+1 {r['top1_t+1']:.4f}; MTP top-1 t+2 {mtp} (unigram baseline "
              f"{r['unigram_top1_t+2']:.4f}); {r['seconds']}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
