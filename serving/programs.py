"""The engine's compiled functions: pure functions of (weights, cache, routing counts, host inputs), traced once per
bucket at start-up by `serving.engine.Engine` (which inherits them): a prefill chunk for R requests, a decode dispatch of
`decode_steps` steps (with MTP: verify + draft), and the page extract / insert of a KV transfer. What they read of
the engine is configuration only (its config, mesh, attention ranks, model graph)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from model.deepseek import DeepseekV3
from model.moe import choose_moe_impl
from model.paged_cache import SCRATCH_PAGE, PagedCache
from serving.expert_stats import counted
from serving.logits import Proc, process, prompt_logprobs, token_logprobs
from serving.sampling import draw, keys_for, sample, speculative_accept, token_probs


class Programs:
    """Mixin of `Engine`: the functions its executables are compiled from."""

    def _layout(self, page_table_BP, valid_BT, kernel: bool = False, prefill: bool = False) -> PagedCache:
        impl = self.runtime.resolved_attention_impl() if kernel else "xla"
        rt, block = self.runtime, 0
        if prefill and rt.prefill_attention == "blockwise":
            block = max(1, rt.prefill_block // self.cfg.page_size)
        elif not prefill and impl == "xla" and rt.decode_attention == "blockwise":
            block = max(1, rt.decode_block // self.cfg.page_size)
        # prefill rows are any requests' (not R equal slices, one per rank): computed by every rank, each written
        # by the rank owning its pages
        return PagedCache(page_table_BP, valid_BT, mesh=self.mesh if self.ranks > 1 else None,
                          axes=self.rank_axes if self.ranks > 1 else (), pages_per_rank=self.pages_per_rank,
                          kernel=None if impl == "xla" else impl, block_pages=block, split_rows=not prefill)

    def moe_impl(self, n_tokens: int) -> str | None:
        """The routed-expert implementation the executables for `n_tokens` rows use: the runtime's if set, the
        expert-parallel dispatch's own under EP (None), else `model.moe.choose_moe_impl` for this platform."""
        rt = self.runtime
        if rt.moe_impl is not None or rt.expert_parallel is not None or not self.model_cfg.n_routed_experts:
            return rt.moe_impl
        return choose_moe_impl(self.model_cfg, n_tokens, rt.target_platform, jnp.dtype(self.model_dtype).itemsize)

    def _model_for(self, params, n_tokens: int) -> DeepseekV3:
        model = nnx.merge(self.graphdef, params)
        impl = self.moe_impl(n_tokens)
        if impl != model.runtime.moe_impl:
            model.runtime = model.runtime.replace(moe_impl=impl)
        return model

    def _param_leaves(self) -> list:
        """The weights as a flat list, in the order the executables take them: a call then passes arrays, not the
        NNX state (whose Python flattening cost 2.4 ms of host time per call at deepseek-v3's 1,719 weights, vs
        0.43 ms flat). Recomputed when the weights are replaced (EPLB moves)."""
        if self._leaves_of is not self.params:
            self._leaves_of, self._leaves = self.params, jax.tree.leaves(self.params)
        return self._leaves

    def update_weights(self, fn) -> None:
        """Run `fn(model)` on the engine's model, which may replace weights in place (EPLB moves), and take the
        result. The flat weight list is dropped first, so each replaced array is freed as `fn` goes."""
        self._leaves_of, self._leaves = None, []
        model = nnx.merge(self.graphdef, self.params)
        fn(model)
        self.graphdef, self.params = nnx.split(model)

    def _flat(self, fn):
        """`fn(params, cache, load_LE, ...)` jitted over the weights' flat leaves, cache and counts donated."""
        treedef, n = jax.tree.structure(self.params), len(self._param_leaves())

        def flat(*a):
            return fn(jax.tree.unflatten(treedef, a[:n]), *a[n:])

        # named after fn: XLA's module names (jit__decode_fn, ...) are what HLO dumps and profiles are read by
        flat.__name__ = getattr(fn, "__name__", None) or fn.func.__name__
        return jax.jit(flat, donate_argnums=(n, n + 1))

    # ---- compiled functions (pure; traced once per bucket at start-up) -------------------------------------------
    def _prefill_fn(self, params, cache, load_LE, tokens_RT, start_R, length_R, next_token_R, page_table_RP,
                    temperature_R, top_k_R, top_p_R, seed_R, *proc):
        """One chunk of each of R requests (a batched prefill; padding rows have length 0 and an all-scratch page
        table): row r's tokens at start_r..start_r+length_r-1. `next_token_R` is the prompt token after each
        chunk (-1 if it is the prompt's last chunk: then the sampled token takes its place for the MTP pass).
        `proc` (`serving.logits.Proc`, hist = the whole prompt): processors for the sampled token, its logprobs,
        and the chunk's prompt logprobs (position t: the prompt token at t + 1). `load_LE`: the routing counts
        (`serving.expert_stats`), returned with this chunk's added."""
        proc = Proc(*proc)
        R, T = tokens_RT.shape
        model = self._model_for(params, R * T)
        positions_RT = start_R[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
        valid_RT = jnp.arange(T)[None] < length_R[:, None]
        layout = self._layout(page_table_RP, valid_RT, prefill=True)
        last_R = jnp.maximum(length_R - 1, 0)
        paths = self.expert_stats.paths
        (logits_R1W, hidden_RTD, cache), load_LE = counted(
            lambda m: m.forward(tokens_RT, positions_RT, cache=layout, state=cache, logits_at=last_R), model, paths,
            load_LE, valid_RT)
        raw_RW = logits_R1W[:, 0]
        token_R = sample(process(raw_RW, proc, proc.hist, proc.min_left), start_R + length_R, temperature_R,
                         top_k_R, top_p_R, seed_R)
        lps = token_logprobs(raw_RW, token_R, proc.logprobs)
        in_chunk_RT = jnp.concatenate([tokens_RT[:, 1:], jnp.zeros((R, 1), tokens_RT.dtype)], axis=1)
        prompt_next_RT = jnp.where(jnp.arange(T)[None] == last_R[:, None], next_token_R[:, None], in_chunk_RT)
        plps = prompt_logprobs(model.head, hidden_RTD, prompt_next_RT, proc.prompt_logprobs)
        if not self.cfg.mtp:
            return (*self._to_host(token_R, jnp.zeros((R,), jnp.int32), jnp.zeros((R, 1), jnp.float32)),
                    *self._lp_out(*lps, *plps), cache, load_LE)
        # MTP over the chunk: position t sees (h_t, x_{t+1}); fills the MTP layer's cache and drafts x_{n+1}.
        follow_R = jnp.where(next_token_R >= 0, next_token_R, token_R)
        next_RT = jnp.where(jnp.arange(T)[None] == last_R[:, None], follow_R[:, None], in_chunk_RT)
        (m_logits, _, cache), load_LE = counted(
            lambda m: m.mtp_forward(hidden_RTD, next_RT, positions_RT, cache=layout, state=cache, logits_at=last_R),
            model, paths, load_LE, valid_RT)
        q_RW = token_probs(m_logits[:, 0], temperature_R, top_k_R, top_p_R)
        draft_R = draw(q_RW, keys_for(seed_R, start_R + length_R + 1, stream=3))
        return (*self._to_host(token_R, draft_R, q_RW), *self._lp_out(*lps, *plps), cache, load_LE)

    def _decode_fn(self, params, cache, load_LE, prev_M3, prev_MW, tokens_B, src_B, positions_B, page_tables_BP,
                   temperature, top_k, top_p, seed, drafts_B, q_BW, *proc, steps: int):
        """`steps` decode steps for B rows. `proc` (`serving.logits.Proc`): the rows' logits processors (each step
        writes its token into the history they count) and logprob requests. `load_LE`: the routing counts
        (`serving.expert_stats`), returned with these steps' added. `prev_M3`: each row of the previous dispatch, by
        its slot (M = the largest bucket), as (last token, its position, MTP draft), `prev_MW` the draft's
        distribution (MTP; W = 1 without); a row with `src_B` >= 0 continues from row `src_B` there instead of its
        host inputs — the previous dispatch's outputs never visit the host, so the host can queue this dispatch
        before reading that one (`Scheduler`'s overlapped decode; with MTP the host does not even know how many
        tokens that one accepted). Returned: this dispatch's (last_M3, last_MW)."""
        proc = Proc(*proc)
        M = prev_M3.shape[0]
        at, cont_B = jnp.clip(src_B, 0, M - 1), src_B >= 0
        tokens_B = jnp.where(cont_B, prev_M3[at, 0], tokens_B)
        positions_B = jnp.where(cont_B, prev_M3[at, 1], positions_B)
        drafts_B = jnp.where(cont_B, prev_M3[at, 2], drafts_B)
        q_BW = jnp.where(cont_B[:, None], prev_MW[at], q_BW)

        def last(tok_B, pos_B, d_B, q_BW):
            m3 = jnp.stack([tok_B, pos_B, d_B], 1)
            return self._to_host(jnp.zeros((M, 3), jnp.int32).at[: m3.shape[0]].set(m3),
                                 jnp.zeros((M, q_BW.shape[1]), q_BW.dtype).at[: q_BW.shape[0]].set(q_BW))
        model = self._model_for(params, tokens_B.shape[0] * (2 if self.cfg.mtp else 1))
        # padding rows have an all-scratch page table (each rank's scratch is its local page 0)
        valid_B1 = (page_tables_BP[:, :1] % self.pages_per_rank != SCRATCH_PAGE)
        layout = self._layout(page_tables_BP, valid_B1, kernel=True)
        rows = jnp.arange(tokens_B.shape[0])
        paths = self.expert_stats.paths

        def step(carry, _):
            cache, load, tok_B, pos_B, hist, left, i = carry
            (logits, hidden, cache), load = counted(
                lambda m: m.forward(tok_B[:, None], pos_B[:, None], cache=layout, state=cache, absorbed=True), model,
                paths, load, valid_B1)
            with jax.named_scope("sampling"):
                raw = logits[:, 0]
                # a grammar's mask holds for the first step only (the host keeps only that token of such rows)
                nxt_B = sample(process(raw, proc, hist, left, i == 0), pos_B + 1, temperature, top_k, top_p, seed)
                lps = token_logprobs(raw, nxt_B, proc.logprobs)
            hist = hist.at[rows, pos_B + 1].set(nxt_B, mode="drop")
            return (cache, load, nxt_B, pos_B + 1, hist, left - 1, i + 1), (nxt_B, *lps)

        def spec_step(carry, _):
            """Verify the draft at pos+1 with the main model (T = 2), then draft again with the MTP module."""
            cache, load, tok_B, pos_B, d_B, q_BW, hist, left, i = carry
            toks_BT = jnp.stack([tok_B, d_B], 1)
            pos_BT = jnp.stack([pos_B, pos_B + 1], 1)
            layout2 = self._layout(page_tables_BP, jnp.broadcast_to(valid_B1, pos_BT.shape), kernel=True)
            valid_BT = jnp.broadcast_to(valid_B1, pos_BT.shape)
            (logits, hidden_BTD, cache), load = counted(
                lambda m: m.forward(toks_BT, pos_BT, cache=layout2, state=cache, absorbed=True), model, paths, load,
                valid_BT)
            hist_d = hist.at[rows, pos_B + 1].set(d_B, mode="drop")   # position 1's logits follow the draft
            p0 = token_probs(process(logits[:, 0], proc, hist, left, i == 0), temperature, top_k, top_p)
            p1 = token_probs(process(logits[:, 1], proc, hist_d, left - 1, False), temperature, top_k, top_p)
            t1_B, ok_B = speculative_accept(p0, q_BW, d_B, keys_for(seed, pos_B + 1, stream=1),
                                            keys_for(seed, pos_B + 1, stream=2))
            bonus_B = draw(p1, keys_for(seed, pos_B + 2))
            lp0, lp1 = (token_logprobs(logits[:, i], t, proc.logprobs) for i, t in ((0, t1_B), (1, bonus_B)))
            # MTP at pos (h_pos, t1) drafts pos+2 if rejected; at pos+1 (h_pos+1, bonus) drafts pos+3 if accepted
            (m_logits, _, cache), load = counted(
                lambda m: m.mtp_forward(hidden_BTD, jnp.stack([t1_B, bonus_B], 1), pos_BT, cache=layout2, state=cache,
                                        absorbed=True), model, paths, load, valid_BT)
            new_pos_B = pos_B + jnp.where(ok_B, 2, 1)
            q_new_BW = jnp.where(ok_B[:, None], token_probs(m_logits[:, 1], temperature, top_k, top_p),
                                 token_probs(m_logits[:, 0], temperature, top_k, top_p))
            d_new_B = draw(q_new_BW, keys_for(seed, new_pos_B + 1, stream=3))
            new_tok_B = jnp.where(ok_B, bonus_B, t1_B)
            hist = hist.at[rows, pos_B + 1].set(t1_B, mode="drop")
            hist = hist.at[rows, jnp.where(ok_B, pos_B + 2, hist.shape[1])].set(bonus_B, mode="drop")
            lps = tuple(jnp.stack([a, b], 1) for a, b in zip(lp0, lp1))
            return ((cache, load, new_tok_B, new_pos_B, d_new_B, q_new_BW, hist, left - jnp.where(ok_B, 2, 1), i + 1),
                    (jnp.stack([t1_B, bonus_B], 1), ok_B, *lps))

        S, B = steps, tokens_B.shape[0]
        row_major = lambda x: jnp.moveaxis(x, 0, 1)   # [S, B, ...] -> [B, S, ...]
        if not self.cfg.mtp:
            (cache, load_LE, tok_B, pos_B, *_), (toks_SB, *lps) = jax.lax.scan(
                step, (cache, load_LE, tokens_B, positions_B, proc.hist, proc.min_left, jnp.int32(0)), None, length=S)
            return (*self._to_host(toks_SB.T, jnp.zeros((B, S), bool), drafts_B, q_BW),
                    *self._lp_out(*map(row_major, lps)), *last(tok_B, pos_B, drafts_B, q_BW), cache, load_LE)
        (cache, load_LE, tok_B, pos_B, d_B, q_BW, *_), (toks_SB2, ok_SB, *lps) = jax.lax.scan(
            spec_step, (cache, load_LE, tokens_B, positions_B, drafts_B, q_BW, proc.hist, proc.min_left, jnp.int32(0)),
            None, length=S)
        return (*self._to_host(row_major(toks_SB2), ok_SB.T, d_B, q_BW), *self._lp_out(*map(row_major, lps)),
                *last(tok_B, pos_B, d_B, q_BW), cache, load_LE)

    def _lp_out(self, *xs):
        """Logprob outputs: read only when a row asked, so left where they are computed (a gather on the host
        then), except in a worker group, whose leader can read only replicated outputs."""
        return self._to_host(*xs) if self.multiprocess else xs

    def _to_host(self, *xs):
        """Outputs the host reads (tokens, drafts, pages) replicated: a worker group's leader reads its own copy."""
        if self.mesh is None:
            return xs
        return tuple(jax.lax.with_sharding_constraint(x, self._replicated) for x in xs)

    def _extract_fn(self, cache, pages_N):
        if self.ranks == 1:
            return self._to_host(cache[:, pages_N])[0]
        ppr, ax = self.pages_per_rank, self.rank_axes

        def body(local, ids):   # the owning rank contributes its pages, the others zeros
            lid = ids - jax.lax.axis_index(ax) * ppr
            mine = (lid >= 0) & (lid < ppr)
            data = local[:, jnp.where(mine, lid, 0)]
            return jax.lax.psum(jnp.where(mine[None, :, None, None], data, jnp.zeros((), data.dtype)), ax)

        return jax.shard_map(body, mesh=self.mesh, in_specs=(PartitionSpec(None, ax), PartitionSpec()),
                             out_specs=PartitionSpec(), check_vma=False)(cache, pages_N)

    def _insert_fn(self, cache, pages_N, data):
        if self.ranks == 1:
            return cache.at[:, pages_N].set(data.astype(cache.dtype))
        ppr, ax = self.pages_per_rank, self.rank_axes

        def body(local, ids, data):   # each rank writes the pages it owns (the others' ids fall off the end)
            lid = ids - jax.lax.axis_index(ax) * ppr
            lid = jnp.where((lid >= 0) & (lid < ppr), lid, ppr)
            return local.at[:, lid].set(data.astype(local.dtype), mode="drop")

        return jax.shard_map(body, mesh=self.mesh, in_specs=(PartitionSpec(None, ax), PartitionSpec(),
                                                              PartitionSpec()),
                             out_specs=PartitionSpec(None, ax), check_vma=False)(cache, pages_N, data)
