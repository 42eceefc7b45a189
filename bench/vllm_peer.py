"""The vLLM side of `bench.vs_vllm`'s offline part, run by vLLM's own interpreter (its venv pins its own torch):

    <vllm venv>/bin/python bench/vllm_peer.py '{"checkpoint": DIR, "max_model_len": 4096, "batches": [1, 16, 64],
                                                  "ttft_lens": [512, 2048], "vocab_size": 4096}'

Standalone on purpose (no Tandem import: that venv has no jax). It measures exactly what `bench.vs_vllm` measures
on Tandem — the same prompts (`prompt_ids`, duplicated below so both sides draw the same token ids) — and prints
one line `RESULT {json}`. vLLM runs at its defaults: bf16, inductor-compiled, prefix caching on (so warm-up and
timed calls use different prompts).
"""

import json
import random
import sys
import time

DECODE_PROMPT_LEN = 32
DECODE_NEW_TOKENS = 64
WARMUPS = 2          # vLLM's inductor-compiled steps still speed up over the first calls


def prompt_ids(n: int, length: int, seed: int, vocab_size: int) -> list[list[int]]:
    """n prompts of `length` token ids drawn from [2, vocab_size) (0/1 are the shipped model's BOS/EOS)."""
    rng = random.Random(seed)
    return [[rng.randrange(2, vocab_size) for _ in range(length)] for _ in range(n)]


def measure(run, a: dict) -> dict:
    """The offline measurements, the same on both sides: `run(prompts, max_tokens) -> (seconds, token lists)` is
    the engine's `generate`; `a` the bench's arguments (batches, ttft_lens, vocab_size)."""
    V = a["vocab_size"]
    res = {"decode_tok_s": {}, "ttft_s": {}, "tokens": {}}
    for B in a["batches"]:
        for w in range(WARMUPS):   # other prompts (prefix caching), same shapes
            run(prompt_ids(B, DECODE_PROMPT_LEN, 1000 * (w + 1) + B, V), DECODE_NEW_TOKENS)
        dt, toks = run(prompt_ids(B, DECODE_PROMPT_LEN, B, V), DECODE_NEW_TOKENS)
        res["decode_tok_s"][str(B)] = sum(map(len, toks)) / dt
        res["tokens"][str(B)] = toks[0][:16]
    for L in a["ttft_lens"]:
        for w in range(WARMUPS):
            run(prompt_ids(1, L, 2000 * (w + 1) + L, V), 1)
        dt, _ = run(prompt_ids(1, L, L, V), 1)
        res["ttft_s"][str(L)] = dt
    return res


def main() -> None:
    a = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams

    llm = LLM(model=a["checkpoint"], dtype="bfloat16", skip_tokenizer_init=True, max_model_len=a["max_model_len"],
              seed=0)

    def run(prompts, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
        return time.perf_counter() - t0, [list(o.outputs[0].token_ids) for o in outs]

    print("RESULT " + json.dumps(measure(run, a)), flush=True)


if __name__ == "__main__":   # vLLM spawns workers that re-import this file
    main()
