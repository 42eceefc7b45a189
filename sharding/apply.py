"""Put a model on a mesh: every weight on its logical sharding, and the model's `Runtime` for that mesh.

    mesh = topology.allocate("decode", dp=2, ep=4)
    placed = place(model, mesh, DECODE_RULES)              # a new model; `model` is left as it was
    tokens = jax.device_put(tokens_BT, data_sharding(("batch", "seq"), tokens_BT.shape, mesh, DECODE_RULES))
    logits = jax.jit(lambda m, t: m(t))(placed, tokens)    # GSPMD for dp/tp, shard_map + all_to_all for ep

Loading a checkpoint straight onto a mesh (`checkpoints.load(path, mesh=, rules=)`) uses the same two pieces,
`variable_sharding` per tensor and `runtime_for` once, so weights are placed once, never twice.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.expert_parallel import ExpertParallel
from model.runtime import Runtime
from pallas_kernels.formats import QuantizedTensor
from pallas_kernels.fp8 import Fp8Tensor
from sharding.rules import AxisRules, DECODE_RULES, RulesError, logical_sharding


def expert_parallel(mesh: Mesh, rules: AxisRules, capacity_factor: float = 2.0, local_impl: str = "grouped"
                    ) -> ExpertParallel | None:
    """The expert dispatch for `mesh` under `rules`: experts split over mesh axes (all_to_all), and/or each
    expert's FFN width split (tensor-parallel experts, a psum); None when neither is split. Hierarchical
    (`domain_axis`) when the first of several expert axes is the one that crosses processes (a worker group:
    each of its slices on one host, different slices on different hosts)."""
    ep = tuple(a for a in rules.mesh_axes("experts") if mesh.shape.get(a, 1) > 1)
    ffn = tuple(a for a in rules.mesh_axes("expert_mlp") if mesh.shape.get(a, 1) > 1)
    if not ep and not ffn:
        return None
    return ExpertParallel(mesh, axis=ep or None, ffn_axis=ffn or None, capacity_factor=capacity_factor,
                          domain_axis=domain_axis(mesh, ep), local_impl=local_impl)


def domain_axis(mesh: Mesh, expert_axes: tuple[str, ...]) -> str | None:
    """The first expert axis if it alone separates processes (every slice along it inside one process, the slices
    on several), and other expert axes remain inside each slice; else None."""
    if len(expert_axes) < 2:
        return None
    procs = np.vectorize(lambda d: d.process_index)(mesh.devices)
    rows = np.moveaxis(procs, mesh.axis_names.index(expert_axes[0]), 0).reshape(mesh.shape[expert_axes[0]], -1)
    if all(len(set(r.tolist())) == 1 for r in rows) and len(set(rows[:, 0].tolist())) > 1:
        return expert_axes[0]
    return None


def runtime_for(mesh: Mesh | None, rules: AxisRules | None = None, *, base: Runtime | None = None,
                capacity_factor: float = 2.0) -> Runtime:
    """`base` (kernel choices) with the expert-parallel dispatch of `mesh` under `rules` (None without a mesh);
    the platform defaults to the mesh's devices' (a `Runtime.platform` already set, e.g. "cuda" for an export
    from a CPU host, is kept)."""
    base = base or Runtime()
    if mesh is None:
        return base.replace(expert_parallel=None, mesh=None, rules=None)
    platform = base.platform or mesh.devices.flat[0].platform
    rules = rules or DECODE_RULES
    # XLA:CPU's grouped matmul is a dot over every group: there the local experts run as a loop over live items
    # (the Pallas kernels, interpreted for a GPU plan, keep the grouped path)
    xla_cpu = platform == "cpu" and base.replace(platform=platform).resolved_matmul_impl() == "xla"
    ep = expert_parallel(mesh, rules, capacity_factor, "segment" if xla_cpu else "grouped")
    return base.replace(platform=platform, expert_parallel=ep,
                        mesh=mesh, rules=rules)


def _fp8_sharding(value: Fp8Tensor, axes, mesh: Mesh, rules: AxisRules | None):
    """Codes split like the weight; block scales [*lead, K/bk, N/bn] over the outermost K and N axes. Each shard
    must hold whole scale blocks (its slice of the flattened K / N a multiple of the block)."""
    s = logical_sharding(axes, mesh, rules)
    if axes is None:
        return Fp8Tensor(s, logical_sharding(None, mesh, rules), value.shape, value.lead, value.k_ndim, value.block)
    spec = tuple(s.spec) + (None,) * (len(value.shape) - len(s.spec))
    lead, kn = value.lead, value.k_ndim
    for group, blk, what in ((range(lead, lead + kn), value.block[0], "K"),
                             (range(lead + kn, len(value.shape)), value.block[1], "N")):
        first = group[0]
        if any(spec[i] is not None for i in group if i != first):
            raise RulesError(f"FP8 weight of shape {value.shape}: only the outermost {what} axis may be split, got "
                             f"{spec}")
        names = () if spec[first] is None else (spec[first],) if isinstance(spec[first], str) else spec[first]
        n = int(np.prod([mesh.shape[a] for a in names])) if names else 1
        flat = int(np.prod([value.shape[i] for i in group]))
        if n > 1 and (flat % n or (flat // n) % blk):
            raise RulesError(f"FP8 weight of shape {value.shape} ({value.block[0]}x{value.block[1]} blocks): its "
                             f"{what} extent {flat} does not split into whole blocks over mesh axes {names} "
                             f"({n} shards)")
    scales = logical_sharding(value.scale_axes(axes), mesh, rules)
    return Fp8Tensor(s, scales, value.shape, value.lead, value.k_ndim, value.block)


def variable_sharding(value, axes, mesh: Mesh, rules: AxisRules | None = None):
    """The sharding of a variable's value: `logical_sharding(axes)` for an array; for a block-FP8 `Fp8Tensor` an
    Fp8Tensor of shardings (see `_fp8_sharding`); for an FP4 `QuantizedTensor` of logical axes (..., K, N) a
    QuantizedTensor of shardings: codes [..., Kp/2, N] and block scales [..., Kp/B, N] are split like the weight
    (the packed K axis keeps K's logical name), the tensor scales [...] like its leading axes. A split K axis
    must give every shard whole blocks."""
    if isinstance(value, Fp8Tensor):
        return _fp8_sharding(value, axes, mesh, rules)
    if not isinstance(value, QuantizedTensor):
        return logical_sharding(axes, mesh, rules)
    s = logical_sharding(axes, mesh, rules)
    ts = logical_sharding(None if axes is None else tuple(axes)[:-2], mesh, rules)
    k_part = (tuple(s.spec) + (None,) * len(value.shape))[len(value.shape) - 2]
    names = () if k_part is None else (k_part,) if isinstance(k_part, str) else tuple(k_part)
    n = 1
    for a in names:
        n *= mesh.shape[a]
    if n > 1 and (value.K % (value.block_size * n) or value.scales.shape[-2] % n):
        raise RulesError(f"FP4 weight of shape {value.shape} ({value.fmt}, blocks of {value.block_size} along K): "
                         f"K={value.K} does not split into whole blocks over mesh axes {names} ({n} shards)")
    return QuantizedTensor(s, s, ts, value.fmt, value.shape)


def place(model: nnx.Module, mesh: Mesh, rules: AxisRules = DECODE_RULES, *, runtime: Runtime | None = None,
          capacity_factor: float = 2.0) -> nnx.Module:
    """A copy of `model` with every variable on `logical_sharding(its axes, mesh, rules)` and its runtime set
    for the mesh (`runtime_for`; kernel choices from `runtime`, else the model's own). `model` is unchanged."""
    placed = nnx.clone(model)   # new Variables (the arrays are shared until device_put replaces them)
    for path, var in nnx.iter_graph(placed):
        if not isinstance(var, nnx.Variable):
            continue
        axes = var.get_metadata().get("axes")
        try:
            sharding = variable_sharding(var.get_value(), axes, mesh, rules)
        except ValueError as e:
            raise type(e)(f"{'.'.join(map(str, path))}: {e}") from None
        var.set_value(jax.device_put(var.get_value(), sharding))
    placed.runtime = runtime_for(mesh, rules, base=runtime or model.runtime, capacity_factor=capacity_factor)
    return placed


def data_sharding(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh, rules: AxisRules = DECODE_RULES
                  ) -> NamedSharding:
    """Sharding of an activation/input with logical `axes` (e.g. ('batch', 'seq')) and `shape`. Unlike weights,
    inputs come in any size: mesh axes that do not divide their dimension are dropped (that dimension is then
    split over fewer devices, or replicated)."""
    spec = rules.spec(tuple(axes), mesh)
    parts = []
    for dim, part in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if part is None else (part,) if isinstance(part, str) else tuple(part)
        kept, size = [], 1
        for a in names:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        parts.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return NamedSharding(mesh, PartitionSpec(*parts))
