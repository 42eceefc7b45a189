"""Small HF DeepSeek-V3 checkpoints built at test time with `transformers` (test extra), plus reference logits.

Weights are re-drawn at O(1) scale (HF's init is std 0.02, which makes every logit ~0 and routing trivial) and the
router correction bias is random, so biased expert *selection* differs from the unbiased *weights*.
"""

from __future__ import annotations

import json
import os

import numpy as np

BASE = dict(vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
            num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
            topk_group=1, kv_lora_rank=16, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=12,
            qk_nope_head_dim=8, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            max_position_embeddings=256, rope_interleave=True,
            rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 32,
                             "beta_fast": 32, "beta_slow": 1})

# Several shapes of the architecture; parity must hold on each.
CONFIGS = {
    "qlora_yarn_groups": {},
    "no_qlora_plain_rope": dict(q_lora_rank=None, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                                rope_interleave=False, norm_topk_prob=False, n_group=4, topk_group=2,
                                first_k_dense_replace=2, num_hidden_layers=4),
    "yarn_mscale_k3": dict(num_experts_per_tok=3, topk_group=2, n_group=4, n_routed_experts=16,
                           norm_topk_prob=False, n_shared_experts=2,
                           rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                                            "mscale": 0.707, "mscale_all_dim": 1.0,
                                            "original_max_position_embeddings": 16, "beta_fast": 32,
                                            "beta_slow": 1}),
}


def build(path: str, overrides: dict | None = None, seed: int = 0, with_mtp: bool = False):
    """Write an HF checkpoint to `path`; returns the torch model (eval mode) for reference outputs."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    kw = dict(BASE)
    kw.update(overrides or {})
    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**kw)
    model = DeepseekV3ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=g) / np.sqrt(fan_in))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
    model.save_pretrained(path)
    if with_mtp:
        add_mtp_layer(path, kw, seed + 2)
    return model


def add_mtp_layer(path: str, kw: dict, seed: int) -> dict[str, np.ndarray]:
    """Append a DeepSeek MTP layer (`model.layers.{N}.*`) to a single-file checkpoint; returns its tensors."""
    from checkpoints.safetensors_io import Checkpoint, write

    rng = np.random.default_rng(seed)
    N, D = kw["num_hidden_layers"], kw["hidden_size"]
    ck = Checkpoint(path)
    tensors = {k: np.array(v) for k, v in ck.items()}
    # The MTP block is a MoE decoder layer: copy the shapes of the last layer, with fresh values.
    last = f"model.layers.{N - 1}."
    mtp = {}
    for k, v in tensors.items():
        if k.startswith(last):
            new = f"model.layers.{N}." + k[len(last):]
            if k.endswith("norm.weight"):
                mtp[new] = (1.0 + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)
            elif k.endswith("e_score_correction_bias"):
                mtp[new] = (0.3 * rng.standard_normal(v.shape)).astype(np.float32)
            else:
                mtp[new] = (rng.standard_normal(v.shape) / np.sqrt(v.shape[-1])).astype(np.float32)
    p = f"model.layers.{N}."
    mtp[p + "enorm.weight"] = (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)
    mtp[p + "hnorm.weight"] = (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)
    mtp[p + "eh_proj.weight"] = (rng.standard_normal((D, 2 * D)) / np.sqrt(2 * D)).astype(np.float32)
    mtp[p + "shared_head.norm.weight"] = (1 + 0.2 * rng.standard_normal(D)).astype(np.float32)
    # DeepSeek's release also stores copies of the shared embedding and head in the MTP layer.
    mtp[p + "embed_tokens.weight"] = tensors["model.embed_tokens.weight"]
    mtp[p + "shared_head.head.weight"] = tensors["lm_head.weight"]
    tensors.update(mtp)
    del ck
    write(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        c = json.load(f)
    c["num_nextn_predict_layers"] = 1
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    return mtp


def reference_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf_model(torch.tensor(ids, dtype=torch.long)).logits.float().numpy()


def argmax_rollout(model, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Greedy continuation by the teacher-forced forward, no cache: the reference every cached path must equal.

    One fixed-shape buffer serves every step (causal attention: logits at t do not depend on the padding after
    t), so the forward compiles once.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, ids: nnx.merge(graphdef, p)(ids))
    buf = np.zeros((len(prompts), max(map(len, prompts)) + n_new), np.int32)
    lens = np.array([len(p) for p in prompts])
    for b, p in enumerate(prompts):
        buf[b, : len(p)] = p
    rows = np.arange(len(prompts))
    for step in range(n_new):
        logits = np.asarray(forward(params, jnp.asarray(buf)))
        buf[rows, lens + step] = logits[rows, lens + step - 1].argmax(-1)
    return [buf[b, lens[b]: lens[b] + n_new].tolist() for b in rows]


def quantize_block_fp8(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's reference `weight_quant`: per block, s = amax/448, store w/s in e4m3 and s as scale_inv."""
    import ml_dtypes

    out, inn = w.shape
    bo, bi = -(-out // block), -(-inn // block)
    pad = np.zeros((bo * block, bi * block), np.float32)
    pad[:out, :inn] = w
    blocks = pad.reshape(bo, block, bi, block)
    s = np.abs(blocks).max(axis=(1, 3)) / 448.0
    s = np.where(s == 0, 1.0, s).astype(np.float32)
    q = np.clip((blocks / s[:, None, :, None]).reshape(bo * block, bi * block)[:out, :inn], -448, 448)
    return q.astype(ml_dtypes.float8_e4m3fn), s


FP8_SOURCE = ("_proj.weight", "_proj_with_mqa.weight")   # DeepSeek's release: the decoder's linears are FP8


def to_block_fp8(src: str, dst: str, block: int = 128) -> int:
    """Copy checkpoint `src` to `dst` in DeepSeek's release format: every decoder-layer linear (attention
    projections, MLPs, shared and routed experts; not the router, embedding, head or eh_proj) as float8_e4m3 with
    `weight_scale_inv` per block x block; `quantization_config` as DeepSeek writes it. Returns the tensor count."""
    import shutil

    from checkpoints.safetensors_io import Checkpoint, write

    os.makedirs(dst, exist_ok=True)
    out, n = {}, 0
    for k, v in Checkpoint(src).items():
        v = np.array(v)
        if k.endswith(FP8_SOURCE) and not k.endswith("eh_proj.weight"):
            q, s = quantize_block_fp8(v.astype(np.float32), block)
            out[k], out[k[: -len("weight")] + "weight_scale_inv"] = q, s
            n += 1
        else:
            out[k] = v
    write(os.path.join(dst, "model.safetensors"), out, metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f:
        c = json.load(f)
    c["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [block, block]}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(c, f, indent=2)
    for fname in os.listdir(src):
        if fname not in ("config.json", "model.safetensors"):
            shutil.copy2(os.path.join(src, fname), os.path.join(dst, fname))
    return n


def write_tokenizer(path: str, vocab_size: int = 96) -> None:
    """A byte-level tokenizer.json for BASE's 96-token vocabulary: one token per printable ASCII character (id 0 is
    the space) and "<eos>" last, so tests over this checkpoint can use text (stop strings, structured output)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    assert vocab_size == 96, "one token per printable ASCII character + <eos>"
    vocab = {("\u0120" if i == 0 else chr(32 + i)): i for i in range(95)}
    vocab["<eos>"] = 95
    t = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.save(os.path.join(path, "tokenizer.json"))
