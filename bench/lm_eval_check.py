"""lm-evaluation-harness — the real one, its OpenAI-compatible `local-completions` model — against Tandem's server.

    make lm-eval      # .peers/lmeval (lm_eval[api]==0.4.13, its own venv), then this module

Writes two tasks on held-out Shakespeare lines (assets/shakespeare-moe/heldout_sample.txt, a play the shipped model
was not trained on; no dataset download): `tandem_ll` (loglikelihood of each next line given the line before) and
`tandem_gen` (generate-until a newline from the same contexts). Starts `python -m serving.server` (f32), runs
`lm_eval` against it (remote tokenizer: the server's /tokenize, /detokenize, /tokenizer_info; token-id prompts in
batches, `echo` + `logprobs` for loglikelihoods), then checks that lm-eval ran to the end and that every
loglikelihood it computed equals Tandem's own teacher-forced score (the model's forward over the same token ids,
no engine) within `--atol`, and every generation equals `LLM.generate`'s greedy text. Exit status 1 otherwise.
Results: runs/lm_eval_check.json and the table on stdout (docs/BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSET = os.path.join(ROOT, "assets", "shakespeare-moe")
LMEVAL_PYTHON = os.path.join(ROOT, ".peers", "lmeval", "bin", "python")


def heldout_pairs(n: int, path: str = os.path.join(ASSET, "heldout_sample.txt")) -> list[tuple[str, str]]:
    """`n` (context, continuation) pairs: two consecutive verse lines of one speech (speaker names, stage
    directions and short lines left out); the context ends with the newline, as the text has it."""
    lines = open(path).read().split("\n")
    pairs = []
    for a, b in zip(lines, lines[1:]):
        ok = [x.strip() and not x.strip().isupper() and not x.strip().startswith("[") and len(x.split()) >= 4
              for x in (a, b)]
        if all(ok):
            pairs.append((a + "\n", b))
        if len(pairs) == n:
            break
    return pairs


def encode_pair(encode, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of a pair into token ids (`TemplateAPI._encode_pair`, causal): trailing whitespace moves from
    the context to the continuation, the whole is encoded once and cut at the context's length."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def teacher_forced(model, seqs: list[tuple[list[int], int]]) -> list[float]:
    """Sum of log p(token | everything before) over each sequence's tokens after its first `ctxlen` — the model's
    own forward over the whole sequence (no cache, no engine), f32 log-softmax."""
    import jax
    import jax.numpy as jnp

    fwd = jax.jit(lambda t, p: model.forward(t, p)[0])
    out = []
    for ids, ctxlen in seqs:
        T = 1 << max(4, (len(ids) - 1).bit_length())   # padded to a power of two: few compiles
        x = np.zeros((1, T), np.int32)
        x[0, :len(ids)] = ids
        logits = np.asarray(fwd(jnp.asarray(x), jnp.arange(T, dtype=jnp.int32)[None]), np.float64)[0]
        lp = logits - logits.max(-1, keepdims=True)
        lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
        out.append(float(sum(lp[i - 1, ids[i]] for i in range(ctxlen, len(ids)))))
    return out


def write_tasks(d: str, pairs: list[tuple[str, str]], max_gen_toks: int) -> None:
    with open(os.path.join(d, "pairs.jsonl"), "w") as f:
        for c, x in pairs:
            f.write(json.dumps({"context": c, "continuation": x}) + "\n")
    common = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {os.path.join(d, 'pairs.jsonl')}\n"
              "test_split: test\ndoc_to_text: \"{{context}}\"\ndoc_to_target: \"{{continuation}}\"\n")
    with open(os.path.join(d, "tandem_ll.yaml"), "w") as f:
        f.write("task: tandem_ll\n" + common + "output_type: loglikelihood\nmetric_list:\n  - metric: acc\n")
    with open(os.path.join(d, "tandem_gen.yaml"), "w") as f:
        f.write("task: tandem_gen\n" + common + "output_type: generate_until\ngeneration_kwargs:\n  until: [\"\\n\"]\n"
                f"  max_gen_toks: {max_gen_toks}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


def start_server(port: int, timeout: float) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    p = subprocess.Popen([sys.executable, "-m", "serving.server", f"--port={port}", "--dtype=float32",
                          f"--checkpoint={ASSET}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    end = time.monotonic() + timeout
    import httpx
    while time.monotonic() < end:
        if p.poll() is not None:
            raise RuntimeError(f"server exited:\n{p.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                return p
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    p.kill()
    raise TimeoutError(f"server not ready in {timeout:.0f}s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lm_eval_python", default=LMEVAL_PYTHON, help="python of the venv holding lm_eval[api]")
    ap.add_argument("--pairs", type=int, default=24)
    ap.add_argument("--max_gen_toks", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=4, help="lm-eval's requests per HTTP call")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--atol", type=float, default=1e-3, help="|lm-eval loglikelihood - teacher forced| allowed")
    ap.add_argument("--timeout_s", type=float, default=1200.0, help="bound on the lm_eval run")
    ap.add_argument("--json", default=os.path.join(ROOT, "runs", "lm_eval_check.json"))
    a = ap.parse_args()

    import jax.numpy as jnp

    import checkpoints
    from model.tokenizer import Tokenizer
    from serving import LLM, SamplingParams

    pairs = heldout_pairs(a.pairs)
    tmp = tempfile.mkdtemp(prefix="tandem-lmeval-")
    write_tasks(tmp, pairs, a.max_gen_toks)
    srv = start_server(a.port, 600)
    try:
        t0 = time.perf_counter()
        cmd = [a.lm_eval_python, "-m", "lm_eval", "run", "--model", "local-completions", "--model_args",
               f"base_url=http://127.0.0.1:{a.port}/v1/completions,model=shakespeare-moe,tokenizer_backend=remote,"
               f"num_concurrent=1,max_retries=1,max_length=256", "--tasks", "tandem_ll,tandem_gen",
               "--include_path", tmp, "--batch_size", str(a.batch_size), "--output_path", os.path.join(tmp, "out"),
               "--log_samples"]
        env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", OPENAI_API_KEY="unused")
        r = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=a.timeout_s)
        lm_s = time.perf_counter() - t0
        if r.returncode != 0:
            print(r.stdout[-4000:], r.stderr[-4000:], sep="\n")
            raise SystemExit(f"lm_eval exited {r.returncode}")
    finally:
        srv.terminate()
        srv.wait(timeout=30)
    samples = {}
    for task in ("tandem_ll", "tandem_gen"):
        f = sorted(glob.glob(os.path.join(tmp, "out", "**", f"samples_{task}_*.jsonl"), recursive=True))
        if not f:
            raise SystemExit(f"lm_eval wrote no samples for {task} (under {tmp}/out)")
        samples[task] = sorted((json.loads(l) for l in open(f[-1])), key=lambda s: s["doc_id"])

    tok = Tokenizer.of_checkpoint(ASSET)
    enc = lambda s: tok.encode(s, add_special_tokens=False)   # what the server's /tokenize gives lm-eval
    seqs = []
    for c, x in pairs:
        ce, xe = encode_pair(enc, c, x)
        seqs.append((ce + xe, len(ce)))
    want_ll = teacher_forced(checkpoints.load(ASSET, dtype=jnp.float32), seqs)
    got_ll = [float(s["filtered_resps"][0][0]) if isinstance(s["filtered_resps"][0], list)
              else float(s["resps"][0][0][0]) for s in samples["tandem_ll"]]
    llm = LLM(ASSET, dtype=jnp.float32)
    want_gen = [o.text for o in llm.generate([enc(c) for c, _ in pairs],   # token ids, as lm-eval sends them
                                             SamplingParams(max_tokens=a.max_gen_toks, temperature=0, stop=["\n"]))]
    llm.close()
    got_gen = [s["filtered_resps"][0] if isinstance(s["filtered_resps"], list) else s["filtered_resps"]
               for s in samples["tandem_gen"]]
    err = np.abs(np.asarray(got_ll) - np.asarray(want_ll))
    same_gen = sum(g == w for g, w in zip(got_gen, want_gen))
    res = {"pairs": len(pairs), "lm_eval_s": round(lm_s, 1), "loglikelihood_max_abs_err": float(err.max()),
           "loglikelihood_mean": float(np.mean(got_ll)), "generations_equal": same_gen, "atol": a.atol,
           "lm_eval_cmd": " ".join(cmd[1:])}
    print(f"lm-eval {len(pairs)} loglikelihoods: max |lm-eval - teacher forced| = {err.max():.2e} (atol {a.atol}); "
          f"mean loglikelihood {np.mean(got_ll):.3f}; generate-until equal to LLM.generate: {same_gen}/{len(pairs)};"
          f" lm_eval ran {lm_s:.1f} s")
    os.makedirs(os.path.dirname(a.json), exist_ok=True)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    ok = len(got_ll) == len(pairs) and err.max() <= a.atol and same_gen == len(pairs)
    if not ok:
        for i in np.argsort(-err)[:5]:
            print("  ", repr(pairs[i][0][-40:]), repr(pairs[i][1][:40]), got_ll[i], want_ll[i])
        for g, w in zip(got_gen, want_gen):
            if g != w:
                print("  gen", repr(g), "!=", repr(w))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
