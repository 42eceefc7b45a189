"""The DeepSeek-V3/R1 decoder in Flax NNX: embedding, N decoder blocks (dense then MoE), final norm, untied head,
and the MTP (next-n) module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from model.attention import MLA
from model.cache import BLOCKWISE_DECODE, BLOCKWISE_PREFILL, KERNEL_DECODE, NoCache, check_layout
from model.config import ModelConfig
from model.layers import MLP, RMSNorm, param
from model.moe import MoE
from model.rope import cos_sin
from model.runtime import DEFAULT_RUNTIME, Runtime


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, *, rngs: nnx.Rngs, dtype):
        self.input_layernorm = RMSNorm(cfg.hidden_size, "embed", cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.self_attn = MLA(cfg, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, "embed", cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = (MoE(cfg, rngs=rngs, dtype=dtype) if cfg.is_moe_layer(layer_idx)
                    else MLP(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=dtype))

    def __call__(self, x_BTD, positions_BT, cos, sin, cache, state, cache_layer: int, absorbed: bool,
                 runtime: Runtime = DEFAULT_RUNTIME):
        with jax.named_scope("attention"):
            h_BTD = self.input_layernorm(x_BTD)
            q_nope, q_rope, kv_BTC = self.self_attn.project(h_BTD, cos, sin, runtime)
            caps = check_layout(cache)
            if absorbed and KERNEL_DECODE in caps:   # decode reads run in the layout's kernel
                state = cache.write(state, cache_layer, kv_BTC, positions_BT)
                x_BTD = x_BTD + self.self_attn.attend_paged(q_nope, q_rope, cache, state, cache_layer, positions_BT,
                                                            runtime)
            elif (BLOCKWISE_DECODE if absorbed else BLOCKWISE_PREFILL) in caps:   # only the blocks the rows reach
                state = cache.write(state, cache_layer, kv_BTC, positions_BT)
                attend = self.self_attn.attend_absorbed_blockwise if absorbed else self.self_attn.attend_blockwise
                x_BTD = x_BTD + attend(q_nope, q_rope, lambda j: cache.read_block(state, cache_layer, j, kv_BTC.dtype),
                                       cache.block_tokens(state), positions_BT, runtime)
            else:
                state, kv_BSC, mask_BTS = cache.update(state, cache_layer, kv_BTC, positions_BT)
                x_BTD = x_BTD + self.self_attn.attend(q_nope, q_rope, kv_BSC, mask_BTS, absorbed=absorbed,
                                                      runtime=runtime)
        h_BTD = self.post_attention_layernorm(x_BTD)
        if isinstance(self.mlp, MoE):
            with jax.named_scope("moe"):
                x_BTD = x_BTD + self.mlp(h_BTD, runtime)
        else:
            with jax.named_scope("mlp"):
                x_BTD = x_BTD + self.mlp(h_BTD, runtime)
        return x_BTD, state


class MTP(nnx.Module):
    """DeepSeek's next-n module: from the main model's hidden state at t and the token at t+1, predict t+2.

    h' = eh_proj([enorm(embed(tok_{t+1})) ; hnorm(h_t)]), one decoder block, shared_head.norm, then the main
    model's output head (embedding and head are shared with the main model, as in the DeepSeek-V3 paper).
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype):
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, "embed", cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.hnorm = RMSNorm(D, "embed", cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        self.eh_proj = param(rngs, (2 * D, D), (None, "embed"), dtype)
        self.block = DecoderLayer(cfg, cfg.num_hidden_layers, rngs=rngs, dtype=dtype)
        self.shared_head_norm = RMSNorm(D, "embed", cfg.rms_norm_eps, rngs=rngs, dtype=dtype)


class DeepseekV3(nnx.Module):
    """`model(input_ids)` -> float32 logits [B, T, vocab] (teacher-forced, no cache).

    `runtime` (`model.runtime.Runtime`, static) holds the kernel choices and the expert-parallel dispatch of a
    placed model; assign a new one to change them (`sharding.place` and `checkpoints.load(mesh=...)` do)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs | None = None, dtype=jnp.float32,
                 runtime: Runtime = DEFAULT_RUNTIME):
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        D, W = cfg.hidden_size, cfg.vocab_size
        self.cfg = cfg
        self.dtype = dtype
        self.runtime = runtime
        self.embed_tokens = param(rngs, (W, D), ("vocab", "embed"), dtype)
        self.layers = nnx.List([DecoderLayer(cfg, i, rngs=rngs, dtype=dtype) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(D, "embed", cfg.rms_norm_eps, rngs=rngs, dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = param(rngs, (D, W), ("embed", "vocab"), dtype)
        self.mtp = nnx.List([MTP(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_nextn_predict_layers)])

    # ---- pieces -----------------------------------------------------------------------------------------------
    def embed(self, tokens_BT) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens_BT, axis=0)

    def head(self, h_BTD) -> jax.Array:
        w_DW = self.embed_tokens[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return jnp.einsum("btd,dw->btw", h_BTD, w_DW, preferred_element_type=jnp.float32)

    # ---- forward ----------------------------------------------------------------------------------------------
    def forward(self, tokens_BT: Int[Array, "B T"], positions_BT: Int[Array, "B T"], *, cache=NoCache(),
                state=None, absorbed: bool = False, logits_at: Int[Array, "B"] | None = None):
        """Run the decoder over `tokens_BT` at absolute `positions_BT`.

        Returns (logits [B,T,W] float32, hidden [B,T,D] after the final norm, new cache state). With a cache,
        each layer writes the new latents first and then attends over everything its cache shows. `logits_at`
        ([B] indices into T): the head runs on those positions only and logits are [B,1,W] (a prefill chunk
        needs one token's; the head is 2 x D x vocab FLOPs per position).
        """
        cos, sin = cos_sin(self.cfg, positions_BT)
        x_BTD = self.embed(tokens_BT)
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer{i}"):
                x_BTD, state = layer(x_BTD, positions_BT, cos, sin, cache, state, i, absorbed, self.runtime)
        h_BTD = self.norm(x_BTD)
        if logits_at is not None:
            return self.head(h_BTD[jnp.arange(h_BTD.shape[0]), logits_at][:, None]), h_BTD, state
        return self.head(h_BTD), h_BTD, state

    def __call__(self, input_ids: Int[Array, "B T"]) -> Float[Array, "B T W"]:
        B, T = input_ids.shape
        positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        return self.forward(input_ids, positions)[0]

    def mtp_forward(self, hidden_BTD, next_tokens_BT, positions_BT, *, depth: int = 0, cache=NoCache(),
                    state=None, absorbed: bool = False, logits_at=None):
        """MTP module `depth`: logits [B,T,W] for token t+2+depth from hidden h_t and token t+1+depth.

        `positions_BT` are the positions of the *hidden states* (t); the block's cache (if any) is layer
        `num_hidden_layers + depth` of `state`. Returns (logits, the module's output hidden, state).
        """
        m = self.mtp[depth]
        cos, sin = cos_sin(self.cfg, positions_BT)
        e_BTD = m.enorm(self.embed(next_tokens_BT))
        h_BTD = m.hnorm(hidden_BTD.astype(e_BTD.dtype))
        x_BTD = jnp.einsum("btx,xd->btd", jnp.concatenate([e_BTD, h_BTD], axis=-1), m.eh_proj[...])
        with jax.named_scope(f"mtp{depth}"):
            x_BTD, state = m.block(x_BTD, positions_BT, cos, sin, cache, state,
                                   self.cfg.num_hidden_layers + depth, absorbed, self.runtime)
        h_BTD = m.shared_head_norm(x_BTD)
        if logits_at is not None:
            h_BTD = h_BTD[jnp.arange(h_BTD.shape[0]), logits_at][:, None]
        return self.head(h_BTD), x_BTD, state
