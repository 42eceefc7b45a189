"""The shipped Shakespeare MoE checkpoint (assets/shakespeare-moe), loaded like any HF checkpoint.

Specification: the checkpoint loads through `checkpoints.load` and its config is the full DeepSeek-V3 architecture
the training tool declares; held-out perplexity on a slice of a held-out play (shipped as `heldout_sample.txt`) stays
under a bound set from the measured value with margin, in f32 and bf16 compute; greedy continuation of a
Shakespeare-style prompt is mostly words of the training text; the MTP head beats a unigram baseline on t+2.

Bounds: measured at release on heldout_sample.txt (2,078 scored tokens, context 128) — perplexity 47.40 (f32) /
47.38 (bf16), MTP t+2 top-1 0.300 vs unigram 0.118 (see assets/shakespeare-moe/README.md); the bounds leave ~15%
margin.
"""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

import checkpoints
from model import ModelConfig, greedy_generate
from model.evaluate import encode, evaluate, load_tokenizer

ASSET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "shakespeare-moe")
PPL_BOUND = {"float32": 55.0, "bfloat16": 55.0}   # measured 47.40 / 47.38
MTP_MIN = 0.25                                    # measured 0.300
PROMPT = "KING.\nGood morrow, my lord. What news from the court?\n\nLORD.\n"


@pytest.fixture(scope="session")
def model_f32():
    return checkpoints.load(ASSET, dtype=jnp.float32)


@pytest.fixture(scope="session")
def tok():
    return load_tokenizer(ASSET)


@pytest.fixture(scope="session")
def heldout_ids(tok):
    with open(os.path.join(ASSET, "heldout_sample.txt")) as f:
        return encode(tok, f.read(), 0)


@pytest.fixture(scope="session")
def eval_f32(model_f32, heldout_ids):
    return evaluate(model_f32, heldout_ids, context=128)


def test_files_and_size():
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "README.md",
              "heldout_sample.txt", "train_words.txt"):
        assert os.path.isfile(os.path.join(ASSET, f)), f
    assert os.path.getsize(os.path.join(ASSET, "model.safetensors")) <= 15 * 2**20


def test_config_is_the_full_architecture(model_f32, tok):
    cfg = model_f32.cfg
    assert cfg == ModelConfig.from_hf(ASSET)
    assert json.load(open(os.path.join(ASSET, "config.json")))["model_type"] == "deepseek_v3"
    assert cfg.q_lora_rank and cfg.first_k_dense_replace >= 1
    assert cfg.num_hidden_layers - cfg.first_k_dense_replace >= 3      # several MoE layers
    assert cfg.n_routed_experts >= 8 and 2 <= cfg.num_experts_per_tok <= 4
    assert cfg.n_shared_experts == 1 and cfg.n_group > 1
    assert cfg.num_nextn_predict_layers == 1 and len(model_f32.mtp) == 1
    assert not cfg.tie_word_embeddings
    assert 2048 <= cfg.vocab_size <= 4096 and tok.vocab_size == cfg.vocab_size
    assert tok.decode(tok.encode("To be, or not to be")) == "To be, or not to be"


def test_heldout_perplexity_f32(eval_f32):
    assert eval_f32["tokens_scored"] > 1000
    assert eval_f32["perplexity"] < PPL_BOUND["float32"], eval_f32


def test_heldout_perplexity_bf16(heldout_ids, eval_f32):
    r = evaluate(checkpoints.load(ASSET, dtype=jnp.bfloat16), heldout_ids, context=128)
    assert r["perplexity"] < PPL_BOUND["bfloat16"], r
    assert abs(np.log(r["perplexity"]) - np.log(eval_f32["perplexity"])) < 0.05  # bf16 close to f32


def test_mtp_beats_unigram(eval_f32):
    assert eval_f32["mtp_top1_t+2"] > MTP_MIN
    assert eval_f32["mtp_top1_t+2"] > 1.5 * eval_f32["unigram_top1_t+2"], eval_f32


def test_greedy_continuation_is_mostly_real_words(model_f32, tok):
    with open(os.path.join(ASSET, "train_words.txt")) as f:
        known = set(f.read().split())
    ids = [0] + tok.encode(PROMPT)
    out = greedy_generate(model_f32, [ids], 48)[0]
    text = tok.decode(out)
    words = re.findall(r"[a-z]+(?:'[a-z]+)*", text.lower())
    assert len(words) >= 10, text
    frac = sum(w in known for w in words) / len(words)
    assert frac >= 0.6, (frac, text)


def test_transformers_reads_the_same_model(model_f32):
    """The shipped directory is a real HF checkpoint: transformers' DeepseekV3ForCausalLM (which ignores the MTP
    layer) gives Tandem's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, model_f32.cfg.vocab_size, (2, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.asarray(model_f32(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)
