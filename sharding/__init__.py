"""Topology-aware meshes, logical-axis rules, expert parallelism (see docs/sharding.md)."""

from sharding.apply import data_sharding, expert_dispatch, install_dispatch, shard_model
from sharding.moe_ep import EPDispatch
from sharding.rules import (DECODE_RULES, LOGICAL_AXES, MESH_AXES, PREFILL_RULES, AxisRules, RulesError,
                            logical_sharding)
from sharding.topology import LinkClass, Placement, PlacementError, Topology

__all__ = ["Topology", "LinkClass", "Placement", "PlacementError", "AxisRules", "RulesError", "PREFILL_RULES",
           "DECODE_RULES", "LOGICAL_AXES", "MESH_AXES", "logical_sharding", "EPDispatch", "shard_model",
           "expert_dispatch", "install_dispatch", "data_sharding"]
