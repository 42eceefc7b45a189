"""tools/train_tiny: one jitted training step on a micro config, and the whole tool end to end on a few KB of text.

Specification: training steps update every parameter with a finite loss (main + λ·MTP), the aux-loss-free bias
update moves every MoE layer's `e_score_correction_bias` (MTP block included) against the load, the dense expert
dispatch used for training computes the same function as the model's ragged one, and the tool is deterministic for
a seed and writes an HF checkpoint that `checkpoints.load` reads.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("optax")

from tools import train_tiny  # noqa: E402

WORDS = ("the king my lord good sweet love thou art thee what shall come night death heart speak hath "
         "doth noble friend away sir madam honour fair well day").split()


def _text(seed: int, n_words: int = 1500) -> str:
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(n_words // 10):
        lines.append(" ".join(rng.choice(WORDS, 10)).capitalize() + ".")
    return "\n".join(lines) + "\n"


# The one-step test uses the end-to-end test's shapes and settings, so the two share one compiled step.
VOCAB, SEQ, BATCH = 300, 16, 2
OPT = dict(steps=2, lr=1e-3, warmup=1, weight_decay=0.1)


def test_one_train_step_micro():
    cfg = train_tiny.micro_config(vocab_size=VOCAB, seq_len=SEQ)
    from model import DeepseekV3
    from model.runtime import Runtime

    model = DeepseekV3(cfg, rngs=nnx.Rngs(0), dtype=jnp.float32, runtime=Runtime(moe_impl="dense"))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt, _ = train_tiny.make_optimizer(**OPT)
    opt_state = opt.init(params)
    step = train_tiny.build_train_step(graphdef, opt, mtp_weight=0.3, gamma=1e-3)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (BATCH, SEQ + 2)), jnp.int32)
    p1, r1, opt_state_1, m = step(params, rest, opt_state, tokens)
    assert np.isfinite(float(m["loss"]))
    np.testing.assert_allclose(float(m["loss"]), float(m["main"]) + 0.3 * float(m["mtp"]), rtol=1e-5)
    moe_layers = (cfg.num_hidden_layers - cfg.first_k_dense_replace) + cfg.num_nextn_predict_layers
    loads = np.asarray(m["loads"])
    assert loads.shape == (moe_layers, cfg.n_routed_experts)
    assert (loads.sum(1) == BATCH * SEQ * cfg.num_experts_per_tok).all()  # every token copy counted once
    b0 = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(rest) if k[-1] == "e_score_correction_bias"}
    b1 = {k: np.asarray(v.get_value()) for k, v in nnx.to_flat_state(r1) if k[-1] == "e_score_correction_bias"}
    assert len(b1) == moe_layers and any(k[0] == "mtp" for k in b1)
    for k in b1:
        delta = b1[k] - b0[k]
        np.testing.assert_allclose(np.abs(delta[delta != 0]), 1e-3, rtol=1e-6)
    # Every bias moved against its expert's load: overloaded experts (above the mean) go down.
    for (k, d), row in zip(sorted(((k, b1[k] - b0[k]) for k in b1), key=lambda kv: str(kv[0])), loads):
        assert np.all(np.sign(d) == np.sign(row.mean() - row))
    # The schedule starts at lr 0 (linear warmup from 0), so the weights move from the second step on.
    p2, _, _, m2 = step(p1, r1, opt_state_1, tokens)
    assert np.isfinite(float(m2["loss"]))
    changed = [not np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))
               for (_, a), (_, b) in zip(nnx.to_flat_state(params), nnx.to_flat_state(p2))]
    assert all(changed)


def test_dense_experts_match_ragged():
    from model.moe import dense_experts, route, routed_experts

    cfg = train_tiny.micro_config(vocab_size=VOCAB, seq_len=SEQ)
    rng = np.random.default_rng(1)
    E, D, F, N = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, 40
    r = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
    x, gate, up, down = r(N, D), r(E, D, F) / np.sqrt(D), r(E, D, F) / np.sqrt(D), r(E, F, D) / np.sqrt(F)
    w, idx = route(r(N, E), 0.3 * r(E), cfg)
    np.testing.assert_allclose(np.asarray(dense_experts(x, w, idx, gate, up, down)),
                               np.asarray(routed_experts(x, w, idx, gate, up, down)), rtol=1e-5, atol=1e-5)


def test_tool_end_to_end_deterministic(tmp_path):
    import checkpoints

    plays = {f"play_{i}": _text(i) for i in range(3)}
    kw = dict(seed=3, batch=BATCH, seq_len=SEQ, mtp_weight=0.3, bias_gamma=1e-3, vocab_size=VOCAB, **OPT, config="micro", store_dtype="bfloat16", experts="dense",
              data_dir=str(tmp_path / "data"), log_every=1, eval_every=0, eval_tokens=0, plays=plays,
              log=lambda s: None)
    s1 = train_tiny.train(str(tmp_path / "a"), **kw)
    s2 = train_tiny.train(str(tmp_path / "b"), **kw)
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert open(tmp_path / "a" / f, "rb").read() == open(tmp_path / "b" / f, "rb").read(), f
    assert [h["loss"] for h in s1["history"]] == [h["loss"] for h in s2["history"]]
    model = checkpoints.load(tmp_path / "a")
    assert model.cfg.num_nextn_predict_layers == 1 and model.cfg.vocab_size == VOCAB
    gen = json.load(open(tmp_path / "a" / "generation_config.json"))
    assert gen["eos_token_id"] == 1
