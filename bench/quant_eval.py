"""The FP4-quantized model vs bf16: weight bytes, held-out perplexity, logits error, decode tok/s through serving.

    .venv/bin/python -m bench.quant_eval [--checkpoint assets/shakespeare-moe] [--text FILE] [--max_tokens 16384]
        [--quants nvfp4,mxfp4,nvfp4+dense,mxfp4+dense] [--decode_tokens 64] [--json out.json]

* weight bytes: the tensors each option quantizes, packed (codes + block scales + tensor scales) vs the same tensors
  in bf16; and the whole model's weights.
* perplexity: `model.evaluate.evaluate` (held-out text, windows of --context tokens), bf16 weights and compute as
  the baseline; the quantized models keep everything they do not quantize in bf16 and compute in bf16 (f32 too,
  for reference).
* logits error: max / mean |logits - bf16 logits| over the first --logit_windows windows, relative Frobenius error
  and top-1 agreement; the f32 model's distance to bf16 is printed as the yardstick.
* decode tok/s: `serving.LLM(model=...)` on this machine's first device, greedy, `ignore_eos`, batch 1 and 16
  (--batches), all models in the same run. tok/s = output tokens / wall time of `generate` (prefill included) and
  decode tok/s = batch / mean TPOT.
"""

from __future__ import annotations

import json
import os
import platform
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("checkpoint", "assets/shakespeare-moe", "HF checkpoint directory with tokenizer.json")
flags.DEFINE_string("text", "", "held-out text (default: CHECKPOINT/heldout_sample.txt)")
flags.DEFINE_integer("max_tokens", 16384, "score the first N held-out tokens (0: all)")
flags.DEFINE_integer("context", 128, "tokens per evaluation window")
flags.DEFINE_list("quants", ["nvfp4", "mxfp4", "nvfp4+dense", "mxfp4+dense"], "quantizations to evaluate")
flags.DEFINE_integer("logit_windows", 16, "windows used for the logits-error figures")
flags.DEFINE_list("batches", ["1", "16"], "decode batch sizes for tok/s")
flags.DEFINE_integer("decode_tokens", 64, "tokens generated per request in the tok/s runs")
flags.DEFINE_integer("prompt_tokens", 32, "prompt length in the tok/s runs (held-out text)")
flags.DEFINE_list("speed_quants", ["bf16", "nvfp4", "mxfp4"], "models timed for tok/s")
flags.DEFINE_string("json", "", "write all results to this JSON file")


def _nbytes(model) -> tuple[int, int, int, int]:
    """(packed bytes of quantized weights, bf16 bytes of those weights, bytes of all weights, their bf16 bytes)."""
    import numpy as np
    from flax import nnx

    from pallas_kernels.formats import QuantizedTensor

    q = q_bf16 = total = total_bf16 = 0
    for _, v in nnx.iter_graph(model):
        if not isinstance(v, nnx.Variable):
            continue
        val = v.get_value()
        if isinstance(val, QuantizedTensor):
            q += val.nbytes
            q_bf16 += 2 * int(np.prod(val.shape))
            total += val.nbytes
            total_bf16 += 2 * int(np.prod(val.shape))
        else:
            total += val.nbytes
            total_bf16 += 2 * val.size
    return q, q_bf16, total, total_bf16


def _logits(model, windows):
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    g, s = nnx.split(model)
    f = jax.jit(lambda s, t: nnx.merge(g, s)(t))
    return np.asarray(f(s, jnp.asarray(windows)), np.float32)


