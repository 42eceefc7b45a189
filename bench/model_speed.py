"""Tandem's model vs `transformers` on the same checkpoint, measured in one run: full forward and greedy decoding.

python -m bench.model_speed [--checkpoint DIR] [--batch 1] [--prompt_len 64] [--new_tokens 32] [--repeats 5]

Without --checkpoint it uses the shipped model (assets/shakespeare-moe) when present, else a random tiny HF
checkpoint written to a temp dir. Compilation is excluded (one warm-up call each); medians are reported.
Needs the `test` extra (torch + transformers) for the reference side.
"""

from __future__ import annotations

import os
import tempfile

from absl import app, flags

from bench.timing import median_time as _median_time

_CKPT = flags.DEFINE_string("checkpoint", None, "HF DeepSeek-V3 checkpoint directory")
_BATCH = flags.DEFINE_integer("batch", 1, "batch size")
_PROMPT = flags.DEFINE_integer("prompt_len", 64, "prompt length (tokens)")
_NEW = flags.DEFINE_integer("new_tokens", 32, "tokens generated greedily")
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed repetitions (median reported)")

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shakespeare-moe")



def _tiny_hf_checkpoint(path):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from model import preset

    torch.manual_seed(0)
    d = preset("tiny").to_hf_dict()
    d.pop("architectures"), d.pop("model_type")
    DeepseekV3ForCausalLM(DeepseekV3Config(**d)).save_pretrained(path)
    return path


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import DeepseekV3ForCausalLM

    import checkpoints
    from model import greedy_generate

    path = _CKPT.value or (SHIPPED if os.path.isdir(SHIPPED) else _tiny_hf_checkpoint(tempfile.mkdtemp()))
    B, T, N, R = _BATCH.value, _PROMPT.value, _NEW.value, _REPEATS.value
    torch.set_num_threads(os.cpu_count() or 1)
    model = checkpoints.load(path, dtype=jnp.float32)
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (B, T)).astype(np.int32)

    graphdef, params = nnx.split(model)
    fwd = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    t_tandem_fwd = _median_time(lambda: fwd(params, jnp.asarray(ids)).block_until_ready(), R)
    with torch.no_grad():
        t_hf_fwd = _median_time(lambda: hf(torch.tensor(ids, dtype=torch.long)).logits, R)

    prompts = ids.tolist()
    t_tandem_gen = _median_time(lambda: greedy_generate(model, prompts, N), R)

    def hf_gen():
        with torch.no_grad():
            return hf.generate(torch.tensor(ids, dtype=torch.long), max_new_tokens=N, min_new_tokens=N,
                               do_sample=False, pad_token_id=0)
    t_hf_gen = _median_time(hf_gen, R)

    print(f"checkpoint: {path}\nmachine: {os.cpu_count()} CPU cores, jax {jax.__version__}, torch {torch.__version__}")
    print(f"batch={B} prompt_len={T} new_tokens={N} (median of {R}, compile excluded)")
    print(f"{'':28s}{'tandem':>12s}{'transformers':>14s}{'ratio':>8s}")
    print(f"{'full forward (ms)':28s}{t_tandem_fwd * 1e3:12.2f}{t_hf_fwd * 1e3:14.2f}{t_hf_fwd / t_tandem_fwd:7.2f}x")
    print(f"{'greedy generation (ms)':28s}{t_tandem_gen * 1e3:12.1f}{t_hf_gen * 1e3:14.1f}{t_hf_gen / t_tandem_gen:7.2f}x")
    print(f"{'generation tok/s':28s}{B * N / t_tandem_gen:12.1f}{B * N / t_hf_gen:14.1f}")


if __name__ == "__main__":
    app.run(main)
