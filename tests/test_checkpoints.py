"""checkpoints.load on real HF layouts: sharded index, DeepSeek block-fp8, the MTP layer, and broken files.

Specification: every layout loads to the same logits; a broken checkpoint raises a `CheckpointError` whose message
names the offending tensor and file.
"""

import json
import os
import shutil

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import checkpoints
import hf_reference
from checkpoints import CheckpointError
from checkpoints.safetensors_io import Checkpoint, write

IDS = np.random.default_rng(7).integers(0, hf_reference.BASE["vocab_size"], (2, 20)).astype(np.int32)


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory):
    """A float32 checkpoint with an MTP layer, its torch reference and its tensors."""
    path = str(tmp_path_factory.mktemp("base"))
    hf = hf_reference.build(path, seed=3, with_mtp=True)
    return path, hf, {k: np.array(v) for k, v in Checkpoint(path).items()}


@pytest.fixture(scope="session")
def base_model(base_ckpt):
    return checkpoints.load(base_ckpt[0], dtype=jnp.float32)


def _variant(tmp_path, base_ckpt, tensors=None, config_patch=None, name="ckpt"):
    src, _, base = base_ckpt
    dst = tmp_path / name
    dst.mkdir()
    shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
    if config_patch:
        cfg = json.loads((dst / "config.json").read_text())
        cfg.update(config_patch)
        (dst / "config.json").write_text(json.dumps(cfg))
    write(str(dst / "model.safetensors"), base if tensors is None else tensors)
    return str(dst)


def test_loads_with_mtp_and_matches_reference(base_ckpt, base_model):
    _, hf, _ = base_ckpt
    assert base_model.cfg.num_nextn_predict_layers == 1
    err = np.abs(np.asarray(base_model(jnp.asarray(IDS))) - hf_reference.reference_logits(hf, IDS)).max()
    assert err <= 1e-4


