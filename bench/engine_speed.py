"""Serving benchmark, every comparison measured in the same run:

1. decode throughput at batch 1 and 16: Tandem's engine vs `transformers` `generate()` on the same checkpoint;
2. TTFT / TPOT of those runs;
3. mixed load — long prompts arriving while short requests decode: p99 TPOT/ITL disaggregated vs colocated;
4. achieved FLOP/s of the decode step vs this machine's matmul peak. FLOPs per step come from XLA's cost analysis
   of a *1-step* executable (XLA:CPU counts a `lax.scan` body once, so the multi-step dispatch executable reports
   one step whatever `decode_steps` is) and are cross-checked against the analytic count (`model.flops`);
   achieved = per-step FLOPs x steps per dispatch / measured dispatch time;
5. MTP speculation: tok/s with and without, and the acceptance rate on held-out text prompts (the shipped model's
   held-out play), greedy and T=0.8, counting only verify steps whose tokens were kept.

    python -m bench.engine_speed [--checkpoint DIR] [--new_tokens 64] [--skip_hf]
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import checkpoints
from serving.api import Tokenizer, output_of
from serving.config import DEFAULT_CHECKPOINT, EngineConfig, SchedulerConfig
from serving.engine import DecodeBatch
from bench.timing import median_time
from serving import flags as serving_flags
from serving.build import resolve_dtype
from serving.llm import LLM
from serving.sampling import SamplingParams, sampling_arrays

_NEW = flags.DEFINE_integer("new_tokens", 64, "tokens generated per request in the throughput runs")
_PROMPT = flags.DEFINE_integer("prompt_len", 16, "prompt tokens in the throughput runs")
_BATCHES = flags.DEFINE_list("batches", ["1", "16"], "batch sizes")
_SKIP_HF = flags.DEFINE_bool("skip_hf", False, "skip the transformers baseline")
_MIXED = flags.DEFINE_bool("mixed", True, "run the mixed-load disaggregated vs colocated comparison")
_LONG = flags.DEFINE_integer("long_prompt", 448, "prompt tokens of the long requests in the mixed load")
_MTP = flags.DEFINE_bool("compare_mtp", True, "compare decode with and without MTP speculation (needs an MTP layer)")
_MTP_TEXT = flags.DEFINE_string("mtp_text", None, "held-out text whose speeches (blank-line separated) give the MTP "
                                "prompts (default: the checkpoint's heldout_sample.txt; random tokens if none)")
_MTP_PROMPT_TOKENS = flags.DEFINE_integer("mtp_prompt_tokens", 24, "tokens per MTP prompt (a speech's start)")
serving_flags.define_engine_flags()   # the engine flags of every entry point (checkpoint, dtype, quant, KV, ...)
F = flags.FLAGS


def _pct(xs, q):
    return float(np.percentile(xs, q)) if xs else float("nan")


def matmul_peak_flops() -> float:
    """Best-of-5 f32 matmul FLOP/s of this machine (one jitted 1024^3 dot)."""
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    f = jax.jit(lambda x, y: x @ y)
    f(a, a).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def tandem_throughput(llm, prompts, new_tokens):
    sp = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    llm.generate(prompts, sp)  # warm caches / allocator paths
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    dt = time.perf_counter() - t0
    n = sum(len(o.token_ids) for o in outs)
    return n / dt, outs


def hf_throughput(hf, prompts, new_tokens):
    import torch

    ids = torch.tensor(prompts, dtype=torch.long)
    with torch.no_grad():
        hf.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
        t0 = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0)
        dt = time.perf_counter() - t0
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / dt


def mixed_load(llm, vocab, long_len, n_short=8, short_new=96, n_long=4):
    """Short requests decode; after they start, long prompts arrive one per scheduler step."""
    rng = np.random.default_rng(0)
    short = [rng.integers(2, vocab, 8).tolist() for _ in range(n_short)]
    long = [rng.integers(2, vocab, long_len).tolist() for _ in range(n_long)]
    sp_short = SamplingParams(max_tokens=short_new, ignore_eos=True)
    sp_long = SamplingParams(max_tokens=8, ignore_eos=True)
    reqs = [llm.submit(p, sp_short) for p in short]
    while not all(r.output_ids for r in reqs):
        llm.step()
    for p in long:
        llm.submit(p, sp_long)
        llm.step()
        llm.step()
    while llm.has_work():
        llm.step()

    outs = [output_of(r) for r in reqs]
    tpot = [o.metrics.tpot_s for o in outs if o.metrics.tpot_s]
    itl = [x for o in outs for x in o.metrics.itl_s]
    return tpot, itl


def heldout_prompts(tokenizer, path: str, n_tokens: int) -> list[list[int]]:
    """Distinct prompts from held-out text: the first `n_tokens` tokens of each speech (blank-line separated
    paragraphs of at least n_tokens tokens), in order."""
    text = open(path).read()
    out = []
    for para in (p.strip() for p in text.split("\n\n")):
        ids = tokenizer.encode(para) if para else []
        if len(ids) >= n_tokens and ids[:n_tokens] not in out:
            out.append(ids[:n_tokens])
    return out


def mtp_compare(model, batches, new_tokens, max_len, tokenizer, ckpt):
    """Decode tok/s with and without MTP speculation on the same distinct held-out prompts, greedy and T=0.8, and
    the acceptance rate (only verify steps whose tokens were kept count)."""

    text = _MTP_TEXT.value or os.path.join(ckpt, "heldout_sample.txt")
    if tokenizer is not None and os.path.exists(text):
        prompts, src = heldout_prompts(tokenizer, text, _MTP_PROMPT_TOKENS.value), text
    else:
        rng = np.random.default_rng(1)
        prompts = [rng.integers(2, model.cfg.vocab_size, _MTP_PROMPT_TOKENS.value).tolist() for _ in range(64)]
        src = "random tokens (no tokenizer or held-out text)"
    print(f"\nMTP speculative decoding (k=1), {new_tokens} new tokens per request; prompts: the first "
          f"{_MTP_PROMPT_TOKENS.value} tokens of distinct speeches of {src} ({len(prompts)} available)")
    print(f"{'batch':>5} {'sampling':>9} {'tok/s no MTP':>13} {'tok/s MTP':>10} {'speed-up':>9} {'acceptance':>11} "
          f"{'drafts':>7} {'same tokens':>12}")
    for B in batches:
        if B > len(prompts):
            print(f"{B:5d}   (skipped: only {len(prompts)} distinct prompts)")
            continue
        ps = prompts[:B]
        for name, sp in (("greedy", SamplingParams(max_tokens=new_tokens, ignore_eos=True)),
                         ("T=0.8", SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.8,
                                                  seed=7))):
            res = {}
            for mtp in (False, True):
                ec = EngineConfig(page_size=F.page_size, num_pages=F.num_pages or None, max_model_len=max_len,
                                  prefill_buckets=(16, 64, 128), decode_buckets=(B,),
                                  decode_steps=F.decode_steps, mtp=mtp)
                with LLM(model=model, engine_config=ec) as llm:
                    llm.generate(ps, sp)
                    t0 = time.perf_counter()
                    outs = llm.generate(ps, sp)
                    dt = time.perf_counter() - t0
                res[mtp] = (sum(len(o.token_ids) for o in outs) / dt, outs)
            prop = sum(o.metrics.spec_proposed for o in res[True][1])
            acc = sum(o.metrics.spec_accepted for o in res[True][1]) / max(prop, 1)
            same = [o.token_ids for o in res[True][1]] == [o.token_ids for o in res[False][1]]
            print(f"{B:5d} {name:>9} {res[False][0]:13.1f} {res[True][0]:10.1f} "
                  f"{res[True][0] / res[False][0]:8.2f}x {acc:10.1%} {prop:7d} {str(same):>12}")


def main(argv):
    del argv
    path = F.checkpoint or DEFAULT_CHECKPOINT
    model = checkpoints.load(path, dtype=resolve_dtype(F.dtype, None), quant=F.quant)
    tokenizer = Tokenizer.of_checkpoint(path)
    V = model.cfg.vocab_size
    batches = [int(b) for b in _BATCHES.value]
    N, T = _NEW.value, _PROMPT.value
    max_len = F.max_model_len or 512
    ec = EngineConfig(page_size=F.page_size, num_pages=F.num_pages or None, max_model_len=max_len, prefill_buckets=(16, 64, 128),
                      decode_buckets=tuple(sorted(set(batches) | {max(batches)})), decode_steps=F.decode_steps)
    print(f"checkpoint {path}; {os.cpu_count()} CPU cores, jax {jax.__version__}, devices {len(jax.devices())}")
    peak = matmul_peak_flops()
    print(f"matmul peak (f32 1024^3, measured now): {peak / 1e9:.1f} GFLOP/s")

    llm = LLM(model=model, engine_config=ec)
    rng = np.random.default_rng(0)
    hf = None
    if not _SKIP_HF.value:
        import torch
        from transformers import DeepseekV3ForCausalLM

        torch.set_num_threads(os.cpu_count() or 1)
        hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    print(f"\n{'batch':>5} {'tandem tok/s':>13} {'hf tok/s':>10} {'ratio':>7} {'TTFT p50 ms':>12} {'TPOT p50 ms':>12}"
          f" {'dispatch ms':>12} {'MFLOP/step useful':>18} {'XLA':>8} {'GFLOP/s useful':>15} {'XLA':>7}"
          f" {'of peak':>8} {'XLA':>6}")
    for B in batches:
        prompts = [rng.integers(2, V, T).tolist() for _ in range(B)]
        tok_s, outs = tandem_throughput(llm, prompts, N)
        hf_tok_s = hf_throughput(hf, prompts, N) if hf is not None else float("nan")
        ttft = [o.metrics.ttft_s for o in outs]
        tpot = [o.metrics.tpot_s for o in outs if o.metrics.tpot_s]
        # achieved FLOP/s of one decode dispatch at this bucket: per-step FLOPs (1-step executable) x steps / time
        eng = llm.decode_engine
        cost = eng.decode_cost(B, eng.window_for(np.full(B, T)))

        pages = llm.scheduler.pages.allocator.allocate(eng.pages_needed(T + N) * B)
        per = eng.pages_needed(T + N)
        batch = DecodeBatch(np.full(B, 3, np.int32), np.full(B, T, np.int32),
                            np.stack([eng.page_table(pages[i * per:(i + 1) * per]) for i in range(B)]),
                            sampling_arrays([None] * B, [0] * B))
        med = median_time(lambda: eng.generate(batch), 5)
        llm.scheduler.pages.allocator.release(pages)
        # useful = the analytic count (top-k experts only); XLA = what the compiled step executes per XLA's cost
        # analysis of a 1-step executable (XLA:CPU runs ragged_dot as a dot over every expert group)
        useful = cost["model_step_flops"] * cost["steps"] / med
        executed = cost["dispatch_flops"] / med
        print(f"{B:5d} {tok_s:13.1f} {hf_tok_s:10.1f} {tok_s / hf_tok_s:6.2f}x {_pct(ttft, 50) * 1e3:12.2f} "
              f"{_pct(tpot, 50) * 1e3:12.3f} {med * 1e3:12.2f} {cost['model_step_flops'] / 1e6:18.2f} "
              f"{cost['xla_step_flops'] / 1e6:8.2f} {useful / 1e9:15.2f} {executed / 1e9:7.2f} "
              f"{useful / peak:7.1%} {executed / peak:6.1%}")
    llm.close()

    if _MTP.value and model.cfg.num_nextn_predict_layers:
        mtp_compare(model, batches, N, max_len, tokenizer, path)

    if _MIXED.value:
        print(f"\nmixed load: 8 short requests decoding 96 tokens; 4 prompts of {_LONG.value} tokens arrive meanwhile")
        res = {}
        for mode, kw in (("colocated", {}), ("disagg", dict(prefill_mesh="tp=1", decode_mesh="ep=1"))):
            ecm = EngineConfig(page_size=F.page_size, num_pages=F.num_pages or None, max_model_len=max_len, prefill_buckets=(16, 64, 128),
                               decode_buckets=(4, 8, 16), decode_steps=F.decode_steps)
            # the online budget (256 prompt tokens per step), which this measurement is about
            with LLM(model=model, engine_config=ecm, mode=mode, scheduler_config=SchedulerConfig(), **kw) as m:
                mixed_load(m, V, _LONG.value)  # warm-up pass
                tpot, itl = mixed_load(m, V, _LONG.value)
            res[mode] = (tpot, itl)
            print(f"{mode:10s} TPOT p50 {_pct(tpot, 50) * 1e3:7.2f} ms  p99 {_pct(tpot, 99) * 1e3:7.2f} ms   "
                  f"ITL p50 {_pct(itl, 50) * 1e3:7.2f} ms  p99 {_pct(itl, 99) * 1e3:7.2f} ms")
        r_tpot = _pct(res["disagg"][0], 99) / _pct(res["colocated"][0], 99)
        r_itl = _pct(res["disagg"][1], 99) / _pct(res["colocated"][1], 99)
        print(f"disagg / colocated: p99 TPOT {r_tpot:.2f}x, p99 ITL {r_itl:.2f}x")


if __name__ == "__main__":
    app.run(main)