def _speed(model, prompt_ids, batches, n_prompt, n_new):
    from serving import LLM, EngineConfig, SamplingParams

    B = max(batches)
    max_len = -(-(n_prompt + n_new) // 16) * 16
    ec = EngineConfig(page_size=16, num_pages=B * (max_len // 16) + 8, max_model_len=max_len,
                      prefill_buckets=(32,),
                      decode_buckets=tuple(sorted(set(batches))), decode_steps=4)
    out = {}
    t0 = time.time()
    with LLM(model=model, engine_config=ec) as llm:
        compile_s = time.time() - t0
        sp = SamplingParams(max_tokens=n_new, temperature=0.0, ignore_eos=True)
        llm.generate([prompt_ids[:8]], SamplingParams(max_tokens=8, ignore_eos=True))  # warm-up
        for b in batches:
            prompts = [prompt_ids[i * 7:i * 7 + n_prompt] for i in range(b)]
            t = time.perf_counter()
            res = llm.generate(prompts, sp)
            wall = time.perf_counter() - t
            n = sum(len(r.token_ids) for r in res)
            tpot = [r.metrics.tpot_s for r in res if r.metrics.tpot_s]
            out[b] = dict(tok_s=n / wall, decode_tok_s=b / (sum(tpot) / len(tpot)), tokens=n, wall_s=wall,
                          text=res[0].text[:80])
    out["startup_s"] = compile_s
    return out


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np

    import checkpoints
    from model.evaluate import encode, evaluate, load_tokenizer

    ck = FLAGS.checkpoint
    text = FLAGS.text or os.path.join(ck, "heldout_sample.txt")
    cfg = json.load(open(os.path.join(ck, "config.json")))
    tok = load_tokenizer(ck)
    with open(text, encoding="utf-8") as f:
        ids = encode(tok, f.read(), cfg.get("bos_token_id"))
    if FLAGS.max_tokens:
        ids = ids[: FLAGS.max_tokens]
    C = FLAGS.context
    nwin = min(FLAGS.logit_windows, (len(ids) - 1) // C)
    windows = np.stack([ids[i * C:(i + 1) * C] for i in range(nwin)])
    print(f"# {ck}; held-out {text}: {len(ids)} tokens; jax {jax.__version__} on {jax.devices()[0].device_kind} "
          f"({platform.processor() or platform.machine()}, {os.cpu_count()} cpus)")

    results = {"checkpoint": ck, "text": text, "tokens": int(len(ids)), "context": C, "models": {}}
    models = {}
    names = ["f32", "bf16"] + list(FLAGS.quants)
    ref = None
    for name in names:
        t0 = time.time()
        if name == "f32":
            m = checkpoints.load(ck, dtype=jnp.float32)
        else:
            m = checkpoints.load(ck, dtype=jnp.bfloat16, quant=None if name == "bf16" else name)
        load_s = time.time() - t0
        r = evaluate(m, ids, C, 8)
        lg = _logits(m, windows)
        if name == "bf16":
            ref = lg
        q, q_bf16, total, total_bf16 = _nbytes(m)
        results["models"][name] = dict(perplexity=r["perplexity"], nll=r["nll"], top1=r["top1_t+1"],
                                       tokens_scored=r["tokens_scored"], load_s=load_s,
                                       quantized_bytes=q, quantized_bf16_bytes=q_bf16, weight_bytes=total,
                                       weight_bf16_bytes=total_bf16, logits=lg)
        models[name] = m
        print(f"{name:>12}: ppl {r['perplexity']:.4f} top-1 {r['top1_t+1']:.4f}; quantized tensors "
              f"{q / 1e6:.3f} MB vs {q_bf16 / 1e6:.3f} MB bf16; all weights {total / 1e6:.3f} MB "
              f"(bf16 {total_bf16 / 1e6:.3f} MB); load {load_s:.1f}s", flush=True)
    base = results["models"]["bf16"]["perplexity"]
    f32 = results["models"]["f32"]["logits"]
    for name in names:
        d = results["models"][name]
        lg = d.pop("logits")
        diff = np.abs(lg - ref)
        d["logits_rel_err_vs_f32"] = float(np.linalg.norm(lg - f32) / np.linalg.norm(f32))
        d.update(ppl_vs_bf16=d["perplexity"] / base - 1, logits_max_abs_err=float(diff.max()),
                 logits_mean_abs_err=float(diff.mean()),
                 logits_rel_err=float(np.linalg.norm(lg - ref) / np.linalg.norm(ref)),
                 top1_agree=float(np.mean(lg.argmax(-1) == ref.argmax(-1))), ref_logits_mean_abs=float(np.abs(
                     ref).mean()))
        print(f"{name:>12}: ppl {d['perplexity']:.4f} ({100 * d['ppl_vs_bf16']:+.2f}% vs bf16); logits vs bf16: max "
              f"{d['logits_max_abs_err']:.4f} mean {d['logits_mean_abs_err']:.4f} rel {d['logits_rel_err']:.4f}; "
              f"top-1 agreement {d['top1_agree']:.4f}; rel err vs f32 {d['logits_rel_err_vs_f32']:.4f}")

    batches = [int(b) for b in FLAGS.batches]
    prompt = ids[1: 1 + FLAGS.prompt_tokens + max(batches) * 7].tolist()  # request i starts 7 tokens after i-1
    results["speed"] = {}
    for name in FLAGS.speed_quants:
        if name not in models:
            continue
        s = _speed(models[name], prompt, batches, FLAGS.prompt_tokens, FLAGS.decode_tokens)
        results["speed"][name] = s
        print(f"{name:>12}: " + "; ".join(f"batch {b}: {s[b]['tok_s']:.1f} tok/s (decode {s[b]['decode_tok_s']:.1f})"
                                          for b in batches) + f"; engine start {s['startup_s']:.1f}s", flush=True)
    if FLAGS.json:
        with open(FLAGS.json, "w") as f:
            json.dump(results, f, indent=1, default=str)


if __name__ == "__main__":
    app.run(main)
