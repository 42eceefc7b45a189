"""Routing statistics per MoE layer and logical expert, counted inside the engine's executables, and EPLB between
steps (`sharding.eplb`).

Every prefill and decode executable takes the accumulator `load_LE` (int32, [MoE layers, experts], replicated) and
returns it with the dispatch's token copies added — padding rows excluded — so counting costs a bincount per layer
on device and no host synchronisation. The host reads it every `expert_stats_interval` dispatches (into int64
totals, then resets it: int32 never overflows) and on demand (without resetting: in a worker group every process
must run the same device computations, so only the periodic read, which they all make, may reset).

With redundant experts (`ModelConfig.n_redundant_experts`, `checkpoints.load(redundant_experts=R)`) and
`eplb_interval` set, every that many dispatches the engine places the slots from the counts since the last
placement (`sharding.eplb.balanced_placement`, hierarchical over the mesh's domain axis) and moves the weights
(`sharding.eplb.rebalance`: same shapes and shardings, so the compiled executables keep running) when the
predicted max/mean copies per EP rank improves by at least `eplb_min_gain`.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from model.moe import MoE
from sharding import eplb

log = logging.getLogger(__name__)


def moe_paths(model) -> list[tuple]:
    """Graph paths of the model's MoE modules, in `sharding.eplb.moe_layers` order (rows of `load_LE`)."""
    return [p for p, m in nnx.iter_graph(model) if isinstance(m, MoE)]


def counted(call, model, paths: list[tuple], load_LE: jax.Array, valid_N: jax.Array):
    """`call(model)` with its MoE layers' routing choices recorded: (its output, `load_LE` plus the copies of the
    rows where `valid_N` (the rows of every MoE call in it, flattened B x T) per layer and logical expert). A layer
    `call` does not run adds nothing."""
    if not paths:
        return call(model), load_LE
    # a copy at this trace level (a scan body may not mutate a module made outside it; capture sets attributes)
    out, inter = nnx.capture(call, nnx.Intermediate)(nnx.merge(*nnx.split(model)))
    flat = {p: v.get_value() for p, v in nnx.to_flat_state(inter)}
    E = load_LE.shape[1]
    rows = []
    for p in paths:
        got = flat.get(p + ("expert_choices",))
        n = jnp.zeros((E,), jnp.int32)
        for idx_NX in (got if isinstance(got, tuple) else () if got is None else (got,)):
            keep_NX = jnp.where(valid_N.reshape(-1)[:, None], idx_NX, E)   # padding rows count as "E", dropped
            n = n + jnp.bincount(keep_NX.reshape(-1), length=E + 1)[:E].astype(jnp.int32)
        rows.append(n)
    return out, load_LE + jnp.stack(rows)


