"""Tandem's DeepSeek-V3/R1 model (Flax NNX).

Axis letters used in tensor names (`q_nope_BTHK`, `kv_BSC`, ...):
  B batch rows            T tokens in this step     S key positions (cache)   D hidden (embed)
  H attention heads       K qk_nope_head_dim        R qk_rope_head_dim        V v_head_dim
  Q q_lora_rank           L kv_lora_rank            C cache width = L + R     W vocabulary
  E routed experts        X experts per token       G expert groups           F MLP / expert width
  N flattened tokens B*T  M token copies sorted by expert (N*X)               P pages   Z page size
  EPLB names (`sharding.eplb`, the redundant-expert tables, routing counts) reuse three letters: P expert slots
  (E + redundant), K replicas of one expert, L MoE layers (`load_LE`).

Logical weight axes (mapped to mesh axes by the rule sets in `sharding/`):
  vocab, embed, heads, qk_head, kv_head, v_head, q_lora, kv_lora, kv_latent, qkv_a (q_lora + kv_latent: the fused
  q_a / kv_a projection), mlp, experts, expert_mlp.
"""

from model.cache import ContiguousCache, NoCache
from model.config import ModelConfig, preset, presets
from model.deepseek import MTP, DecoderLayer, DeepseekV3
from model.generate import decode_step, greedy_generate, prefill

__all__ = ["ModelConfig", "preset", "presets", "DeepseekV3", "DecoderLayer", "MTP", "NoCache", "ContiguousCache",
           "prefill", "decode_step", "greedy_generate"]
