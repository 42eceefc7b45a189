"""Collective bytes per step, read from the engine's executables compiled for fake devices (`StepProfile`)."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

# ---- collective bytes from compiled executables ----------------------------------------------------------------


@dataclasses.dataclass
class StepProfile:
    """Collective result bytes per device per row (decode) or per token (prefill), per layer kind and op, read
    from compiled executables of a real-dims 1 dense + 1 MoE layer cut. Float bytes are stored at 4 bytes per
    element (the profile compiles f32 activations: XLA:CPU would upcast bf16 collectives anyway) and scaled to
    the deployment's activation width; index bytes stay as they are."""

    model: str
    decode_ep: int
    decode_rows: list[int]                    # rows per device of the anchors
    decode: dict[str, dict[str, list[float]]]  # kind -> op -> [float bytes per row, other bytes per row]
    prefill_tp: int
    prefill_tokens: int
    prefill: dict[str, dict[str, list[float]]]  # kind -> op -> [float, other] bytes per token a device holds
    capacity_factor: float
    prefill_ep: int = 0
    prefill_ep_bytes: dict[str, dict[str, list[float]]] = dataclasses.field(default_factory=dict)  # as prefill
    check: dict[str, Any] = dataclasses.field(default_factory=dict)
    compile_s: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> "StepProfile":
        return cls(**d)


def _by_kind(colls: list[dict]) -> dict[str, dict[str, list[float]]]:
    """Sum result bytes per (layer kind, op) of the normal path (the EP dispatch's exact fallback branch, taken
    only when a capacity bucket overflows, and the logits processors' / logprobs' / grammar's branches, taken only
    when a row asks for them, are left out)."""
    from serving.logits import OPTIONAL_SCOPE

    out: dict[str, dict[str, list[float]]] = {}
    for c in colls:
        name = c["op_name"]
        if "ep_fallback" in name or OPTIONAL_SCOPE in name:
            continue
        kind = "dense" if "layer0" in name else "moe" if ("layer1" in name or not name.startswith("jit(")) else "other"
        slot = out.setdefault(kind, {}).setdefault(c["op"], [0.0, 0.0])
        slot[0] += c["float_bytes"]
        slot[1] += c["other_bytes"]
    return out


def _compile_collectives(cfg, pool: str, mesh_spec: dict, *, rows: int = 0, tokens: int = 0,
                         capacity_factor: float = 2.0) -> tuple[dict, float, int]:
    """Compile one executable of an abstract f32 engine (1 dense + 1 MoE layer cut of cfg) on fake CPU devices and
    return (collective bytes by kind/op, compile seconds, devices)."""
    import jax.numpy as jnp

    import checkpoints
    from serving.engine import Engine
    from serving.config import EngineConfig
    from sharding.hlo import collectives
    from sharding.rules import DECODE_RULES, PREFILL_RULES
    from sharding.topology import Topology

    n = math.prod(mesh_spec.values())
    cut = cfg.replace(num_hidden_layers=2, first_k_dense_replace=1, num_nextn_predict_layers=0)
    rules = DECODE_RULES if pool == "decode" else PREFILL_RULES
    import jax

    if len(jax.devices()) < n:
        raise RuntimeError(f"profiling a {pool} pool {mesh_spec} needs {n} devices; jax has {len(jax.devices())} "
                           f"(run through `python -m planner`, which sets the fake device count)")
    mesh = Topology.preset(f"cpu:{n}/1", devices=jax.devices()[:n]).allocate(pool, **mesh_spec)
    model = checkpoints.abstract_model(cut, dtype=jnp.float32, mesh=mesh, rules=rules, capacity_factor=capacity_factor)
    Z, L = 16, 256
    B = rows * n if pool == "decode" else 1
    ec = EngineConfig(page_size=Z, num_pages=n * (max(rows, 1) * (L // Z) + 2) + 1, max_model_len=L,
                      prefill_buckets=(tokens or 16,), decode_buckets=(max(B, 1),), decode_steps=1,
                      decode_windows=(L // Z,))
    eng = Engine(model, ec, mesh=mesh, roles={pool}, compile=False)
    t0 = time.perf_counter()
    low = eng.lower_decode(B, L // Z, 1) if pool == "decode" else eng.lowered()["prefill", 1, tokens]
    exe = low.compile()
    return _by_kind(collectives(exe.as_text(), n)), time.perf_counter() - t0, n


def build_profile(cfg, name: str, *, decode_ep: int = 8, rows: tuple[int, int] = (1, 8), prefill_tp: int = 8,
                  prefill_ep: int = 8, prefill_tokens: int = 256, check_ep: int = 4, capacity_factor: float = 2.0
                  ) -> StepProfile:
    """Compile the anchors: decode at ep=decode_ep with rows[0] and rows[1] rows per device (bytes per row = the
    slope), prefill at tp=prefill_tp and at ep=prefill_ep (the prompt's tokens split over the EP ranks), and a
    check: decode at ep=check_ep, predicted from the slope vs compiled."""
    t0 = time.perf_counter()
    (a, _, _), (b, _, _) = (_compile_collectives(cfg, "decode", dict(ep=decode_ep), rows=r,
                                                 capacity_factor=capacity_factor) for r in rows)
    dr = rows[1] - rows[0]
    decode = {k: {op: [(b[k][op][i] - a.get(k, {}).get(op, [0, 0])[i]) / dr for i in (0, 1)] for op in b[k]}
              for k in b}
    # per token a device holds: TP replicates the chunk's tokens on every device, EP splits them over the ranks
    per_token = lambda pf, t: {k: {op: [v[0] / t, v[1] / t] for op, v in d.items()} for k, d in pf.items()}
    pf, _, _ = _compile_collectives(cfg, "prefill", dict(tp=prefill_tp), tokens=prefill_tokens)
    pe, _, _ = _compile_collectives(cfg, "prefill", dict(ep=prefill_ep), tokens=prefill_tokens,
                                    capacity_factor=capacity_factor)
    prof = StepProfile(name, decode_ep, list(rows), decode, prefill_tp, prefill_tokens,
                       per_token(pf, prefill_tokens), capacity_factor, prefill_ep,
                       per_token(pe, prefill_tokens / prefill_ep))
    if check_ep:
        c, _, _ = _compile_collectives(cfg, "decode", dict(ep=check_ep), rows=rows[1], capacity_factor=capacity_factor)
        comp = sum(v[0] + v[1] for d in c.values() for v in d.values())
        pred = sum(v[0] + v[1] for d in decode.values() for v in d.values()) * rows[1]
        prof.check = {"ep": check_ep, "rows": rows[1], "compiled_bytes": comp, "predicted_bytes": pred,
                      "error": pred / comp - 1 if comp else 0.0}
    prof.compile_s = round(time.perf_counter() - t0, 1)
    return prof
