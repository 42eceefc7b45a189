"""Expert parallelism: token dispatch to the experts' owners and back by `all_to_all`, inside `jax.shard_map`.

`ExpertParallel` is a model op: `MoE` calls it (via `Runtime.expert_parallel`) with `routed_experts`' arguments
when its experts are split over mesh axes. The mesh and the axis names are passed in (`sharding` derives them from
its rule sets); this module knows nothing about rules. Per device, inside the shard_map:

  1. tokens: each device holds its slice of the token rows. Rows are split over every mesh axis except the one
     that splits each expert's FFN width (`ffn_axes`, tp): those devices compute partial sums for the *same*
     rows, added by a psum at the end.
  2. bucket: each token copy (token, chosen expert) goes to the expert-shard owning that expert. Buckets have a
     fixed capacity C rows per destination (`capacity_factor` x the mean load, at most the worst case), because
     `ragged_all_to_all` does not exist on XLA:CPU and fixed shapes compile once.
  3. all_to_all(tiled) sends bucket s to shard s; the local experts run as one grouped matmul
     (`model.moe.expert_ffn`) over the received rows; a second all_to_all returns the results to the senders,
     which weight and sum each token's copies.
  4. overflow: if any bucket on any device would exceed C, *every* device takes the exact path instead (one
     `lax.cond` on a globally reduced flag, so collectives match): all_gather the tokens of the ep group, each
     shard runs its local experts on every copy routed to them, psum_scatter the sums back. No token is dropped.

Hierarchical dispatch (`domain_axis`: the outer expert axis whose slices live in different domains, e.g. hosts
of a worker group). Flat, a token picking k experts on another host sends k copies over the slow link. Instead:
  stage 1 — each token goes once to each domain holding any of its experts (an all_to_all over the domain axis
            between devices of the same position; the bucket holds every local row, so it never overflows), with
            its expert ids masked to those of that domain and their weights;
  stage 2 — inside the domain, steps 2-4 above over the inner expert axes; each received row comes back as the
            weighted sum of its experts in that domain;
  stage 1 back — one row per (token, domain) returns over the domain axis and the domains' sums are added.
With 8 experts per token over 2 hosts the cross-domain bytes drop ~8x (`bench.group_comm`); in-domain bytes grow.

Quantized expert weights (`QuantizedTensor`, FP4 or FP8) are split like plain ones and their kernels run on the
local shards inside the shard_map (`check_vma=False`: Pallas kernels carry no varying-manual-axes annotations).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from model.layers import local_weight, weight_spec
from model.moe import expert_ffn, routed_experts, segment_experts


def _axes(mesh: Mesh, axes) -> tuple[str, ...]:
    """Mesh axes (str or tuple) restricted to those the mesh has with size > 1, in the given order."""
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if mesh.shape.get(a, 1) > 1)


def _local_experts(x_MD, e_M, n_local: int, gate_EDF, up_EDF, down_EFD, impl: str, segment: bool = False):
    """Rows x_MD through local expert e_M (0..n_local-1; -1 = empty slot -> 0): one sorted grouped matmul, or
    (`segment`) a loop over the live (expert, row tile) items — XLA:CPU runs a grouped matmul as a dot over every
    group, so its cost there grows with the local experts (EPLB's extra slots), the loop's only with the rows."""
    if segment:
        gate_EDF, up_EDF, down_EDF = map(local_weight, (gate_EDF, up_EDF, down_EFD))
        ok_M1 = (e_M >= 0)[:, None]
        return segment_experts(x_MD, jnp.ones(ok_M1.shape, jnp.float32), jnp.maximum(e_M, 0)[:, None], gate_EDF,
                               up_EDF, down_EDF, impl, valid_NX=ok_M1)
    key_M = jnp.where(e_M >= 0, e_M, n_local)                  # empty slots sort last, outside every group
    order = jnp.argsort(key_M, stable=True)
    sizes_E = jnp.bincount(key_M, length=n_local + 1)[:n_local].astype(jnp.int32)
    gate_EDF, up_EDF, down_EFD = map(local_weight, (gate_EDF, up_EDF, down_EFD))  # arrays or quantized weights
    y_sorted = expert_ffn(x_MD[order], sizes_E, gate_EDF, up_EDF, down_EFD, impl)
    y_MD = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    return jnp.where((e_M >= 0)[:, None], y_MD, jnp.zeros((), y_MD.dtype))


def _exchange(x_nD, w_nX, idx_nX, valid_nX, axes, S: int, E_l: int, C: int, all_axes, weights, impl: str,
              segment: bool = False):
    """Steps 2-4 over expert `axes` (S shards of E_l experts; expert ids relative to these shards): each valid
    copy to its expert's shard in buckets of C rows, local experts, back, weighted sum per row. Exact on
    overflow (one globally agreed `lax.cond`)."""
    n, D = x_nD.shape
    X = idx_nX.shape[1]
    gate, up, down = weights
    me = lax.axis_index(axes)
    dest_M = jnp.where(valid_nX, idx_nX // E_l, S).reshape(-1)            # S = "no bucket"
    onehot_MS = dest_M[:, None] == jnp.arange(S)[None, :]
    pos_M = jnp.take_along_axis(jnp.cumsum(onehot_MS, 0), jnp.minimum(dest_M, S - 1)[:, None], 1)[:, 0] - 1
    loads_S = onehot_MS.sum(0)
    overflow = lax.pmax((loads_S.max() > C).astype(jnp.int32), all_axes)

    def capacity_path(x_nD):
        with jax.named_scope("ep_capacity"):
            keep_M = dest_M < S
            slot_M = jnp.where(keep_M, dest_M * C + pos_M, S * C)          # S*C: a dump row, cut off below
            x_MD = jnp.repeat(x_nD, X, axis=0)
            send_x = jnp.zeros((S * C + 1, D), x_nD.dtype).at[slot_M].set(x_MD)[: S * C]
            send_e = jnp.full((S * C + 1,), -1, jnp.int32).at[slot_M].set(
                (idx_nX.reshape(-1) % E_l).astype(jnp.int32))[: S * C]
            recv_x = lax.all_to_all(send_x.reshape(S, C, D), axes, 0, 0, tiled=True)
            recv_e = lax.all_to_all(send_e.reshape(S, C), axes, 0, 0, tiled=True)
            y = _local_experts(recv_x.reshape(S * C, D), recv_e.reshape(-1), E_l, gate, up, down, impl, segment)
            back = lax.all_to_all(y.reshape(S, C, D), axes, 0, 0, tiled=True).reshape(S * C, D)
            y_MD = back[jnp.minimum(slot_M, S * C - 1)]
            scale_M = jnp.where(keep_M, w_nX.reshape(-1), 0).astype(y_MD.dtype)
            return (y_MD * scale_M[:, None]).reshape(-1, X, D).sum(1)

    def exact_path(x_nD):
        with jax.named_scope("ep_fallback"):
            xg = lax.all_gather(x_nD, axes, tiled=True)                     # [S*n, D]
            ig = lax.all_gather(idx_nX, axes, tiled=True)
            wg = lax.all_gather(w_nX, axes, tiled=True)
            vg = lax.all_gather(valid_nX, axes, tiled=True)
            mine = (ig // E_l == me) & vg
            e_M = jnp.where(mine, ig - me * E_l, -1).reshape(-1)
            y = _local_experts(jnp.repeat(xg, X, axis=0), e_M, E_l, gate, up, down, impl, segment)
            scale_M = jnp.where(mine, wg, 0).reshape(-1).astype(y.dtype)
            # per copy, summed by the sender in copy order: each copy is non-zero on one shard only, so the psum
            # adds zeros (exact) and the result does not depend on which shard owns which expert (EPLB)
            part = (y * scale_M[:, None]).reshape(-1, X, D)
            return lax.psum_scatter(part, axes, scatter_dimension=0, tiled=True).sum(1)

    return lax.cond(overflow > 0, exact_path, capacity_path, x_nD)


def _hierarchical(x_nD, w_nX, idx_nX, valid_nX, outer: str, inner: tuple[str, ...], mesh: Mesh, E_l: int,
                  capacity_factor: float, all_axes, weights, impl: str, segment: bool = False):
    """Stage 1 over the domain axis (one row per token and domain), stage 2 `_exchange` inside the domain,
    stage 1 back (see the module docstring)."""
    n, D = x_nD.shape
    X = idx_nX.shape[1]
    So = mesh.shape[outer]
    Si = math.prod(mesh.shape[a] for a in inner)
    E_dom = E_l * Si                                                      # experts per domain
    with jax.named_scope("ep_domains"):
        dom_nX = idx_nX // E_dom
        to_OnX = valid_nX[None] & (dom_nX[None] == jnp.arange(So)[:, None, None])   # copy -> domain o
        send_x = jnp.where(to_OnX.any(-1)[..., None], x_nD[None], jnp.zeros((), x_nD.dtype))     # [So, n, D]
        send_i = jnp.where(to_OnX, idx_nX[None] % E_dom, -1).astype(jnp.int32)                  # [So, n, X]
        send_w = jnp.where(to_OnX, w_nX[None], 0).astype(w_nX.dtype)
        recv_x, recv_i, recv_w = (lax.all_to_all(a, outer, 0, 0, tiled=True) for a in (send_x, send_i, send_w))
    R = So * n
    rows_i = recv_i.reshape(R, X)
    # stage 2: rows from every domain, each with its expert copies in this domain (about X / So of them)
    C2 = int(min(max(1, math.ceil(capacity_factor * R * X / So / Si)), R * min(X, E_l)))
    y_RD = _exchange(recv_x.reshape(R, D), recv_w.reshape(R, X), jnp.maximum(rows_i, 0), rows_i >= 0, inner, Si,
                     E_l, C2, all_axes, weights, impl, segment)
    with jax.named_scope("ep_domains"):
        back = lax.all_to_all(y_RD.reshape(So, n, D), outer, 0, 0, tiled=True)         # my tokens, per domain
    return back.sum(0)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """Expert-parallel `routed_experts` over `mesh`: experts split over `axis` (None: every device holds every
    expert), each expert's FFN width over `ffn_axis` (None: whole experts), `capacity_factor` x mean load rows per
    (sender, destination) bucket. With the experts unsplit and the FFN width split it is tensor-parallel experts:
    each device runs every expert's FFN slice on its token rows, a psum adds the slices."""

    mesh: Mesh
    axis: str | tuple[str, ...] = "ep"
    ffn_axis: str | tuple[str, ...] | None = "tp"
    capacity_factor: float = 2.0
    domain_axis: str | None = None   # hierarchical dispatch: the first expert axis, crossing domains (see above)
    local_impl: str = "grouped"      # the local experts: "grouped" (GPU kernels) or "segment" (XLA:CPU)

    def __post_init__(self):
        if self.local_impl not in ("grouped", "segment"):
            raise ValueError(f"local_impl={self.local_impl!r}: expected 'grouped' or 'segment'")
        if not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor={self.capacity_factor} must be > 0")
        ep, ffn = _axes(self.mesh, self.axis), _axes(self.mesh, self.ffn_axis)
        if set(ep) & set(ffn):
            raise ValueError(f"expert axes {ep} and FFN axes {ffn} share a mesh axis")
        as_list = lambda a: [] if a is None else [a] if isinstance(a, str) else list(a)
        named = as_list(self.axis) + as_list(self.ffn_axis)
        unknown = [a for a in named if a not in self.mesh.shape]
        if unknown:
            raise ValueError(f"ExpertParallel axes {unknown} are not mesh axes; mesh axes: {self.mesh.axis_names}")
        if self.domain_axis is not None and (len(ep) < 2 or ep[0] != self.domain_axis):
            raise ValueError(f"domain_axis={self.domain_axis!r} must be the first of at least two expert axes "
                             f"(expert axes: {ep})")

    # ---- static layout --------------------------------------------------------------------------------------
    @property
    def expert_axes(self) -> tuple[str, ...]:
        return _axes(self.mesh, self.axis)

    @property
    def ffn_axes(self) -> tuple[str, ...]:
        return _axes(self.mesh, self.ffn_axis)

    @property
    def token_axes(self) -> tuple[str, ...]:
        """Mesh axes the token rows are split over: all but the FFN-width axes (in mesh order)."""
        return tuple(a for a in self.mesh.axis_names if self.mesh.shape[a] > 1 and a not in self.ffn_axes)

    @property
    def n_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.expert_axes)

    @property
    def n_token_shards(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.token_axes)

    def rows_per_device(self, n_tokens: int) -> int:
        return -(-n_tokens // self.n_token_shards)

    def capacity(self, n_tokens: int, n_experts: int, top_k: int) -> int:
        """Bucket rows per destination shard for `n_tokens` rows in total: capacity_factor x mean, clipped to
        [1, worst case] where worst case = every local row sends min(top_k, experts per shard) copies."""
        n = self.rows_per_device(n_tokens)
        worst = n * min(top_k, n_experts // self.n_shards)
        return int(min(max(1, math.ceil(self.capacity_factor * n * top_k / self.n_shards)), worst))

    def bucket_loads(self, idx_NX, n_experts: int) -> np.ndarray:
        """Host-side: copies each device would put in each destination bucket, [token shards, n_shards]
        (padding rows excluded). Overflow <=> any entry > capacity(...)."""
        idx = np.asarray(idx_NX)
        N = idx.shape[0]
        n = self.rows_per_device(N)
        dest = idx // (n_experts // self.n_shards)
        loads = np.zeros((self.n_token_shards, self.n_shards), np.int64)
        for t in range(self.n_token_shards):
            d = dest[t * n:(t + 1) * n].ravel()
            loads[t] = np.bincount(d, minlength=self.n_shards)
        return loads

    # ---- the dispatch ---------------------------------------------------------------------------------------
    def _tensor_parallel(self, x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl):
        N = x_ND.shape[0]
        n = self.rows_per_device(N)
        pad = n * self.n_token_shards - N
        if pad:
            x_ND, w_NX = jnp.pad(x_ND, ((0, pad), (0, 0))), jnp.pad(w_NX, ((0, pad), (0, 0)))
            idx_NX = jnp.pad(idx_NX, ((0, pad), (0, 0)))
        ffn, tok_spec = self.ffn_axes, P(self.token_axes or None)

        def body(x, w, idx, gate, up, down):
            y = routed_experts(x, w, idx, *map(local_weight, (gate, up, down)), impl)
            return lax.psum(y, ffn)

        f = jax.shard_map(body, mesh=self.mesh,
                          in_specs=(tok_spec, tok_spec, tok_spec, weight_spec(gate_EDF, P(None, None, ffn)),
                                    weight_spec(up_EDF, P(None, None, ffn)), weight_spec(down_EFD, P(None, ffn, None))),
                          out_specs=tok_spec, check_vma=False)
        y_ND = f(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD)
        return y_ND[:N] if pad else y_ND

    def __call__(self, x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl: str = "xla"):
        N, D = x_ND.shape
        X = idx_NX.shape[1]
        E = gate_EDF.shape[0]
        S = self.n_shards
        if S == 1:  # nothing to dispatch: the local grouped matmul, on FFN-width shards when those are split
            if not self.ffn_axes:
                return routed_experts(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl)
            return self._tensor_parallel(x_ND, w_NX, idx_NX, gate_EDF, up_EDF, down_EFD, impl)
        if E % S:
            raise ValueError(f"{E} experts do not split over {S} expert shards (mesh axes {self.expert_axes})")
        n = self.rows_per_device(N)
        pad = n * self.n_token_shards - N
        valid_N = jnp.arange(N + pad) < N
        if pad:
            x_ND = jnp.pad(x_ND, ((0, pad), (0, 0)))
            w_NX = jnp.pad(w_NX, ((0, pad), (0, 0)))
            idx_NX = jnp.pad(idx_NX, ((0, pad), (0, 0)))
        ep, ffn, tok = self.expert_axes, self.ffn_axes, self.token_axes
        all_axes = tuple(a for a in self.mesh.axis_names if self.mesh.shape[a] > 1)
        E_l = E // S
        ffn_spec = ffn if ffn else None
        hier = self.domain_axis is not None
        seg = self.local_impl == "segment"

        def body(x_nD, w_nX, idx_nX, valid_n, gate, up, down):
            valid_nX = jnp.broadcast_to(valid_n[:, None], idx_nX.shape)
            if not hier:
                out = _exchange(x_nD, w_nX, idx_nX, valid_nX, ep, S, E_l, self.capacity(N, E, X), all_axes,
                                (gate, up, down), impl, seg)
            else:
                out = _hierarchical(x_nD, w_nX, idx_nX, valid_nX, self.domain_axis, ep[1:], self.mesh, E_l,
                                    self.capacity_factor, all_axes, (gate, up, down), impl, seg)
            return lax.psum(out, ffn) if ffn else out

        tok_spec = P(tok or None)
        f = jax.shard_map(body, mesh=self.mesh,
                          in_specs=(tok_spec, tok_spec, tok_spec, tok_spec,
                                    weight_spec(gate_EDF, P(ep or None, None, ffn_spec)),
                                    weight_spec(up_EDF, P(ep or None, None, ffn_spec)),
                                    weight_spec(down_EFD, P(ep or None, ffn_spec, None))),
                          out_specs=tok_spec, check_vma=False)
        y_ND = f(x_ND, w_NX, idx_NX, valid_N, gate_EDF, up_EDF, down_EFD)
        return y_ND[:N] if pad else y_ND
