"""Per-op profile of Tandem's compiled decode step on XLA:CPU: where one step's time goes, op by op.

    python -m bench.step_profile --config latent-8e --dtype float32 --batch 1
    python -m bench.step_profile --checkpoint assets/shakespeare-moe --dtype bfloat16 --batch 16
    python -m bench.step_profile --config latent-32e --prefill_len 512     # one prompt's prefill instead

Runs `LLM.generate` (B 32-token prompts, --new_tokens greedy tokens, two warm-ups) under `jax.profiler.trace` with
XLA:CPU's per-thunk trace events on (`--xla_cpu_enable_xprof_traceme`), sums each thunk's time over the timed call,
divides by the decode steps run, and names each thunk from the compiled decode executable's HLO (opcode, shape,
for a fusion its fused computation's dots and root). Prints the top ops per step, time by op kind and the model's
total weight bytes (embeddings and idle experts included: an upper bound on what a step reads). Must start its own
process: XLA flags are read once.
"""

from __future__ import annotations

import collections
import glob
import os
import re
import tempfile
import time

from absl import app, flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    flags.DEFINE_string("config", "latent-8e", "a bench.vs_vllm config (checkpoint written under --workdir)")
    flags.DEFINE_string("checkpoint", None, "an HF checkpoint dir instead of --config")
    flags.DEFINE_string("workdir", "/tmp/tandem-vs-vllm", "bench.vs_vllm's checkpoints")
    flags.DEFINE_string("dtype", "float32", "weight dtype")
    flags.DEFINE_integer("batch", 1, "decode batch")
    flags.DEFINE_integer("new_tokens", 32, "greedy tokens per request in the profiled call")
    flags.DEFINE_integer("top", 25, "ops printed")
    flags.DEFINE_integer("prefill_len", 0, "> 0: profile the prefill of one prompt of this many tokens instead "
                         "(ops of the prefill executables, per call)")
    flags.DEFINE_string("moe_impl", None, "routed-expert implementation (model.moe.MOE_IMPLS; default: chosen per "
                        "shape)")


def hlo_ops(hlo_text: str) -> dict[str, str]:
    """instruction name -> a short description, from a compiled module's HLO text (names match the thunks')."""
    comps: dict[str, list[str]] = {}
    cur = None
    for line in hlo_text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            cur = m.group(1)
            comps[cur] = []
        elif cur is not None and line.strip():
            comps[cur].append(line.strip())
    desc = {}
    for body in comps.values():
        for ins in body:
            m = re.match(r"^(?:ROOT )?%?([\w.\-]+) = (\S+) (\w[\w\-]*)\(", ins)
            if not m:
                continue
            name, shape, op = m.groups()
            d = f"{op} {shape}"
            c = re.search(r"calls=%?([\w.\-]+)", ins)
            if op == "fusion" and c and c.group(1) in comps:
                inner = comps[c.group(1)]
                dots = [re.sub(r"^(?:ROOT )?%?[\w.\-]+ = ", "", i).split("(")[0] for i in inner
                        if re.search(r"= \S+ (dot|convolution)\(", i)]
                root = next((i for i in inner if i.startswith("ROOT")), "")
                rop = re.match(r"ROOT %?[\w.\-]+ = \S+ (\w[\w\-]*)", root)
                d += " [" + ", ".join(dots[:3]) + ("; " if dots else "") + f"root {rop.group(1) if rop else '?'}]"
            desc[name] = d
    return desc