class ExpertStats:
    """The engine's routing counts: the device accumulator its executables update, host totals, and EPLB."""

    def __init__(self, engine, model):
        self.engine = engine
        self.paths = moe_paths(model)
        mc = model.cfg
        self.shape = (len(self.paths), mc.n_routed_experts)
        self.interval = engine.cfg.expert_stats_interval
        self.total = np.zeros(self.shape, np.int64)       # since start (periodic reads)
        self.window = np.zeros(self.shape, np.int64)      # since the last placement
        self.dispatches = self.rebalances = 0
        self.last_imbalance: list[float] | None = None
        self.placements = self._read_placements(model)    # host copy of each layer's slot -> expert table
        sharding = engine._replicated
        self._zeros = jax.jit(lambda: jnp.zeros(self.shape, jnp.int32), out_shardings=sharding)
        self.load = (jax.ShapeDtypeStruct(self.shape, jnp.int32, sharding=sharding) if engine.abstract
                     else self._zeros())
        ep = model.runtime.expert_parallel
        self.ranks = ep.n_shards if ep is not None else 1
        self.domains = (engine.mesh.shape[ep.domain_axis] if ep is not None and ep.domain_axis else 1)
        if engine.cfg.eplb_interval and not mc.n_redundant_experts:
            raise ValueError("eplb_interval is set but the model has no redundant experts: load it with "
                             "redundant_experts=R (checkpoints.load) or --redundant_experts")
        if engine.cfg.eplb_interval and engine.multiprocess:
            raise ValueError("automatic EPLB in a worker group spanning several processes is not supported yet "
                             "(eplb_interval must be 0 there)")

    # ---- counting ---------------------------------------------------------------------------------------------
    def update(self, load: jax.Array) -> None:
        """After an executable call: its returned accumulator; reads it every `interval` dispatches and runs the
        automatic placement every `eplb_interval`."""
        self.load = load
        self.dispatches += 1
        if self.interval and self.dispatches % self.interval == 0:
            self._read_and_reset()
        every = self.engine.cfg.eplb_interval
        if every and self.dispatches % every == 0:
            self.rebalance(min_gain=self.engine.cfg.eplb_min_gain)

    def _local(self) -> np.ndarray:
        a = self.load
        return np.asarray(a.addressable_shards[0].data if not a.is_fully_addressable else a, np.int64)

    def _read_and_reset(self) -> None:
        host = self._local()
        self.total += host
        self.window += host
        self.load = self._zeros()

    def counts(self) -> np.ndarray:
        """Token copies per MoE layer and logical expert since start, including the dispatches not yet read
        (a device read without reset: call it from the engine's thread, between dispatches)."""
        return self.total + self._local()

    def summary(self) -> dict:
        """For stats and /metrics (host data only: safe from any thread): copies counted as of the last periodic
        read, per layer the max/mean over EP ranks of the copies since the last placement under the current
        placement (over experts without EP), rebalances made."""
        return {"layers": self.shape[0], "experts": self.shape[1], "ep_ranks": self.ranks,
                "copies": int(self.total.sum()), "rebalances": self.rebalances,
                "imbalance": [round(x, 4) for x in self._imbalance(self.window, self.placements)],
                "placed_imbalance": self.last_imbalance}

    # ---- EPLB -------------------------------------------------------------------------------------------------
    def _read_placements(self, model) -> list[np.ndarray] | None:
        if not model.cfg.n_redundant_experts or self.engine.abstract:
            return None
        return [np.asarray(jax.device_get(m.expert_logical.get_value())) for m in eplb.moe_layers(model)]

    def _imbalance(self, window: np.ndarray, placements) -> list[float]:
        out = []
        for i, row in enumerate(window):
            if row.sum() == 0:
                out.append(1.0)
            elif placements is not None:
                out.append(eplb.imbalance(placements[i], row, self.ranks))
            elif self.ranks > 1 and self.shape[1] % self.ranks == 0:
                out.append(eplb.imbalance(np.arange(self.shape[1]), row, self.ranks))
            else:
                out.append(float(row.max() / row.mean()))
        return out

    def rebalance(self, placements=None, min_gain: float = 0.0) -> dict:
        """Place the redundant expert slots from the counts since the last placement (or `placements`, [MoE
        layers, P]) and move the weights between steps. Skipped (returns {"moved": False}) when no layer's
        predicted max/mean per rank improves by `min_gain` (relative) or nothing was counted."""
        eng = self.engine
        mc = eng.model_cfg
        if not mc.n_redundant_experts:
            raise ValueError("rebalance: the model has no redundant experts (load with redundant_experts=R)")
        if eng.multiprocess:
            raise ValueError("rebalance: not supported in a worker group spanning several processes yet")
        window = self.window + self._local()
        old = self.placements
        if placements is None:
            if window.sum() == 0:
                return {"moved": False, "reason": "no routing counted since the last placement"}
            placements = [eplb.choose_placement(row + 1, mc.n_physical_experts, self.ranks, n_domains=self.domains,
                                                n_groups=mc.n_group) for row in window]
        before, after = self._imbalance(window, old), self._imbalance(window, placements)
        gain = max((b - a) / b for b, a in zip(before, after))
        if gain < min_gain:
            return {"moved": False, "reason": f"best gain {gain:.3f} < {min_gain}", "imbalance": before}
        eng.update_weights(lambda model: eplb.rebalance(model, placements))
        self.placements = [np.asarray(p, np.int32) for p in placements]
        self.window[:] = 0
        self.total += self._local()
        self.load = self._zeros()
        self.rebalances += 1
        self.last_imbalance = [round(x, 4) for x in after]
        log.info("%s: EPLB moved expert slots (max/mean copies per rank, worst layer %.3f -> %.3f)", eng.name,
                 max(before), max(after))
        return {"moved": True, "before": before, "after": after}
