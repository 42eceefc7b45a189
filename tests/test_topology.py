"""Topology, pool placement and logical-axis rules (no model, no compilation)."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from sharding import (DECODE_RULES, PREFILL_RULES, AxisRules, PlacementError, RulesError, Topology,
                      logical_sharding)


def _domain_ids(topo, mesh):
    index = {d: i for i, d in enumerate(topo.devices)}
    return np.vectorize(lambda d: topo.domain_of[index[d]])(mesh.devices)


def _groups_in_one_domain(topo, mesh) -> bool:
    dom = _domain_ids(topo, mesh)  # [dp, ep, tp]
    tp_ok = all(len(set(dom[a, b, :])) == 1 for a in range(dom.shape[0]) for b in range(dom.shape[1]))
    ep_ok = all(len(set(dom[a, :, c])) == 1 for a in range(dom.shape[0]) for c in range(dom.shape[2]))
    return tp_ok and ep_ok


# ---- topology ----------------------------------------------------------------------------------------------
def test_cpu_preset_declares_equal_domains_over_fake_devices():
    topo = Topology.preset("cpu:8/2")
    assert topo.bound and topo.devices == tuple(jax.devices()[:8])
    assert topo.domains == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert topo.link(0, 3) == topo.in_domain and topo.link(3, 4) == topo.cross_domain


def test_gpu_presets_describe_hosts_domains_and_bandwidths():
    b200 = Topology.preset("hgx-b200", hosts=4)
    assert len(b200.devices) == 32 and len(b200.hosts) == 4 and [len(d) for d in b200.domains] == [8] * 4
    assert b200.in_domain.gbytes_per_s == 1800.0 and b200.cross_domain.gbytes_per_s == 50.0
    nvl = Topology.preset("gb200-nvl72")
    assert len(nvl.hosts) == 18 and nvl.domains == (tuple(range(72)),)
    assert Topology.preset("h100-8").in_domain.gbytes_per_s == 900.0
    with pytest.raises(ValueError, match="unknown topology preset"):
        Topology.preset("dgx-9000")


def test_from_devices_groups_cpu_devices_by_host():
    topo = Topology.from_devices()
    assert len(topo.devices) == len(jax.devices()) and len(topo.hosts) == 1 and len(topo.domains) == 1
    assert [len(d) for d in Topology.from_devices(domain_size=4).domains] == [4] * (len(jax.devices()) // 4)


def test_pools_get_disjoint_devices_with_groups_inside_one_domain():
    topo = Topology.preset("cpu:8/2")
    prefill = topo.allocate("prefill", ep=4)
    decode = topo.allocate("decode", dp=2, tp=2)
    assert prefill.axis_names == ("dp", "ep", "tp") and dict(prefill.shape) == {"dp": 1, "ep": 4, "tp": 1}
    assert not set(prefill.devices.ravel()) & set(decode.devices.ravel())
    assert _groups_in_one_domain(topo, prefill) and _groups_in_one_domain(topo, decode)
    assert not topo.placement("decode").cross_domain and "inside one domain" in topo.placement("decode").report
    assert topo.free() == []


def test_blocks_of_a_pool_go_to_best_fitting_domains():
    topo = Topology.preset("cpu:8/2")
    topo.allocate("small", ep=2)                      # leaves 2 free in domain 0, 4 in domain 1
    mesh = topo.allocate("next", dp=2, ep=2)          # one block in each hole, none split
    assert _groups_in_one_domain(topo, mesh)


def test_group_larger_than_any_domain_is_refused_with_reason():
    topo = Topology.preset("cpu:8/2")
    with pytest.raises(PlacementError, match=r"larger than any domain \(4 devices\).*allow_cross_domain"):
        topo.allocate("decode", ep=8)
    with pytest.raises(PlacementError, match="cannot keep every TP and EP group"):
        topo.allocate("decode", ep=2, tp=4)


def test_fragmented_domains_are_refused_unless_cross_domain_allowed():
    topo = Topology.preset("cpu:8/2")
    topo.allocate("a", ep=2)
    topo.allocate("b", ep=2)                          # best fit: domain 0 again, which is now full
    assert {topo.domain_of[i] for i in topo.placement("b").device_ids.ravel()} == {0}
    topo.allocate("c", ep=2)                          # domain 1
    topo.release("b")                                 # 2 free in each domain: ep=4 would have to span both
    with pytest.raises(PlacementError, match=r"free devices per domain are \[2, 2\]"):
        topo.allocate("d", ep=4)
    mesh = topo.allocate("d", ep=4, allow_cross_domain=True)
    p = topo.placement("d")
    assert p.ep_cross_domain and not p.tp_cross_domain and p.link == topo.cross_domain
    assert "EP groups span domains" in p.report
    assert not _groups_in_one_domain(topo, mesh)


def test_cross_domain_placement_keeps_tp_groups_inside_domains():
    topo = Topology.preset("cpu:8/2")
    mesh = topo.allocate("decode", ep=4, tp=2, allow_cross_domain=True)
    dom = _domain_ids(topo, mesh)
    assert all(len(set(dom[0, e, :])) == 1 for e in range(4))   # every TP pair in one domain
    assert topo.placement("decode").ep_cross_domain


def test_impossible_requests_raise():
    topo = Topology.preset("cpu:8/2")
    with pytest.raises(PlacementError, match="needs dp\\*ep\\*tp = 2\\*4\\*2 = 16 devices; only 8"):
        topo.allocate("p", dp=2, ep=4, tp=2)
    with pytest.raises(PlacementError, match="positive integer"):
        topo.allocate("p", tp=0)
    topo.allocate("p", tp=2)
    with pytest.raises(PlacementError, match="already allocated"):
        topo.allocate("p", tp=2)


def test_declared_topology_plans_but_does_not_build_meshes():
    nvl = Topology.preset("gb200-nvl72", hosts=2)
    p = nvl.plan("decode", ep=64)
    assert not p.cross_domain and p.link.name == "nvlink5"
    assert not nvl.plan("decode", dp=2, ep=36).cross_domain
    assert Topology.preset("hgx-b200", hosts=4).plan("decode", ep=16, allow_cross_domain=True).ep_cross_domain
    with pytest.raises(PlacementError, match="planning only"):
        nvl.allocate("decode", ep=8)


# ---- rules --------------------------------------------------------------------------------------------------
def test_rules_map_weights_to_mesh_axes():
    mesh = Topology.preset("cpu:8/1").allocate("x", ep=4, tp=2)
    assert logical_sharding(("experts", "embed", "expert_mlp"), mesh, DECODE_RULES).spec == P("ep", None, "tp")
    assert logical_sharding(("q_lora", "heads", "qk_head"), mesh, DECODE_RULES).spec == P(None, "tp", None)
    assert logical_sharding(("embed", "q_lora"), mesh, DECODE_RULES).spec == P(None, None)   # low rank: replicated
    assert logical_sharding(None, mesh, DECODE_RULES).spec == P()


def test_absent_or_size_one_mesh_axes_mean_replicated():
    mesh = Topology.preset("cpu:8/1").allocate("x", tp=2)             # ep has size 1
    assert logical_sharding(("experts", "embed", "expert_mlp"), mesh, DECODE_RULES).spec == P(None, None, "tp")
    other = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tp",))  # no dp/ep axes at all
    assert logical_sharding(("batch", "embed"), other, DECODE_RULES).spec == P(None, None)


def test_prefill_and_decode_rules_differ_in_layout_and_expert_width_only():
    """Decode: data-parallel attention (batch and KV pages over dp x ep) and wide EP (experts over dp x ep);
    every other weight is placed the same in both pools."""
    diff = {k for k, v in PREFILL_RULES.as_dict().items() if DECODE_RULES.as_dict()[k] != v}
    assert diff == {"batch", "seq", "pages", "experts"}
    assert DECODE_RULES.mesh_axes("pages") == DECODE_RULES.mesh_axes("batch") == ("dp", "ep")


def test_unknown_logical_axis_is_an_error():
    mesh = Topology.preset("cpu:8/1").allocate("x", tp=2)
    with pytest.raises(RulesError, match="unknown logical axis 'hedas'"):
        logical_sharding(("embed", "hedas"), mesh, DECODE_RULES)
    with pytest.raises(RulesError, match="unknown logical axes"):
        DECODE_RULES.replace(hedas="tp")
    with pytest.raises(RulesError, match="no rule for logical axes"):
        AxisRules.of("partial", {"heads": "tp"})
    with pytest.raises(RulesError, match="unknown mesh axes"):
        DECODE_RULES.replace(heads="model")


def test_two_axes_of_one_array_on_one_mesh_axis_is_an_error():
    bad = DECODE_RULES.replace("bad", experts=("ep", "tp"))          # expert_mlp is on tp too
    mesh = Topology.preset("cpu:8/1").allocate("x", ep=4)             # even where tp has size 1
    with pytest.raises(RulesError, match="'experts' and 'expert_mlp'.*mesh axis 'tp'"):
        logical_sharding(("experts", "embed", "expert_mlp"), mesh, bad)
    assert logical_sharding(("experts", "embed"), mesh, bad).spec == P("ep", None)


def test_replica_groups_and_their_cross_domain_share():
    from sharding.hlo import collectives, cross_domain_fraction, replica_groups

    assert replica_groups("x = f32[8] all-to-all(y), replica_groups=[2,8]<=[16]", 16) == [
        list(range(8)), list(range(8, 16))]
    assert replica_groups("x = f32[8] all-to-all(y), replica_groups=[8,2]<=[2,8]T(1,0)", 16)[:2] == [[0, 8], [1, 9]]
    assert replica_groups("x = f32[8] all-gather(y), replica_groups={{0,1},{2,3}}", 4) == [[0, 1], [2, 3]]
    assert replica_groups("x = f32[8] collective-permute(y), source_target_pairs={{0,1},{1,2}}", 4) == [
        [0, 1], [1, 2]]
    dom = [i // 8 for i in range(16)]          # 2 hosts x 8 devices
    assert cross_domain_fraction([list(range(16))], dom) == pytest.approx(8 / 15)
    assert cross_domain_fraction([list(range(8)), list(range(8, 16))], dom) == 0.0
    assert cross_domain_fraction([[7, 8], [0, 1]], dom, permute=True) == 0.5
    hlo = ("%a2a = bf16[16,64]{1,0} all-to-all(bf16[16,64]{1,0} %p), replica_groups=[1,16]<=[16], dimensions={0}\n"
           "%ag = f32[8]{0} all-gather(f32[1]{0} %q), replica_groups=[2,8]<=[16], dimensions={0}\n")
    a2a, ag = collectives(hlo, 16, dom)
    assert a2a["cross_wire"] == pytest.approx(a2a["wire"] * 8 / 15) and a2a["wire"] > 0
    assert ag["cross_wire"] == 0.0 and ag["wire"] > 0


def test_group_decode_step_bytes_are_split_by_domain(tmp_path):
    """bench.group_comm: a real 2-process group (2 x 2 devices, tiny model, wide EP over dp=4) — the MoE
    collectives cross the two hosts, so part but not all of the step's bytes are cross-domain."""
    import json
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "bench.group_comm", "--config=tiny", "--devices=2", "--mesh=dp=4",
                        "--batch=8", "--context=256", "--timeout_s=120", f"--json_out={tmp_path}/r.json"], cwd=root,
                       capture_output=True, text=True, timeout=180, env=dict(os.environ, PYTHONPATH=root))
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.load(open(tmp_path / "r.json"))
    assert r["processes"] == 2 and "domain(s) [0, 1]" in r["placement"]
    assert 0 < r["step_cross_bytes"] < r["step_bytes"], r
    assert r["sums"]["moe/cross"] > 0