def main(argv):
    del argv
    import jax
    from jax._src.profiler import ProfileData

    from bench import vs_vllm
    from bench.vllm_peer import DECODE_PROMPT_LEN, prompt_ids
    from serving import LLM, SamplingParams
    from serving.config import EngineConfig
    from model.runtime import Runtime

    ckpt = FLAGS.checkpoint or vs_vllm.prepare(FLAGS.config, FLAGS.workdir)
    info = vs_vllm.model_info(ckpt)
    llm = LLM(ckpt, engine_config=EngineConfig(max_model_len=min(info["max_pos"], 4096) // 16 * 16),
              dtype=FLAGS.dtype, runtime=Runtime(moe_impl=FLAGS.moe_impl) if FLAGS.moe_impl else None)
    B, N = FLAGS.batch, FLAGS.new_tokens
    P = FLAGS.prefill_len or DECODE_PROMPT_LEN
    if FLAGS.prefill_len:
        B, N = 1, 1
    sp = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    for w in range(2):
        llm.generate(prompt_ids(B, P, 1000 * (w + 1) + B, info["vocab_size"]), sp)
    prompts = prompt_ids(B, P, B, info["vocab_size"])
    d = tempfile.mkdtemp(prefix="step-profile-")
    with jax.profiler.trace(d):
        t0 = time.perf_counter()
        llm.generate(prompts, sp)
        wall = time.perf_counter() - t0
    eng = llm.decode_engine
    if FLAGS.prefill_len:   # the one-row executable that holds the prompt in one chunk; else every prefill one's
        eng = llm.prefill_engine or eng   # ops (op names repeat across executables: descriptions then approximate)
        whole = sorted(k for k in eng._prefill_exe if k[0] == 1 and k[1] >= P)
        key = whole[:1] or sorted(eng._prefill_exe)
        desc = {}
        for k in key:
            desc.update(hlo_ops(eng._prefill_exe[k].as_text()))
    else:
        exes = {k: v for k, v in eng._decode_exe.items() if k[0] >= B}
        key = min(exes)
        desc = hlo_ops(exes[key].as_text())
    pb = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)[0]
    tot: collections.Counter = collections.Counter()
    cnt: collections.Counter = collections.Counter()
    for plane in ProfileData.from_file(pb).planes:
        for line in plane.lines:
            for ev in line.events:
                if ev.name in desc:
                    tot[ev.name] += ev.duration_ns
                    cnt[ev.name] += 1
    steps = max(1, N - 1)   # the first token comes from prefill (a prefill profile: per call)
    per_step = sum(tot.values()) / 1e6 / steps
    wbytes = sum(x.nbytes for x in jax.tree.leaves(eng.params))
    if FLAGS.prefill_len:
        print(f"checkpoint {ckpt}, dtype {FLAGS.dtype}, one {P}-token prompt, prefill executables {key}; wall "
              f"{wall:.3f} s for the prefill and its first token; traced ops {per_step:.2f} ms (may exceed the wall: "
              f"quote shares); weights {wbytes / 2**20:.1f} MiB (embeddings included)")
    else:
        print(f"checkpoint {ckpt}, dtype {FLAGS.dtype}, batch {B}, decode executable {key}; wall {wall:.3f} s for "
              f"{steps} decode steps + prefill = {1e3 * wall / steps:.2f} ms/step; traced ops {per_step:.2f} "
              f"ms/step; weights {wbytes / 2**20:.1f} MiB (embeddings included)")
    unit = "ms" if FLAGS.prefill_len else "ms/step"
    print(f"{unit:>8} {'share':>6} {'calls/step' if not FLAGS.prefill_len else 'calls':>10}  op")
    for name, ns in tot.most_common(FLAGS.top):
        print(f"{ns / 1e6 / steps:8.3f} {ns / 1e6 / steps / per_step:6.1%} {cnt[name] / steps:10.1f}  "
              f"{name}: {desc[name][:150]}")
    by_kind: collections.Counter = collections.Counter()
    for name, ns in tot.items():
        k = desc[name].split(" ")[0]
        if "[dot" in desc[name] or k == "dot":
            k = "dot / dot fusion"
        by_kind[k] += ns
    print("by kind: " + ", ".join(f"{k} {v / 1e6 / steps:.2f} ms" for k, v in by_kind.most_common()))
    llm.close()


if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()
    define_flags()
    app.run(main)
