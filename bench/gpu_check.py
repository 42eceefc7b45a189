"""One command for a lent GPU (one H100 / H200, minutes): what Tandem's kernels and engine do on it.

    python -m bench.gpu_check --out runs/gpu_check.json            # on the GPU machine, <= ~8 minutes
    python -m bench.gpu_check --cpu_smoke --out /tmp/smoke.json    # the same code at tiny sizes on CPU (make test)

Parts, each guarded and timed (a failure or a missing prerequisite records the reason and the next part runs), the
JSON rewritten after every part so a cut-off run keeps what it measured:

- ``device``: platform, device kind, compute capability, memory, jax / jaxlib / triton / Python versions.
- ``kernels``: every quantized matmul kernel (block-FP8 and NVFP4 / MXFP4; dense and grouped) at DeepSeek-V3's
  shapes (7168 -> 2048, 32 local experts as on ep=8), decode and prefill row counts: max error against the XLA
  path (dequantize + dot), the kernel's time against XLA's and against a bf16 dot / ragged_dot on a bf16 copy of
  the weight, achieved TB/s (weight + activation bytes) and TFLOP/s.
- ``paged``: the paged MLA decode kernel against the gather path at batch 64 x 4k context, latent 512 + 64 rope,
  128 and 16 heads (tp=1 / tp=8), and its launch variants (heads per program x context splits).
- ``engine``: a DeepSeek-V3 slice at real dims with random weights made on the device
  (`checkpoints.random_weights`): 1 dense + as many 256-expert FP8 MoE layers as the memory plan fits in
  ``--weight_fraction`` of the card (+ the MTP layer), through `LLM` at Tandem's GPU defaults: prefill time at
  1k / 4k tokens, decode step time and tok/s at batch 1 / 16 / 64, MTP off and on (random weights: MTP's
  acceptance is not meaningful, its cost is).
- ``memory``: the memory plan's weight and KV bytes against the device's ``memory_stats()``.

``--cpu_smoke`` shrinks every size and runs the kernels in the Pallas interpreter, so the script is known to run
before a GPU is lent (tests/test_gpu_check.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import sys
import time
import traceback

from absl import app, flags

flags.DEFINE_string("out", "runs/gpu_check.json", "JSON results (rewritten after every part)")
flags.DEFINE_bool("cpu_smoke", False, "tiny sizes, kernels in the Pallas interpreter (CPU)")
flags.DEFINE_list("parts", ["device", "kernels", "paged", "engine", "memory"], "parts to run, in order")
flags.DEFINE_float("budget_s", 450.0, "skip the remaining parts once this many seconds have passed")
flags.DEFINE_integer("repeats", 10, "timed calls per kernel measurement (median)")
flags.DEFINE_integer("moe_layers", 0, "engine: MoE layers of the V3 slice (0: as many as the memory plan fits)")
flags.DEFINE_float("weight_fraction", 0.5, "engine: share of device memory the slice's weights may take")
flags.DEFINE_list("decode_batches", ["1", "16", "64"], "engine: decode batch sizes")
flags.DEFINE_list("prefill_lens", ["1024", "4096"], "engine: prompt lengths timed for prefill")
flags.DEFINE_integer("decode_tokens", 32, "engine: tokens generated per timed decode run")
flags.DEFINE_bool("mtp", True, "engine: also time decode with MTP on")
FLAGS = flags.FLAGS

_T0 = time.perf_counter()


class Skip(Exception):
    """A part cannot run here; the message says why."""


class Report:
    def __init__(self, path: str):
        self.path, self.data = path, {"argv": sys.argv[1:], "parts": {}}

    def write(self):
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, exist_ok=True)
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def part(self, name: str):
        rec = {"status": "running"}
        self.data["parts"][name] = rec
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            if time.perf_counter() - _T0 > FLAGS.budget_s:
                raise Skip(f"time budget of {FLAGS.budget_s:.0f}s spent")
            yield rec
            rec["status"] = "ok"
        except Skip as e:
            rec.update(status="skipped", reason=str(e))
        except Exception as e:   # record and go on: one broken part must not lose the others
            rec.update(status="failed", reason=f"{type(e).__name__}: {e}"[:2000],
                       traceback=traceback.format_exc()[-4000:])
        rec["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"   {name}: {rec['status']} in {rec['seconds']}s"
              + (f" ({rec['reason'][:300]})" if "reason" in rec else ""), flush=True)
        self.write()


def _say(rec: dict, key: str, value):
    rec[key] = value
    print(f"   {key}: {json.dumps(value, default=str)}", flush=True)


def _time(fn, repeats: int) -> float:
    """Median seconds of fn() (blocked on its result), after a warm-up call."""
    import jax

    jax.block_until_ready(fn())
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _kernel_impl() -> str:
    return "pallas_interpret" if FLAGS.cpu_smoke else "pallas"


# ---- device -----------------------------------------------------------------------------------------------------
def device_part(rec: dict):
    import jax
    import jaxlib

    d = jax.devices()[0]
    _say(rec, "platform", d.platform)
    _say(rec, "device_kind", d.device_kind)
    _say(rec, "device_count", jax.device_count())
    _say(rec, "compute_capability", getattr(d, "compute_capability", None))
    stats = d.memory_stats() or {}
    _say(rec, "memory_gb", round(stats.get("bytes_limit", 0) / 1e9, 2) or None)
    versions = {"python": platform.python_version(), "jax": jax.__version__, "jaxlib": jaxlib.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    _say(rec, "versions", versions)
    if not FLAGS.cpu_smoke and d.platform != "gpu":
        raise RuntimeError(f"expected a GPU, found platform {d.platform!r} (use --cpu_smoke on CPU)")


# ---- kernels ----------------------------------------------------------------------------------------------------
def _kernel_cases():
    """(name, M rows, K, N, experts or 0, format)."""
    if FLAGS.cpu_smoke:
        return [(f"{fmt}_{kind}_smoke", 24, 256, 128, e, fmt) for fmt in ("fp8", "nvfp4", "mxfp4")
                for kind, e in (("dense", 0), ("grouped", 4))]
    out = []
    for fmt in ("fp8", "nvfp4", "mxfp4"):
        for tag, m in (("decode", 64), ("prefill", 4096)):
            out.append((f"{fmt}_dense_{tag}", m, 7168, 2048, 0, fmt))
            out.append((f"{fmt}_grouped_{tag}", m * 8, 7168, 2048, 32, fmt))   # top-8 routed rows, ep=8
    return out


def kernels_part(rec: dict):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import fp8
    from pallas_kernels.formats import dequantize as fp4_dequantize
    from pallas_kernels.formats import quantize as fp4_quantize
    from pallas_kernels.fp4_matmul import fp4_grouped_matmul, fp4_matmul

    impl = _kernel_impl()
    reps = 1 if FLAGS.cpu_smoke else FLAGS.repeats
    results = rec.setdefault("cases", {})
    for name, M, K, N, E, fmt in _kernel_cases():
        if time.perf_counter() - _T0 > FLAGS.budget_s:
            results[name] = {"skipped": "time budget spent"}
            continue
        try:
            key = jax.random.key(hash(name) % 2**31)
            kw, kx = jax.random.split(key)
            wshape = (E, K, N) if E else (K, N)
            w32 = jax.random.normal(kw, wshape, jnp.float32) / np.sqrt(K)
            x = jax.random.normal(kx, (M, K), jnp.float32).astype(jnp.bfloat16)
            sizes = None
            if E:   # rows spread over the experts as routing would (uneven, a few empty)
                r = np.random.default_rng(0).zipf(1.5, M) % E
                sizes = jnp.asarray(np.bincount(r, minlength=E), jnp.int32)
            if fmt == "fp8":
                w = fp8.quantize(w32, lead=1 if E else 0)
                wb = fp8.dequantize(w, jnp.bfloat16)
                mm = (lambda i: (lambda: fp8.fp8_grouped_matmul(x, w, sizes, impl=i))) if E else \
                     (lambda i: (lambda: fp8.fp8_matmul(x, w, impl=i)))
            else:
                w = fp4_quantize(w32, fmt)
                wb = fp4_dequantize(w).astype(jnp.bfloat16)
                mm = (lambda i: (lambda: fp4_grouped_matmul(x, w, sizes, impl=i))) if E else \
                     (lambda i: (lambda: fp4_matmul(x, w, impl=i)))
            del w32
            if E:
                bf16 = jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s, preferred_element_type=jnp.float32))
                ref_dot = lambda: bf16(x, wb, sizes)
            else:
                bf16 = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
                ref_dot = lambda: bf16(x, wb)
            kern, xla = jax.jit(mm(impl)), jax.jit(mm("xla"))
            yk, yx = np.asarray(kern(), np.float32), np.asarray(xla(), np.float32)
            err = float(np.abs(yk - yx).max() / max(np.abs(yx).max(), 1e-30))
            t_k, t_x, t_b = _time(kern, reps), _time(xla, reps), _time(ref_dot, reps)
            wbytes = sum(a.nbytes for a in jax.tree.leaves(w))
            moved = wbytes + x.nbytes + M * N * 2
            flops = 2 * M * K * N
            r = {"rows": M, "K": K, "N": N, "experts": E, "rel_err_vs_xla": err,
                 "kernel_us": round(t_k * 1e6, 1), "xla_dequant_us": round(t_x * 1e6, 1),
                 "bf16_dot_us": round(t_b * 1e6, 1), "speedup_vs_xla": round(t_x / t_k, 2),
                 "vs_bf16": round(t_b / t_k, 2), "kernel_tb_s": round(moved / t_k / 1e12, 3),
                 "kernel_tflop_s": round(flops / t_k / 1e12, 2)}
        except Exception as e:
            r = {"failed": f"{type(e).__name__}: {e}"[:1000]}
        results[name] = r
        print(f"   {name}: {json.dumps(r)}", flush=True)
    bad = [n for n, r in results.items() if "failed" in r or r.get("rel_err_vs_xla", 0) > 2e-2]
    if bad:
        raise RuntimeError(f"kernels failed or disagree with XLA: {bad}")


# ---- paged decode -------------------------------------------------------------------------------------------------
def paged_part(rec: dict):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels.paged_attention import launch_params, paged_mla_decode

    if FLAGS.cpu_smoke:
        B, ctx, L, R, Z, heads, variants = 4, 64, 32, 16, 16, (4,), ((4, 1), (4, 2))
    else:
        B, ctx, L, R, Z, heads = 64, 4096, 512, 64, 64, (128, 16)
        variants = tuple((bh, s) for bh in (16, 32, 64) for s in (1, 2, 4, 8))
    impl = _kernel_impl()
    reps = 1 if FLAGS.cpu_smoke else FLAGS.repeats
    P = ctx // Z
    pages = B * P + 1
    key = jax.random.key(1)
    cache = jax.random.normal(key, (1, pages, Z, L + R), jnp.float32).astype(jnp.bfloat16)
    pt = jnp.asarray(1 + np.random.default_rng(0).permutation(B * P).reshape(B, P), jnp.int32)
    lengths = jnp.full((B,), ctx, jnp.int32)
    kv_bytes = B * ctx * (L + R) * 2
    for H in heads:
        kq, kr = jax.random.split(jax.random.fold_in(key, H))
        ql = jax.random.normal(kq, (B, H, L), jnp.float32).astype(jnp.bfloat16)
        qr = jax.random.normal(kr, (B, H, R), jnp.float32).astype(jnp.bfloat16)
        run = lambda i, **kw: jax.jit(lambda: paged_mla_decode(ql, qr, cache, 0, pt, lengths, 0.07, impl=i, **kw))
        ref = run("xla")
        yx = np.asarray(ref())
        r = {"batch": B, "context": ctx, "heads": H, "default_launch": launch_params(B, H, P)}
        kern = run(impl)
        r["rel_err_vs_gather"] = float(np.abs(np.asarray(kern()) - yx).max() / np.abs(yx).max())
        t_k, t_x = _time(kern, reps), _time(ref, reps)
        r.update(kernel_us=round(t_k * 1e6, 1), gather_us=round(t_x * 1e6, 1), speedup=round(t_x / t_k, 2),
                 kernel_tb_s=round(kv_bytes / t_k / 1e12, 3))
        r["variants_us"] = {}
        for bh, s in variants:
            if H % bh or time.perf_counter() - _T0 > FLAGS.budget_s:
                continue
            try:
                r["variants_us"][f"h{bh}_s{s}"] = round(_time(run(impl, block_h=bh, num_splits=s), reps) * 1e6, 1)
            except Exception as e:
                r["variants_us"][f"h{bh}_s{s}"] = f"{type(e).__name__}: {e}"[:300]
        _say(rec, f"heads_{H}", r)
        if r["rel_err_vs_gather"] > 2e-2:
            raise RuntimeError(f"paged kernel disagrees with the gather path at {H} heads: {r['rel_err_vs_gather']}")


# ---- engine (V3 slice) ---------------------------------------------------------------------------------------------
def _slice_config():
    from model.config import preset

    if FLAGS.cpu_smoke:
        return preset("tiny").replace(num_hidden_layers=2, first_k_dense_replace=1)
    import jax

    from checkpoints import abstract_model
    from sharding.plan import weight_bytes_per_device

    cfg = preset("deepseek-v3")
    if FLAGS.moe_layers:
        n = FLAGS.moe_layers
    else:
        mem = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
        if not mem:
            raise Skip("the device reports no memory limit; pass --moe_layers")
        sizes = [weight_bytes_per_device(abstract_model(cfg.replace(num_hidden_layers=k, first_k_dense_replace=1),
                                                        quant="fp8")) for k in (2, 3)]
        per_layer, base = sizes[1] - sizes[0], sizes[0] - (sizes[1] - sizes[0])
        n = int((FLAGS.weight_fraction * mem - base) // per_layer)
        if n < 1:
            raise Skip(f"one MoE layer ({per_layer / 1e9:.1f} GB) + the rest ({base / 1e9:.1f} GB) do not fit "
                       f"{FLAGS.weight_fraction:.0%} of {mem / 1e9:.0f} GB")
    return cfg.replace(num_hidden_layers=1 + n, first_k_dense_replace=1)


def _gen_seconds(llm, prompts, n_new: int) -> float:
    from serving import SamplingParams

    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=n_new, ignore_eos=True))
    return time.perf_counter() - t0


def engine_part(rec: dict, state: dict):
    import jax

    from checkpoints.random_weights import random_model
    from model.runtime import Runtime
    from serving import LLM, EngineConfig
    from sharding.plan import kv_bytes_per_token, weight_bytes_per_device

    cfg = _slice_config()
    smoke = FLAGS.cpu_smoke
    _say(rec, "layers", {"dense": cfg.first_k_dense_replace, "moe": cfg.num_hidden_layers - cfg.first_k_dense_replace,
                         "experts": cfg.n_routed_experts, "mtp": cfg.num_nextn_predict_layers})
    runtime = Runtime(matmul_impl="pallas_interpret", attention_impl="pallas_interpret") if smoke else None
    d = jax.devices()[0]
    before = (d.memory_stats() or {}).get("bytes_in_use")
    t0 = time.perf_counter()
    model = random_model(cfg, quant="fp8", fp8_linears=True, runtime=runtime,
                         dtype="float32" if smoke else "bfloat16")
    jax.block_until_ready(jax.tree.leaves(__import__("flax").nnx.state(model)))
    _say(rec, "weights_made_s", round(time.perf_counter() - t0, 1))
    state.update(cfg=cfg, weights_predicted=weight_bytes_per_device(model), before=before,
                 after_weights=(d.memory_stats() or {}).get("bytes_in_use"))
    prefill_lens = [int(x) for x in FLAGS.prefill_lens] if not smoke else [24, 40]
    batches = [int(x) for x in FLAGS.decode_batches] if not smoke else [1, 4]
    chunk = 1024 if not smoke else 16
    Z = 64 if not smoke else 16
    prompt_len = 128 if not smoke else 8
    max_len = -(-(max(prefill_lens) + FLAGS.decode_tokens + 8) // Z) * Z
    pages = max(batches) * -(-(prompt_len + FLAGS.decode_tokens + 8) // Z) + max_len // Z + 16
    ec = EngineConfig(page_size=Z, num_pages=pages, max_model_len=max_len, prefill_buckets=(chunk,),
                      prefill_rows=(1,), decode_buckets=tuple(batches), decode_windows=(max_len // Z,))
    state["kv_predicted"] = pages * kv_bytes_per_token(cfg) * Z
    for mtp in ([False, True] if FLAGS.mtp else [False]):
        tag = "mtp" if mtp else "plain"
        if time.perf_counter() - _T0 > FLAGS.budget_s:
            rec[tag] = "skipped: time budget spent"
            continue
        t1 = time.perf_counter()
        with LLM(model=model, engine_config=ec, mtp=mtp) as llm:
            eng = llm.decode_engine
            r = {"build_s": round(time.perf_counter() - t1, 1), "compile_s": round(eng.compile_seconds, 1),
                 "matmul_impl": eng.model.runtime.resolved_matmul_impl(),
                 "attention_impl": eng.model.runtime.resolved_attention_impl()}
            if not mtp:
                state["after_engine"] = (d.memory_stats() or {}).get("bytes_in_use")
                for n in prefill_lens:
                    prompt = [[1 + (i * 7) % (cfg.vocab_size - 2) for i in range(n)]]
                    _gen_seconds(llm, prompt, 1)
                    r[f"prefill_{n}_ms"] = round(min(_gen_seconds(llm, prompt, 1) for _ in range(2)) * 1e3, 1)
            for b in batches:
                prompts = [[1 + (i * 13 + j) % (cfg.vocab_size - 2) for i in range(prompt_len)] for j in range(b)]
                _gen_seconds(llm, prompts, FLAGS.decode_tokens)
                t_full = _gen_seconds(llm, prompts, FLAGS.decode_tokens + 1)
                t_first = _gen_seconds(llm, prompts, 1)
                dt = max(t_full - t_first, 1e-9)
                r[f"decode_b{b}"] = {"step_ms": round(dt / FLAGS.decode_tokens * 1e3, 2),
                                     "tok_s": round(b * FLAGS.decode_tokens / dt, 1)}
            state["peak"] = (d.memory_stats() or {}).get("peak_bytes_in_use")
        _say(rec, tag, r)


# ---- memory -------------------------------------------------------------------------------------------------------
def memory_part(rec: dict, state: dict):
    if "weights_predicted" not in state:
        raise Skip("needs the engine part's model")
    if state.get("before") is None:
        raise Skip("the device reports no memory_stats() (CPU)")
    w_meas = state["after_weights"] - state["before"]
    _say(rec, "weights_gb", {"predicted": round(state["weights_predicted"] / 1e9, 3),
                             "measured": round(w_meas / 1e9, 3),
                             "ratio": round(w_meas / max(state["weights_predicted"], 1), 3)})
    if state.get("after_engine") is not None:
        kv_meas = state["after_engine"] - state["after_weights"]
        _say(rec, "kv_pool_gb", {"predicted": round(state["kv_predicted"] / 1e9, 3),
                                 "measured_engine_alloc": round(kv_meas / 1e9, 3)})
    if state.get("peak") is not None:
        _say(rec, "peak_gb", round(state["peak"] / 1e9, 2))


def main(argv):
    del argv
    if FLAGS.cpu_smoke:
        import jax

        jax.config.update("jax_platforms", "cpu")
    rep = Report(FLAGS.out)
    state: dict = {}
    parts = {"device": device_part, "kernels": kernels_part, "paged": paged_part,
             "engine": lambda r: engine_part(r, state), "memory": lambda r: memory_part(r, state)}
    unknown = [p for p in FLAGS.parts if p not in parts]
    if unknown:
        raise app.UsageError(f"unknown parts {unknown}; known: {list(parts)}")
    for name in FLAGS.parts:
        with rep.part(name) as rec:
            parts[name](rec)
    rep.data["total_s"] = round(time.perf_counter() - _T0, 1)
    rep.write()
    status = {n: p["status"] for n, p in rep.data["parts"].items()}
    print(json.dumps({"out": FLAGS.out, "total_s": rep.data["total_s"], "parts": status}), flush=True)


if __name__ == "__main__":
    app.run(main)
