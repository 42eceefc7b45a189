"""Logical-axis rules: data that maps the model's logical axis names to mesh axes.

Weights declare logical axes once (`model.layers.param(..., axes=...)`); a rule set says which mesh axes each
logical axis is split over. Pools may use different rule sets on the same weights (prefill vs decode).

Conventions:
  * mesh axes are `dp` (data parallel), `ep` (expert parallel), `tp` (tensor parallel); see `MESH_AXES`;
  * a logical axis maps to None (replicated), one mesh axis, or a tuple of mesh axes (split over their product);
  * a mesh axis the mesh does not have, or of size 1, means "replicated" — one rule set serves every mesh shape;
  * unknown logical axes and two axes of one array mapping to the same mesh axis are errors, not silent
    replication.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping, Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model.runtime import LOGICAL_AXES  # the model owns its logical-axis vocabulary

MESH_AXES = ("dp", "ep", "tp")

MeshAxes = str | tuple[str, ...] | None


class RulesError(ValueError):
    """A rule set or an array's logical axes cannot be turned into a sharding."""


def _as_tuple(m: MeshAxes) -> tuple[str, ...]:
    if m is None:
        return ()
    return (m,) if isinstance(m, str) else tuple(m)


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """Logical axis -> mesh axes, stored as a sorted tuple of pairs so the rule set is hashable.

    Build with `AxisRules.of({...})` or `rules.replace(heads="tp", ...)`. Every logical axis in `LOGICAL_AXES`
    must appear (None for replicated) so that a typo or a new model axis is caught instead of replicated.
    """

    name: str
    rules: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self):
        keys = [k for k, _ in self.rules]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise RulesError(f"rule set {self.name!r} maps {dupes} more than once")
        unknown = sorted(set(keys) - LOGICAL_AXES)
        if unknown:
            raise RulesError(f"rule set {self.name!r} has rules for unknown logical axes {unknown}; "
                             f"known: {sorted(LOGICAL_AXES)}")
        missing = sorted(LOGICAL_AXES - set(keys))
        if missing:
            raise RulesError(f"rule set {self.name!r} has no rule for logical axes {missing} (map them to None "
                             "to replicate)")
        for k, mesh_axes in self.rules:
            bad = [a for a in mesh_axes if a not in MESH_AXES]
            if bad:
                raise RulesError(f"rule set {self.name!r}: logical axis {k!r} maps to unknown mesh axes {bad}; "
                                 f"mesh axes are {MESH_AXES}")
            if len(set(mesh_axes)) != len(mesh_axes):
                raise RulesError(f"rule set {self.name!r}: logical axis {k!r} repeats a mesh axis {mesh_axes}")

    @classmethod
    def of(cls, name: str, mapping: Mapping[str, MeshAxes]) -> "AxisRules":
        return cls(name, tuple(sorted((k, _as_tuple(v)) for k, v in mapping.items())))

    def as_dict(self) -> dict[str, tuple[str, ...]]:
        return dict(self.rules)

    def replace(self, name: str | None = None, **changes: MeshAxes) -> "AxisRules":
        d = self.as_dict()
        unknown = sorted(set(changes) - LOGICAL_AXES)
        if unknown:
            raise RulesError(f"unknown logical axes {unknown}; known: {sorted(LOGICAL_AXES)}")
        d.update({k: _as_tuple(v) for k, v in changes.items()})
        return AxisRules.of(name or self.name, d)

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        """Mesh axes for one logical axis (empty = replicated); None (an unnamed dimension) is replicated."""
        if logical is None:
            return ()
        try:
            return dict(self.rules)[logical]
        except KeyError:
            raise RulesError(f"unknown logical axis {logical!r}; known: {sorted(LOGICAL_AXES)}") from None

    def validate(self, axes: Sequence[str | None]) -> None:
        """Raise if `axes` (one array's logical axes) names an unknown axis or maps two dimensions to one mesh
        axis. Checked against the rules, not a mesh: a collision is a bug even where the mesh axis has size 1."""
        seen: dict[str, str] = {}
        for logical in axes:
            for m in self.mesh_axes(logical):
                if m in seen:
                    raise RulesError(f"rule set {self.name!r}: logical axes {seen[m]!r} and {logical!r} of one "
                                     f"array {tuple(axes)} both map to mesh axis {m!r}")
                seen[m] = logical

    def spec(self, axes: Sequence[str | None], mesh: Mesh | None = None) -> PartitionSpec:
        self.validate(axes)
        parts = []
        for logical in axes:
            eff = self._effective(logical, mesh)
            parts.append(None if not eff else eff[0] if len(eff) == 1 else eff)
        return PartitionSpec(*parts)

    def _effective(self, logical: str | None, mesh: Mesh | None) -> tuple[str, ...]:
        m = self.mesh_axes(logical)
        if mesh is None:
            return m
        return tuple(a for a in m if mesh.shape.get(a, 1) > 1)


# Shared by both pools. Attention: heads over tp, the low-rank down-projections (q_a, kv_a) replicated. Dense
# MLPs and shared experts over tp; routed experts over ep with each expert's FFN width over tp; vocab over tp
# (embedding gather and head matmul split by vocabulary rows).
_WEIGHTS = dict(vocab="tp", embed=None, heads="tp", qk_head=None, kv_head=None, v_head=None, q_lora=None,
                kv_lora=None, kv_latent=None, qkv_a=None, mlp="tp", experts="ep", expert_mlp="tp")

# Prefill: few, long sequences. Batch over dp; the sequence over ep, so ep ranks share the attention work of
# one prompt instead of repeating it (the MoE splits the same tokens over ep anyway). Its cache is replicated.
PREFILL_RULES = AxisRules.of("prefill", {**_WEIGHTS, "batch": "dp", "seq": "ep", "pages": None})

# Decode: many sequences, one token each. MLA decode reads a latent cache with no head axis, so splitting heads
# does not split the cache reads. Data-parallel attention: every (dp, ep) device is an attention rank that owns
# its rows *and their KV pages* (the batch and the cache's page axis split the same way), and the routed experts
# are spread over all of them (wide EP over dp x ep): each rank dispatches its own rows to the experts' owners.
# tp ranks (heads) share a rank's rows and pages.
DECODE_RULES = AxisRules.of("decode", {**_WEIGHTS, "batch": ("dp", "ep"), "seq": None, "pages": ("dp", "ep"),
                                       "experts": ("dp", "ep")})


def logical_sharding(axes: Iterable[str | None] | None, mesh: Mesh, rules: AxisRules | None = None
                     ) -> NamedSharding:
    """The NamedSharding of an array with logical `axes` on `mesh` under `rules` (default DECODE_RULES).

    `axes=None` (a weight declared without axes) is replicated.
    """
    rules = DECODE_RULES if rules is None else rules
    if not isinstance(rules, AxisRules):
        raise TypeError(f"rules must be a sharding.rules.AxisRules, got {type(rules).__name__}")
    if axes is None:
        return NamedSharding(mesh, PartitionSpec())
    return NamedSharding(mesh, rules.spec(tuple(axes), mesh))
