"""A Tandem `DeepseekV3` -> an HF DeepSeek-V3 safetensors directory (the inverse of `checkpoints.loader`).

Every weight goes back to the HF name and layout that `checkpoints.loader.plans` reads it from: Linear weights as
[out, in], attention projections with their head axes flattened, routed experts as one tensor per expert
(`mlp.experts.{e}.{gate,up,down}_proj.weight`), the router as `mlp.gate.weight` + `mlp.gate.e_score_correction_bias`,
and the MTP module as layer `num_hidden_layers + d` (`enorm`, `hnorm`, `eh_proj`, `shared_head.norm` and a full
decoder block). The per-MTP-layer copies of the embedding and head that DeepSeek's release stores are not written
(Tandem shares them; the loader accepts their absence).

    save_hf(model, "out/dir", dtype=jnp.bfloat16)   # config.json + model.safetensors

The router (`mlp.gate.weight`) and its correction bias are always stored as float32, as the model keeps them.
"""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from checkpoints import safetensors_io
from checkpoints.loader import plans
from model.config import ModelConfig
from model.deepseek import DeepseekV3

class _NoFusedExperts:
    """Stands in for a checkpoint when asking the loader for its plans: per-expert tensors, never the fused ones."""

    def __contains__(self, name: str) -> bool:
        return False


def _attn(prefix: str, w: dict[str, np.ndarray], cfg: ModelConfig) -> dict[str, np.ndarray]:
    a, o = prefix + "self_attn.", "self_attn."
    out = {}
    if cfg.q_lora_rank:   # the fused q_a / kv_a matrix, split back into HF's two
        qkv = w[o + "qkv_a_proj"]                               # [D, Q + L + R]
        out[a + "q_a_proj.weight"] = qkv[:, : cfg.q_lora_rank].T
        out[a + "kv_a_proj_with_mqa.weight"] = qkv[:, cfg.q_lora_rank:].T
        out[a + "q_a_layernorm.weight"] = w[o + "q_a_layernorm.weight"]
        q = w[o + "q_b_proj"]                                   # [Q, H, K+R]
        out[a + "q_b_proj.weight"] = q.reshape(q.shape[0], -1).T
    else:
        q = w[o + "q_proj"]                                     # [D, H, K+R]
        out[a + "q_proj.weight"] = q.reshape(q.shape[0], -1).T
        out[a + "kv_a_proj_with_mqa.weight"] = w[o + "kv_a_proj_with_mqa"].T
    out[a + "kv_a_layernorm.weight"] = w[o + "kv_a_layernorm.weight"]
    kvb = np.concatenate([w[o + "w_uk"], w[o + "w_uv"]], axis=-1)   # [H, L, K+V]
    out[a + "kv_b_proj.weight"] = kvb.transpose(0, 2, 1).reshape(-1, kvb.shape[1])
    op = w[o + "o_proj"]                                        # [H, V, D]
    out[a + "o_proj.weight"] = op.reshape(-1, op.shape[-1]).T
    return out


def _layer(prefix: str, w: dict[str, np.ndarray], cfg: ModelConfig, moe: bool) -> dict[str, np.ndarray]:
    out = _attn(prefix, w, cfg)
    for n in ("input_layernorm", "post_attention_layernorm"):
        out[f"{prefix}{n}.weight"] = w[f"{n}.weight"]
    m = prefix + "mlp."
    if not moe:
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[f"{m}{n}.weight"] = w[f"mlp.{n}"].T
        return out
    out[m + "gate.weight"] = w["mlp.gate"].T
    out[m + "gate.e_score_correction_bias"] = w["mlp.e_score_correction_bias"]
    for n in ("gate_proj", "up_proj", "down_proj"):
        stacked = w[f"mlp.experts_{n}"]                         # [E, in, out]
        for e in range(stacked.shape[0]):
            out[f"{m}experts.{e}.{n}.weight"] = stacked[e].T
    if cfg.n_shared_experts:
        for n in ("gate_proj", "up_proj", "down_proj"):
            out[f"{m}shared_experts.{n}.weight"] = w[f"mlp.shared_experts.{n}"].T
    return out


def _sub(flat: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}


def hf_tensors(model: DeepseekV3) -> dict[str, np.ndarray]:
    """HF tensor name -> float32 numpy array in HF layout, for every weight of `model`."""
    cfg = model.cfg
    _, state = nnx.split(model)
    flat = {".".join(map(str, k)): np.asarray(v.get_value(), dtype=np.float32) for k, v in nnx.to_flat_state(state)}
    out = {"model.embed_tokens.weight": flat["embed_tokens"], "model.norm.weight": flat["norm.weight"]}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = flat["lm_head"].T
    for i in range(cfg.num_hidden_layers):
        out.update(_layer(f"model.layers.{i}.", _sub(flat, f"layers.{i}."), cfg, cfg.is_moe_layer(i)))
    for d in range(len(model.mtp)):
        hf = f"model.layers.{cfg.num_hidden_layers + d}."
        w = _sub(flat, f"mtp.{d}.")
        out.update(_layer(hf, _sub(w, "block."), cfg, cfg.is_moe_layer(cfg.num_hidden_layers)))
        out[hf + "enorm.weight"] = w["enorm.weight"]
        out[hf + "hnorm.weight"] = w["hnorm.weight"]
        out[hf + "eh_proj.weight"] = w["eh_proj"].T
        out[hf + "shared_head.norm.weight"] = w["shared_head_norm.weight"]
    # The exact inverse of the loader: the names we write are exactly the ones its plans read.
    want = {s for p in plans(cfg.replace(num_nextn_predict_layers=len(model.mtp)), _NoFusedExperts()).values()
            for s in p.sources}
    if set(out) != want:
        raise AssertionError(f"exporter and loader plans differ: {sorted(set(out) ^ want)[:8]}")
    return out


def _storage(name: str, arr: np.ndarray, dtype) -> np.ndarray:
    if name.endswith(("mlp.gate.weight", "gate.e_score_correction_bias")):
        return arr.astype(np.float32)
    if jnp.dtype(dtype) == jnp.bfloat16:
        return arr.astype(ml_dtypes.bfloat16)
    return arr.astype(jnp.dtype(dtype))


def save_hf(model: DeepseekV3, path: str | os.PathLike, *, dtype=jnp.float32,
            extra_config: dict | None = None) -> dict[str, np.ndarray]:
    """Write `config.json` and `model.safetensors` for `model` under `path` (created if needed).

    dtype: storage dtype of the weights (float32, bfloat16 or float16); the router stays float32.
    extra_config: extra `config.json` fields (e.g. `torch_dtype`). Returns the tensors written.
    """
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    cfg = model.cfg.replace(num_nextn_predict_layers=len(model.mtp))
    tensors = {k: _storage(k, v, dtype) for k, v in sorted(hf_tensors(model).items())}
    d = cfg.to_hf_dict()
    d["torch_dtype"] = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[jnp.dtype(dtype).name]
    d.update(extra_config or {})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=2, sort_keys=True)
        f.write("\n")
    safetensors_io.write(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})
    return tensors
