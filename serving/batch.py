"""Offline batch job: JSONL prompts in, JSONL completions out; resumable.

    python -m serving.batch --input prompts.jsonl --output out.jsonl [--checkpoint DIR]
        [--mode disagg|colocated] [--prefill_devices N --decode_devices M] [--flagfile FILE]

Input line: {"id": "q1", "prompt": "text" | "prompt_token_ids": [..], <SamplingParams fields>...}
(`id` defaults to "line-N"). Output line per input line: {"id", "text", "token_ids", "finish_reason",
"metrics"} or {"id", "line", "error"} for a malformed or invalid input. A rerun skips every id already in the
output (a torn last line from a kill is cut off first), so nothing is lost or duplicated. Ends with a summary
of TTFT / TPOT / ITL percentiles and throughput.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import app, flags, logging
from tqdm import tqdm

import checkpoints
from serving.api import output_of
from serving import flags as serving_flags
from serving.config import OFFLINE_PREFILL_BUDGET
from serving.sampling import SamplingParams

_INPUT = flags.DEFINE_string("input", None, "input JSONL file")
_OUTPUT = flags.DEFINE_string("output", None, "output JSONL file (appended to; existing ids are skipped)")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 64, "default max_tokens for lines that do not set it")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "default temperature for lines that do not set it")
serving_flags.define_engine_flags()
serving_flags.define_pool_flags()
_PRINT = flags.DEFINE_bool("print_outputs", False, "print each completion as it finishes")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "start the output file afresh instead of resuming")
_PROGRESS = flags.DEFINE_bool("progress", True, "show a progress bar")
_COUNTS = flags.DEFINE_string("expert_counts_out", None, "at the end, write the decode engine's routing counts per "
                              "MoE layer and expert as JSON {\"counts\": [[...]]} (`planner predict --expert_load`, "
                              "EPLB placements; local engines only)")


def read_done_ids(path: str) -> set[str]:
    """Ids already written to `path`; a torn last line (killed mid-write) is cut off."""
    if not os.path.exists(path):
        return set()
    with open(path, "rb") as f:
        data = f.read()
    keep = data.rfind(b"\n") + 1
    if keep != len(data):
        logging.warning("%s: dropping a torn last line (%d bytes) from an interrupted run", path, len(data) - keep)
        with open(path, "r+b") as f:
            f.truncate(keep)
    done = set()
    for line in data[:keep].splitlines():
        if line.strip():
            done.add(str(json.loads(line)["id"]))
    return done


@dataclasses.dataclass
class Item:
    line: int
    id: str
    prompt: object | None = None
    params: object | None = None
    error: str | None = None


def parse_line(n: int, raw: str, defaults: dict) -> Item:
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        return Item(n, f"line-{n}", error=f"line {n}: malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(d, dict):
        return Item(n, f"line-{n}", error=f"line {n}: expected a JSON object, got {type(d).__name__}")
    rid = str(d.pop("id", f"line-{n}"))
    if ("prompt" in d) == ("prompt_token_ids" in d):
        return Item(n, rid, error=f"line {n}: give exactly one of 'prompt' (text) or 'prompt_token_ids'")
    prompt = d.pop("prompt", None)
    if prompt is None:
        prompt = d.pop("prompt_token_ids")
    elif not isinstance(prompt, str):
        return Item(n, rid, error=f"line {n}: 'prompt' must be a string")
    sp = dict(defaults)
    sp.update(d.pop("sampling", {}) if isinstance(d.get("sampling"), dict) else {})
    sp.update(d)
    try:
        params = SamplingParams.from_dict(sp)
    except (ValueError, TypeError) as e:
        return Item(n, rid, error=f"line {n}: {e}")
    return Item(n, rid, prompt, params)


def _pct(xs, q):
    return float(np.percentile(xs, q)) if len(xs) else float("nan")


def summarize(outputs, duration: float, n_devices: int, n_decode_devices: int) -> str:
    ok = [o for o in outputs if o.finish_reason in ("stop", "length")]
    ttft = [o.metrics.ttft_s for o in ok if o.metrics.ttft_s is not None]
    tpot = [o.metrics.tpot_s for o in ok if o.metrics.tpot_s is not None]
    itl = [x for o in ok for x in o.metrics.itl_s]
    out_toks = sum(o.metrics.output_tokens for o in ok)
    in_toks = sum(o.metrics.prompt_tokens for o in ok)
    lines = [f"requests: {len(ok)} completed, {len(outputs) - len(ok)} failed/aborted; {duration:.2f} s",
             f"throughput: {out_toks / duration:.1f} output tok/s, {(in_toks + out_toks) / duration:.1f} total tok/s, "
             f"{(in_toks + out_toks) / duration / n_devices:.1f} tok/s/device ({n_devices} devices), "
             f"{out_toks / duration / n_decode_devices:.1f} output tok/s/decode-device"]
    proposed = sum(o.metrics.spec_proposed for o in ok)
    if proposed:
        lines.append(f"MTP acceptance: {sum(o.metrics.spec_accepted for o in ok) / proposed:.1%} of {proposed} "
                     "drafts")
    for name, xs in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl)):
        lines.append(f"{name:5s} ms: mean {np.mean(xs) * 1e3 if xs else float('nan'):8.2f}  "
                     f"p50 {_pct(xs, 50) * 1e3:8.2f}  p90 {_pct(xs, 90) * 1e3:8.2f}  p99 {_pct(xs, 99) * 1e3:8.2f}")
    return "\n".join(lines)


def run(argv_unused=None) -> int:
    if not _INPUT.value or not _OUTPUT.value:
        raise app.UsageError("--input and --output are required")
    if not os.path.exists(_INPUT.value):
        raise app.UsageError(f"--input {_INPUT.value} does not exist")
    ckpt = serving_flags.checkpoint()
    mcfg = None if (flags.FLAGS.router or flags.FLAGS.workers) else checkpoints.config_of(ckpt)
    if _COUNTS.value and mcfg is None:
        raise app.UsageError("--expert_counts_out reads the local engines' counts; behind a router each worker "
                             "keeps its own (its stats: `experts`)")
    if _OVERWRITE.value and os.path.exists(_OUTPUT.value):
        os.remove(_OUTPUT.value)
    os.makedirs(os.path.dirname(os.path.abspath(_OUTPUT.value)), exist_ok=True)
    done = read_done_ids(_OUTPUT.value)
    defaults = {"max_tokens": _MAX_TOKENS.value, "temperature": _TEMPERATURE.value}
    items, seen = [], set(done)
    with open(_INPUT.value) as f:
        for n, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            it = parse_line(n, raw, defaults)
            if it.id in done:
                continue
            if it.id in seen and it.error is None:
                it.error = f"line {n}: duplicate id {it.id!r}"
            seen.add(it.id)
            items.append(it)
    if done:
        print(f"resuming: {len(done)} ids already in {_OUTPUT.value}, {len(items)} to go", flush=True)

    F = flags.FLAGS
    if F.router or F.workers:   # the workers own the engines; only the in-flight window is sized here
        return _run_job(items, F.max_batch or 16, *_remote_llm())   # (the workers size their own batches)
    t0 = time.perf_counter()
    llm = serving_flags.llm(OFFLINE_PREFILL_BUDGET)
    pmesh, dmesh = serving_flags.pool_meshes(mcfg)
    n_dec = llm.decode_engine.mesh.devices.size
    n_dev = n_dec + (llm.prefill_engine.mesh.devices.size if pmesh else 0)
    print(f"model {ckpt}: {F.mode}, decode mesh {dmesh}" + (f", prefill mesh {pmesh}" if pmesh else "")
          + f"; weights {llm.decode_engine.model_dtype.name}; engines ready in {time.perf_counter() - t0:.1f}s",
          flush=True)
    return _run_job(items, llm.decode_engine.max_batch, llm, n_dev, n_dec)


def _remote_llm():
    """--router / --workers: a router client; device counts are the workers' (one line per worker)."""
    llm = serving_flags.llm(OFFLINE_PREFILL_BUDGET)   # the checkpoint's tokenizer (text prompts, stop strings)
    router, end = llm.backend.router, time.monotonic() + 60.0
    while True:   # an in-process router (--workers) learns who is alive from its first heartbeats (bounded)
        workers = {a: w for a, w in router.snapshot()["workers"].items() if w["alive"]}
        if workers or time.monotonic() > end:
            break
        time.sleep(0.1)
    n_dec = max(1, sum(w["role"] == "decode" for w in workers.values()))
    print(f"router {flags.FLAGS.router or flags.FLAGS.workers}: {len(workers)} live workers ({n_dec} decode)", flush=True)
    return llm, max(1, len(workers)), n_dec