def test_sharded_index_checkpoint_loads_identically(tmp_path, base_ckpt, base_model):
    src, _, tensors = base_ckpt
    dst = tmp_path / "sharded"
    dst.mkdir()
    shutil.copy(os.path.join(src, "config.json"), dst / "config.json")
    names = sorted(tensors)
    weight_map = {}
    for i in range(3):  # three shard files, tensors spread round-robin
        fname = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {k: tensors[k] for k in names[i::3]}
        write(str(dst / fname), part)
        weight_map.update({k: fname for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    m = checkpoints.load(str(dst), dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(m(jnp.asarray(IDS))), np.asarray(base_model(jnp.asarray(IDS))))


def _quantize_block_fp8(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """DeepSeek's reference `weight_quant`: per block, s = amax/448, store w/s in e4m3 and s as scale_inv."""
    out, inn = w.shape
    bo, bi = -(-out // block), -(-inn // block)
    pad = np.zeros((bo * block, bi * block), np.float32)
    pad[:out, :inn] = w
    blocks = pad.reshape(bo, block, bi, block)
    s = np.abs(blocks).max(axis=(1, 3)) / 448.0
    s = np.where(s == 0, 1.0, s).astype(np.float32)
    q = (blocks / s[:, None, :, None]).reshape(bo * block, bi * block)[:out, :inn]
    return q.astype(ml_dtypes.float8_e4m3fn), s


@pytest.mark.parametrize("block", [128, 8])
def test_block_fp8_checkpoint_loads_and_matches_dequantized(tmp_path, base_ckpt, block):
    _, _, base = base_ckpt
    fp8, deq = dict(base), dict(base)
    n_quant = 0
    for k, v in base.items():
        # As in DeepSeek's release: the projections are fp8; embeddings, head, norms and router stay high-precision.
        if k.endswith("_proj.weight") or k.endswith("_proj_with_mqa.weight"):
            q, s = _quantize_block_fp8(v, block)
            fp8[k], fp8[k[: -len("weight")] + "weight_scale_inv"] = q, s
            deq[k] = checkpoints.dequantize_block_fp8(q, s, (block, block), k)
            n_quant += 1
    assert n_quant > 20
    qcfg = {"quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                    "weight_block_size": [block, block]}}
    m8 = checkpoints.load(_variant(tmp_path, base_ckpt, fp8, qcfg, "fp8"), dtype=jnp.float32)
    mref = checkpoints.load(_variant(tmp_path, base_ckpt, deq, None, "deq"), dtype=jnp.float32)
    np.testing.assert_array_equal(np.asarray(m8(jnp.asarray(IDS))), np.asarray(mref(jnp.asarray(IDS))))
    # and the quantization really happened: fp8 logits differ from the float32 original, but stay close
    ref = np.asarray(checkpoints.load(base_ckpt[0])(jnp.asarray(IDS)))
    out = np.asarray(m8(jnp.asarray(IDS)))
    assert np.abs(out - ref).max() > 0 and np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.9


def test_bf16_checkpoint_loads_as_bf16(tmp_path, base_ckpt, base_model):
    _, _, base = base_ckpt
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in base.items()}
    path = _variant(tmp_path, base_ckpt, bf, None, "bf16")
    # the weight dtype follows the target platform unless asked for: f32 on this CPU, bf16 when asked
    assert checkpoints.load(path).embed_tokens[...].dtype == jnp.float32
    m = checkpoints.load(path, dtype=jnp.bfloat16)
    assert m.embed_tokens[...].dtype == jnp.bfloat16
    assert m.layers[1].mlp.gate[...].dtype == jnp.float32  # router stays float32
    out = np.asarray(m(jnp.asarray(IDS)))
    ref = np.asarray(base_model(jnp.asarray(IDS)))
    assert out.dtype == np.float32
    assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.98


def test_missing_tensor_is_named(tmp_path, base_ckpt):
    t = dict(base_ckpt[2])
    del t["model.layers.1.self_attn.kv_b_proj.weight"]
    with pytest.raises(CheckpointError, match=r"missing .*model\.layers\.1\.self_attn\.kv_b_proj\.weight"):
        checkpoints.load(_variant(tmp_path, base_ckpt, t))


def test_wrong_shape_is_named_with_file(tmp_path, base_ckpt):
    t = dict(base_ckpt[2])
    t["model.layers.0.mlp.up_proj.weight"] = np.zeros((7, 5), np.float32)
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.up_proj\.weight.*model\.safetensors.*shape"):
        checkpoints.load(_variant(tmp_path, base_ckpt, t))


def test_unexpected_tensor_is_named(tmp_path, base_ckpt):
    t = dict(base_ckpt[2])
    t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros(4, np.float32)
    with pytest.raises(CheckpointError, match=r"unexpected .*rotary_emb\.inv_freq"):
        checkpoints.load(_variant(tmp_path, base_ckpt, t))


def test_non_float_weight_is_rejected(tmp_path, base_ckpt):
    t = dict(base_ckpt[2])
    t["model.norm.weight"] = np.zeros(t["model.norm.weight"].shape, np.int32)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*dtype I32"):
        checkpoints.load(_variant(tmp_path, base_ckpt, t))


def test_unknown_dtype_in_header_is_named(tmp_path, base_ckpt):
    path = _variant(tmp_path, base_ckpt)
    f = os.path.join(path, "model.safetensors")
    raw = bytearray(open(f, "rb").read())
    n = int.from_bytes(raw[:8], "little")
    header = raw[8: 8 + n].decode()
    i = header.index('"model.norm.weight"')
    j = header.index('"F32"', i)
    raw[8 + j: 8 + j + 5] = b'"C64"'  # same length: offsets stay valid
    open(f, "wb").write(bytes(raw))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*unsupported dtype 'C64'"):
        checkpoints.load(path)


def test_truncated_file_is_reported(tmp_path, base_ckpt):
    path = _variant(tmp_path, base_ckpt)
    f = os.path.join(path, "model.safetensors")
    size = os.path.getsize(f)
    with open(f, "r+b") as fh:
        fh.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"truncated"):
        checkpoints.load(path)
    with open(f, "r+b") as fh:
        fh.truncate(4)
    with pytest.raises(CheckpointError, match=r"truncated"):
        checkpoints.load(path)


def test_mismatched_config_is_reported(tmp_path, base_ckpt):
    with pytest.raises(CheckpointError, match=r"shape"):
        checkpoints.load(_variant(tmp_path, base_ckpt, None, {"kv_lora_rank": 12}))
    with pytest.raises(ValueError, match=r"model_type"):
        checkpoints.load(_variant(tmp_path, base_ckpt, None, {"model_type": "llama"}, "llama"))


# ---- MTP against a plain numpy implementation of the published formula -----------------------------------------

def _np_rms(x, w, eps):
    return w * (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps))


def _np_rope(x, pos, cfg):
    from model.rope import inv_freq_and_attention_factor

    inv, att = inv_freq_and_attention_factor(cfg)
    ang = pos[:, None].astype(np.float64) * inv[None, :]
    cos, sin = np.cos(ang) * att, np.sin(ang) * att
    if cfg.rope_interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = np.split(x, 2, axis=-1)
    if x.ndim == 3:
        cos, sin = cos[:, None], sin[:, None]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _np_decoder_block(x, t, cfg, p):
    """One DeepSeek-V3 MoE decoder block over a single sequence x [T, D], straight from the formulas."""
    T, D = x.shape
    H, K, R, V, L = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim,
                     cfg.kv_lora_rank)
    a = "self_attn."
    pos = np.arange(T)
    h = _np_rms(x, p["input_layernorm.weight"], cfg.rms_norm_eps)
    q = _np_rms(h @ p[a + "q_a_proj.weight"].T, p[a + "q_a_layernorm.weight"], 1e-6) @ p[a + "q_b_proj.weight"].T
    q = q.reshape(T, H, K + R)
    q_nope, q_rope = q[..., :K], _np_rope(q[..., K:], pos, cfg)
    ckv = h @ p[a + "kv_a_proj_with_mqa.weight"].T
    c = _np_rms(ckv[:, :L], p[a + "kv_a_layernorm.weight"], 1e-6)
    k_rope = _np_rope(ckv[:, L:], pos, cfg)
    kv = (c @ p[a + "kv_b_proj.weight"].T).reshape(T, H, K + V)
    k = np.concatenate([kv[..., :K], np.broadcast_to(k_rope[:, None], (T, H, R))], -1)
    v = kv[..., K:]
    qf = np.concatenate([q_nope, q_rope], -1)
    s = np.einsum("thd,shd->hts", qf, k) * cfg.softmax_scale
    s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("hts,shv->thv", s, v).reshape(T, H * V) @ p[a + "o_proj.weight"].T
    x = x + o
    h = _np_rms(x, p["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    # MoE: biased selection within the best groups, unbiased weights, shared expert always on.
    silu = lambda z: z / (1 + np.exp(-z))
    ffn = lambda z, g, u, d: (silu(z @ g.T) * (z @ u.T)) @ d.T
    E, G = cfg.n_routed_experts, cfg.n_group
    out = np.zeros_like(h)
    for i in range(T):
        sc = 1 / (1 + np.exp(-(p["mlp.gate.weight"] @ h[i])))
        ch = sc + p["mlp.gate.e_score_correction_bias"]
        gs = np.array([np.sort(ch[g * (E // G):(g + 1) * (E // G)])[-2:].sum() for g in range(G)])
        keep = np.argsort(-gs)[: cfg.topk_group]
        masked = np.full(E, -np.inf)
        for g in keep:
            masked[g * (E // G):(g + 1) * (E // G)] = ch[g * (E // G):(g + 1) * (E // G)]
        top = np.argsort(-masked)[: cfg.num_experts_per_tok]
        w = sc[top] / (sc[top].sum() if cfg.norm_topk_prob else 1.0) * cfg.routed_scaling_factor
        for e, we in zip(top, w):
            m = f"mlp.experts.{e}."
            out[i] += we * ffn(h[i], p[m + "gate_proj.weight"], p[m + "up_proj.weight"], p[m + "down_proj.weight"])
        m = "mlp.shared_experts."
        out[i] += ffn(h[i], p[m + "gate_proj.weight"], p[m + "up_proj.weight"], p[m + "down_proj.weight"])
    return x + out


def test_mtp_matches_numpy_formula(base_ckpt, base_model):
    _, _, tensors = base_ckpt
    cfg = base_model.cfg
    N = cfg.num_hidden_layers
    pre = f"model.layers.{N}."
    p = {k[len(pre):]: v.astype(np.float64) for k, v in tensors.items() if k.startswith(pre)}
    ids = IDS[0]
    T = len(ids) - 1
    # Main model hidden state h_t (after the final norm) and the MTP prediction of token t+2 from (h_t, tok_{t+1}).
    _, hidden, _ = base_model.forward(jnp.asarray(ids[None, :T]), jnp.arange(T)[None])
    logits, _, _ = base_model.mtp_forward(hidden, jnp.asarray(ids[None, 1:T + 1]), jnp.arange(T)[None])
    h = np.asarray(hidden[0], np.float64)
    emb = tensors["model.embed_tokens.weight"].astype(np.float64)[ids[1:T + 1]]
    x = np.concatenate([_np_rms(emb, p["enorm.weight"], cfg.rms_norm_eps), _np_rms(h, p["hnorm.weight"],
                                                                                   cfg.rms_norm_eps)], -1)
    x = x @ p["eh_proj.weight"].T
    x = _np_decoder_block(x, T, cfg, p)
    ref = _np_rms(x, p["shared_head.norm.weight"], cfg.rms_norm_eps) @ tensors["lm_head.weight"].astype(np.float64).T
    np.testing.assert_allclose(np.asarray(logits[0]), ref, atol=1e-4, rtol=0)


def test_mtp_copy_that_differs_from_shared_head_is_rejected(tmp_path, base_ckpt):
    t = dict(base_ckpt[2])
    n = hf_reference.BASE["num_hidden_layers"]
    t[f"model.layers.{n}.shared_head.head.weight"] = t["lm_head.weight"] + 1.0
    with pytest.raises(CheckpointError, match="shared_head.head.weight"):
        checkpoints.load(_variant(tmp_path, base_ckpt, t))
