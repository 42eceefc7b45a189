"""Expert-parallel load balancing (EPLB): redundant copies of hot experts, placed so every EP rank gets about the
same number of token copies, and moved at run time without recompiling.

Wide EP runs at the pace of its most loaded rank. With routing counts per layer and logical expert (`load_LE`),
`balanced_placement` chooses, per MoE layer, which logical expert each of the P = E + R physical slots holds
(`model.moe`: the placement is the data `expert_logical`, with its replica table; the dispatch sends each token
copy to one replica of its expert, rows spread evenly over the replicas). Physical slots are split over the EP
ranks in order (rank r holds slots [r P/S, (r+1) P/S)), as the expert-parallel dispatch already splits experts.

The algorithm is hierarchical when the ranks span several domains (NVLink domains / hosts; `n_domains`):
  1. whole expert groups (the routing's `n_group`: a token's experts come from at most `topk_group` of them) go to
     domains, heaviest group first onto the lightest domain with room — so a token's copies reach few domains;
  2. inside each domain its P / n_domains slots are filled: one per expert, then each extra copy to the expert
     with the highest load per copy;
  3. the copies go to the domain's ranks, heaviest (load / copies) first onto the lightest rank with a free slot,
     preferring a rank that holds no copy of the same expert.
With one domain (or groups that do not divide over the domains) steps 2-3 run over all ranks.

`expand` turns a model with E experts per layer into one with P (a gather of the logical weights into the slots);
`rebalance` moves the slots of a placed model to new placements: one compiled gather per weight shape whose output
has the input's sharding, so the engine's executables keep running on the result (nothing recompiles).
"""

from __future__ import annotations

import heapq

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.deepseek import DeepseekV3
from model.moe import MoE, replica_table, uniform_placement
from pallas_kernels.formats import QuantizedTensor
from pallas_kernels.fp8 import Fp8Tensor


