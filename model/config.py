"""DeepSeek-V3 model configuration with Hugging Face field names."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping

# Fields we read from an HF config.json; anything else there is ignored (tokenizer ids, dtype hints, ...).
_SUPPORTED_ROPE_TYPES = ("default", "yarn")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Yarn parameters as a sorted tuple of (key, value) so the config stays hashable; None = plain RoPE.
    rope_scaling: tuple[tuple[str, Any], ...] | None = (
        ("beta_fast", 32), ("beta_slow", 1), ("factor", 40.0), ("mscale", 1.0), ("mscale_all_dim", 1.0),
        ("original_max_position_embeddings", 4096), ("rope_type", "yarn"))
    rope_interleave: bool = True
    num_nextn_predict_layers: int = 1
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | tuple[int, ...] | None = 1
    # Not an HF field: extra physical copies of routed experts (EPLB, `sharding.eplb`); each MoE layer then holds
    # n_routed_experts + n_redundant_experts expert weights and a table saying which logical expert each one is.
    n_redundant_experts: int = 0

    def __post_init__(self):
        errors = []
        if self.scoring_func != "sigmoid":
            errors.append(f"scoring_func={self.scoring_func!r} (only 'sigmoid', as in DeepSeek-V3, is supported)")
        if self.hidden_act != "silu":
            errors.append(f"hidden_act={self.hidden_act!r} (only 'silu' is supported)")
        if self.n_routed_experts % max(self.n_group, 1):
            errors.append(f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
        if not 1 <= self.topk_group <= self.n_group:
            errors.append(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            errors.append("group-limited routing needs >= 2 experts per group (group score = sum of top-2)")
        if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
            errors.append(f"num_experts_per_tok={self.num_experts_per_tok} exceeds the experts in "
                          f"topk_group={self.topk_group} groups")
        if self.n_redundant_experts < 0:
            errors.append(f"n_redundant_experts={self.n_redundant_experts} must be >= 0")
        if self.qk_rope_head_dim % 2:
            errors.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even")
        if self.first_k_dense_replace > self.num_hidden_layers:
            errors.append("first_k_dense_replace > num_hidden_layers")
        rs = self.rope_scaling_dict
        if rs is not None and rs.get("rope_type", "default") not in _SUPPORTED_ROPE_TYPES:
            errors.append(f"rope type {rs.get('rope_type')!r} (supported: {_SUPPORTED_ROPE_TYPES})")
        if errors:
            raise ValueError("invalid DeepSeek-V3 config: " + "; ".join(errors))

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_physical_experts(self) -> int:
        """Routed-expert weights each MoE layer holds: one per logical expert plus the redundant copies."""
        return self.n_routed_experts + self.n_redundant_experts

    @property
    def cache_width(self) -> int:
        """Latent cache values per token per layer (576 for DeepSeek-V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return None if self.rope_scaling is None else dict(self.rope_scaling)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        return (self.eos_token_id,) if isinstance(self.eos_token_id, int) else tuple(self.eos_token_id)

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under yarn (as the HF reference)."""
        scale = self.qk_head_dim ** -0.5
        rs = self.rope_scaling_dict
        if rs is not None and rs.get("rope_type", "default") != "default":
            mscale_all_dim = rs.get("mscale_all_dim", 0)
            if mscale_all_dim:
                m = yarn_get_mscale(self.yarn_factor, mscale_all_dim)
                scale = scale * m * m
        return scale

    @property
    def yarn_factor(self) -> float:
        rs = self.rope_scaling_dict or {}
        factor = rs.get("factor")
        if factor is None:
            factor = self.max_position_embeddings / rs["original_max_position_embeddings"]
        return float(factor)

    def num_params(self, *, include_mtp: bool = True) -> int:
        """Parameter count from the shapes alone (no arrays needed)."""
        D, H = self.hidden_size, self.num_attention_heads
        attn = (D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
                if self.q_lora_rank else D * H * self.qk_head_dim)
        attn += D * self.cache_width + self.kv_lora_rank
        attn += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim) + H * self.v_head_dim * D
        dense = 3 * D * self.intermediate_size
        moe = (3 * D * self.moe_intermediate_size * (self.n_routed_experts + self.n_shared_experts)
               + D * self.n_routed_experts + self.n_routed_experts)
        layer = lambda i: attn + 2 * D + (moe if self.is_moe_layer(i) else dense)
        total = sum(layer(i) for i in range(self.num_hidden_layers))
        total += self.vocab_size * D * (1 if self.tie_word_embeddings else 2) + D
        if include_mtp:
            total += self.num_nextn_predict_layers * (layer(self.num_hidden_layers) + 2 * D * D + 3 * D)
        return total

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, path_or_dict: str | os.PathLike | Mapping[str, Any]) -> "ModelConfig":
        """From an HF `config.json` (a directory, the file, or its parsed dict)."""
        if isinstance(path_or_dict, Mapping):
            d = dict(path_or_dict)
        else:
            p = os.fspath(path_or_dict)
            if os.path.isdir(p):
                p = os.path.join(p, "config.json")
            try:
                with open(p) as f:
                    d = json.load(f)
            except FileNotFoundError:
                raise FileNotFoundError(f"no config.json at {p}") from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{p} is not valid JSON: {e}") from None
        mt = d.get("model_type")
        if mt not in (None, "deepseek_v3", "deepseek_v2"):
            raise ValueError(f"model_type={mt!r}: Tandem loads DeepSeek-V3/R1 checkpoints (model_type 'deepseek_v3')")
        if d.get("attention_bias"):
            raise ValueError("attention_bias=true is not supported (DeepSeek-V3 has no attention biases)")
        # transformers >= 5 writes `rope_parameters` (with rope_theta inside); older configs `rope_scaling`.
        rope = d.get("rope_parameters") or d.get("rope_scaling")
        rope_theta = d.get("rope_theta")
        rope_scaling = None
        if rope:
            rope = dict(rope)
            rope_theta = rope.pop("rope_theta", rope_theta)
            rtype = rope.pop("rope_type", rope.pop("type", "default"))
            if rtype != "default":
                rope["rope_type"] = rtype
                rope.setdefault("original_max_position_embeddings",
                                d.get("original_max_position_embeddings", d.get("max_position_embeddings")))
                rope_scaling = tuple(sorted(rope.items()))
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in ("rope_scaling", "rope_theta", "n_redundant_experts"):
                continue
            if f.name in d and d[f.name] is not None:
                kw[f.name] = d[f.name]
        if "num_nextn_predict_layers" not in d and "num_mtp_layers" in d:
            kw["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if isinstance(kw.get("eos_token_id"), list):
            kw["eos_token_id"] = tuple(kw["eos_token_id"])
        if "q_lora_rank" in d and d["q_lora_rank"] is None:
            kw["q_lora_rank"] = None
        kw["rope_theta"] = float(rope_theta if rope_theta is not None else 10000.0)
        kw["rope_scaling"] = rope_scaling
        return cls(**kw)

    def to_hf_dict(self) -> dict[str, Any]:
        """The HF `config.json` content for this config (transformers >= 5 layout, `rope_parameters`)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
             if f.name not in ("rope_scaling", "rope_theta", "n_redundant_experts")}
        if isinstance(d["eos_token_id"], tuple):
            d["eos_token_id"] = list(d["eos_token_id"])
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        if self.rope_scaling is not None:
            rope.update(self.rope_scaling_dict)
        d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", attention_bias=False,
                 num_key_value_heads=self.num_attention_heads, rope_parameters=rope)
        return d

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


_PRESETS: dict[str, ModelConfig] = {
    # DeepSeek-V3 / R1 (671B total, 37B active): the published config.json values.
    "deepseek-v3": ModelConfig(),
    "deepseek-r1": ModelConfig(),
    # A few-MB model of the full architecture, for tests and the first `make run`.
    "tiny": ModelConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, routed_scaling_factor=2.5,
        kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16, qk_nope_head_dim=16, n_group=2,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=1024,
        rope_scaling=(("beta_fast", 32), ("beta_slow", 1), ("factor", 4.0), ("mscale", 1.0),
                      ("mscale_all_dim", 1.0), ("original_max_position_embeddings", 256), ("rope_type", "yarn")),
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known: {sorted(_PRESETS)}") from None


def presets() -> list[str]:
    return sorted(_PRESETS)