def _run_job(items, max_batch: int, llm, n_dev, n_dec) -> int:
    progress = None
    if _PROGRESS.value:
        progress = tqdm(total=len(items), unit="req", file=sys.stderr, dynamic_ncols=True)
    outputs = []
    out = open(_OUTPUT.value, "a")

    def write(obj):
        out.write(json.dumps(obj) + "\n")
        out.flush()
        if progress is not None:
            progress.update(1)

    by_id = {}
    by_id_all = {it.id: it for it in items}
    t_start = time.perf_counter()
    pending = list(items)
    window = 4 * max_batch  # requests in flight at once: bounded memory for any input size
    try:
        while pending or llm.has_work():
            while pending and len(by_id) < window:
                it = pending.pop(0)
                if it.error is None:
                    try:
                        req = llm.make_request(it.prompt, it.params, request_id=it.id)
                        llm.add_request(req)
                        by_id[it.id] = it
                        continue
                    except ValueError as e:
                        it.error = f"line {it.line}: {e}"
                write({"id": it.id, "line": it.line, "error": it.error})
            for ev in llm.step():
                if ev.finished and ev.request.id in by_id:
                    o = output_of(ev.request)
                    outputs.append(o)
                    by_id.pop(o.request_id)
                    write(o.to_dict())
                    if _PRINT.value:
                        src = by_id_all[o.request_id].prompt
                        msg = f"{src!r} -> {o.text!r}" if llm.tokenizer else f"{src} -> {o.token_ids}"
                        (progress.write if progress else print)(f"[{o.request_id}] {msg} ({o.finish_reason})")
        # while the backend (a router) is up; remote workers report released pages with their next heartbeat
        end, pages = time.monotonic() + 2.0, llm.page_stats()
        while any(v.get("used", 0) or v.get("leased", 0) for v in pages.values()) and time.monotonic() < end:
            time.sleep(0.05)
            pages = llm.page_stats()
        caches = llm.prefix_cache_stats()
        if _COUNTS.value:   # (this thread drives the engine: a device read between steps)
            eng = llm.decode_engine
            with open(_COUNTS.value, "w") as f:
                json.dump({"engine": eng.name, "counts": eng.expert_stats.counts().tolist()}, f)
    finally:
        out.close()
        if progress is not None:
            progress.close()
        llm.close()
    duration = time.perf_counter() - t_start
    if outputs:
        print(summarize(outputs, duration, n_dev, n_dec), flush=True)
    print("KV pages after drain: " + ", ".join(f"{k}: {v['free']}/{v['total']} free, {v.get('cached', 0)} cached"
                                               for k, v in pages.items()))
    for name, st in caches.items():
        print(f"prefix cache ({name}): {st['hits_device']} device / {st.get('hits_host', 0)} host / "
              f"{st.get('hits_disk', 0)} disk block hits of {st.get('blocks_queried', 0)} looked up, "
              f"{st['evictions']} evictions, {st.get('corrupt', 0)} corrupt", flush=True)
    return 0


def main(argv):
    del argv
    return run()


if __name__ == "__main__":
    app.run(main)