# ---- the placement algorithm (host, numpy) ------------------------------------------------------------------------
def balanced_placement(load_E, n_physical: int, n_ranks: int, *, n_domains: int = 1, n_groups: int = 1
                       ) -> np.ndarray:
    """Physical slot -> logical expert [n_physical] (int32) for one layer with routing counts `load_E`."""
    load = np.asarray(load_E, np.float64)
    E = load.shape[0]
    if n_physical < E or n_physical % n_ranks or n_ranks % n_domains:
        raise ValueError(f"{n_physical} physical experts over {n_ranks} ranks in {n_domains} domains: need "
                         f">= {E} slots, a multiple of the ranks, ranks a multiple of the domains")
    load = load + 1e-9 * load.max(initial=1.0)      # unseen experts still get an order (and their one copy)
    slots_rank = n_physical // n_ranks
    hier = n_domains > 1 and n_groups % n_domains == 0 and E % n_groups == 0 and (
        n_physical // n_domains >= E // n_domains)
    if hier:
        per_group = E // n_groups
        g_load = load.reshape(n_groups, per_group).sum(1)
        room = [n_groups // n_domains] * n_domains
        d_load = [0.0] * n_domains
        members = [[] for _ in range(n_domains)]
        for g in np.argsort(-g_load, kind="stable"):
            d = min((d for d in range(n_domains) if room[d]), key=lambda d: (d_load[d], d))
            room[d] -= 1
            d_load[d] += g_load[g]
            members[d] += list(range(g * per_group, (g + 1) * per_group))
        domains = [np.asarray(m) for m in members]
    else:
        domains, n_domains = [np.arange(E)], 1
    ranks_dom = n_ranks // n_domains
    out = np.empty(n_physical, np.int32)
    for d, experts in enumerate(domains):
        slots = n_physical // n_domains
        if slots < len(experts):
            raise ValueError(f"domain {d}: {len(experts)} experts but {slots} slots")
        copies = np.ones(len(experts), np.int64)
        heap = [(-load[e], i) for i, e in enumerate(experts)]   # load per copy, highest first
        heapq.heapify(heap)
        for _ in range(slots - len(experts)):
            _, i = heapq.heappop(heap)
            copies[i] += 1
            heapq.heappush(heap, (-load[experts[i]] / copies[i], i))
        items = sorted(((load[e] / copies[i], e) for i, e in enumerate(experts) for _ in range(copies[i])),
                       key=lambda t: (-t[0], t[1]))
        r_load, r_items = [0.0] * ranks_dom, [[] for _ in range(ranks_dom)]
        for w, e in items:
            free = [r for r in range(ranks_dom) if len(r_items[r]) < slots_rank]
            fresh = [r for r in free if e not in r_items[r]] or free
            r = min(fresh, key=lambda r: (r_load[r], r))
            r_load[r] += w
            r_items[r].append(e)
        base = d * ranks_dom * slots_rank
        for r, es in enumerate(r_items):
            out[base + r * slots_rank: base + (r + 1) * slots_rank] = sorted(es)
    return out


def choose_placement(load_E, n_physical: int, n_ranks: int, *, n_domains: int = 1, n_groups: int = 1,
                     tolerance: float = 0.05) -> np.ndarray:
    """The hierarchical placement (a token's copies reach fewer domains) unless its max/mean per rank is more
    than `tolerance` worse than the flat one's — pinning whole groups to domains cannot spread a hot group
    (bench.eplb: Zipf 1.4 on ep=32 over 4 domains, 2.57 vs 1.24 flat)."""
    flat = balanced_placement(load_E, n_physical, n_ranks, n_groups=n_groups)
    if n_domains <= 1:
        return flat
    hier = balanced_placement(load_E, n_physical, n_ranks, n_domains=n_domains, n_groups=n_groups)
    ok = imbalance(hier, load_E, n_ranks) <= (1 + tolerance) * imbalance(flat, load_E, n_ranks)
    return hier if ok else flat


def rank_loads(logical_P, load_E, n_ranks: int) -> np.ndarray:
    """Expected token copies per EP rank [n_ranks] under a placement (each expert's load split evenly over its
    replicas, as `model.moe.physical_ids` spreads rows)."""
    logical_P = np.asarray(logical_P)
    load = np.asarray(load_E, np.float64)
    counts = np.bincount(logical_P, minlength=load.shape[0])
    per_slot = load[logical_P] / counts[logical_P]
    return per_slot.reshape(n_ranks, -1).sum(1)


def imbalance(logical_P, load_E, n_ranks: int) -> float:
    """max / mean copies per rank (1.0 = balanced)."""
    r = rank_loads(logical_P, load_E, n_ranks)
    return float(r.max() / max(r.mean(), 1e-30))


# ---- the model side -------------------------------------------------------------------------------------------
def moe_layers(model) -> list[MoE]:
    """The model's MoE modules in layer order (the MTP layer's last)."""
    return [m for _, m in nnx.iter_graph(model) if isinstance(m, MoE)]


def _take(w, src):
    """Expert weights (plain, FP4 or FP8) gathered along the expert axis."""
    if isinstance(w, Fp8Tensor):
        return Fp8Tensor(w.codes[src], w.scales[src], (src.shape[0], *w.shape[1:]), w.lead, w.k_ndim, w.block)
    if isinstance(w, QuantizedTensor):
        return QuantizedTensor(w.codes[src], w.scales[src], w.tensor_scale[src], w.fmt,
                               (src.shape[0], *w.shape[1:]))
    return w[src]


_SLOTS = ("experts_gate_proj", "experts_up_proj", "experts_down_proj")
_TABLES = ("expert_logical", "expert_replicas", "expert_n_replicas")
_is_quant = lambda x: isinstance(x, (QuantizedTensor, Fp8Tensor))   # noqa: E731
_GATHERS: dict = {}


def _gather_slots(weights: tuple, src: np.ndarray) -> tuple:
    """`weights` (a layer's three expert stacks) with slot p taken from slot src[p]: one jitted gather per
    (structure, shapes, shardings), each output on its input's sharding (a placed model stays placed; the
    engine's executables, compiled for those shardings, run on it unchanged)."""
    leaves, tree = jax.tree.flatten(weights)
    shardings = [getattr(a, "sharding", None) for a in leaves]
    named = all(isinstance(sh, jax.sharding.NamedSharding) for sh in shardings)
    key = (tree, tuple((a.shape, str(a.dtype)) for a in leaves), len(src), str(shardings) if named else None)
    fn = _GATHERS.get(key)
    if fn is None:
        out = jax.tree.unflatten(tree, [jax.sharding.NamedSharding(sh.mesh, sh.spec) for sh in shardings]
                                 ) if named else None
        fn = _GATHERS[key] = jax.jit(lambda ws, s: jax.tree.map(lambda w: _take(w, s), ws, is_leaf=_is_quant),
                                     out_shardings=out)
    return fn(weights, jnp.asarray(src, jnp.int32))


def _set_slots(moe: MoE, logical_P: np.ndarray, src: np.ndarray, like: MoE | None = None) -> None:
    """Slot p of `moe` takes the weights of slot src[p] of `like` (default: itself); its tables become
    `logical_P`'s (on the sharding of the router's bias: replicated when placed)."""
    like = like or moe
    moved = _gather_slots(tuple(getattr(like, n).get_value() for n in _SLOTS), src)
    for n, w in zip(_SLOTS, moved):
        getattr(moe, n).set_value(w)
    table, counts = replica_table(logical_P, moe.cfg.n_routed_experts)
    bias = like.e_score_correction_bias.get_value()
    put = (lambda v: jax.device_put(v, bias.sharding)) if hasattr(bias, "sharding") else (lambda v: v)
    for name, v in zip(_TABLES, (logical_P, table, counts)):
        getattr(moe, name).set_value(put(jnp.asarray(v, jnp.int32)))


def expand(model: DeepseekV3, n_redundant: int, placements=None) -> DeepseekV3:
    """A copy of `model` (E experts per MoE layer, no redundant ones) holding E + n_redundant expert slots per
    layer in the uniform placement, or `placements` ([MoE layers, P] slot -> logical expert, `moe_layers`
    order). Loading a checkpoint that way directly: `checkpoints.load(..., redundant_experts=R)`."""
    cfg = model.cfg
    if n_redundant <= 0 or cfg.n_redundant_experts:
        raise ValueError(f"expand: n_redundant={n_redundant} must be > 0 and the model have no redundant experts "
                         f"(it has {cfg.n_redundant_experts})")
    E, P = cfg.n_routed_experts, cfg.n_routed_experts + n_redundant
    new = nnx.eval_shape(lambda: DeepseekV3(cfg.replace(n_redundant_experts=n_redundant), rngs=nnx.Rngs(0),
                                            dtype=model.dtype))
    new.runtime = model.runtime
    src = dict(nnx.to_flat_state(nnx.state(model)))
    for path, var in nnx.to_flat_state(nnx.state(new)):
        if path[-1] not in _SLOTS + _TABLES:
            var.set_value(src[path].get_value())
    old_layers, new_layers = moe_layers(model), moe_layers(new)
    rows = [uniform_placement(E, P)] * len(old_layers) if placements is None else list(placements)
    if len(rows) != len(old_layers):
        raise ValueError(f"{len(rows)} placements for {len(old_layers)} MoE layers")
    for old, moe, logical in zip(old_layers, new_layers, rows):
        logical = np.asarray(logical, np.int32)
        if logical.shape != (P,):
            raise ValueError(f"a placement of {logical.shape} slots; expected ({P},)")
        replica_table(logical, E)   # validates
        _set_slots(moe, logical, logical, like=old)
    return new


def rebalance(model, placements) -> None:
    """Move `model`'s expert slots (in place) to `placements` ([layers, P], `moe_layers` order): slot p takes the
    weights of a slot now holding its new expert (itself when unchanged). The moved arrays keep their shardings."""
    layers = moe_layers(model)
    if len(placements) != len(layers):
        raise ValueError(f"{len(placements)} placements for {len(layers)} MoE layers")
    for moe, new in zip(layers, placements):
        old = np.asarray(jax.device_get(moe.expert_logical.get_value()))
        new = np.asarray(new, np.int32)
        if new.shape != old.shape:
            raise ValueError(f"placement of {new.shape[0]} slots for a layer of {old.shape[0]}")
        replica_table(new, moe.cfg.n_routed_experts)   # validates
        holder = {}
        for p, e in enumerate(old):
            holder.setdefault(int(e), p)
        src = np.asarray([p if old[p] == e else holder[int(e)] for p, e in enumerate(new)], np.int32)
        _set_slots(moe, new, src)
