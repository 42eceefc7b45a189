"""Topology-aware meshes, logical-axis rules and placement (see docs/sharding.md). The model ops that run on a
mesh (expert parallelism) live in `model/`; this package decides where things go."""

from sharding.apply import data_sharding, expert_parallel, place, runtime_for, variable_sharding
from sharding.rules import (DECODE_RULES, LOGICAL_AXES, MESH_AXES, PREFILL_RULES, AxisRules, RulesError,
                            logical_sharding)
from sharding.topology import LinkClass, Placement, PlacementError, Topology

__all__ = ["Topology", "LinkClass", "Placement", "PlacementError", "AxisRules", "RulesError", "PREFILL_RULES",
           "DECODE_RULES", "LOGICAL_AXES", "MESH_AXES", "logical_sharding", "place", "runtime_for",
           "expert_parallel", "variable_sharding", "data_sharding"]
