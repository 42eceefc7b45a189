"""A worker process's life outside the serving loop: build this process's part of a worker from the flags (engine,
or a group member's share of one; transport; `Worker`), and run it until stopped. Shared by `python -m
serving.worker` and `python -m serving.dynamo`."""

from __future__ import annotations

import json
import logging
import os
import time

import jax
import numpy as np

import checkpoints
from serving import flags as serving_flags
from serving import group as group_mod
from serving import tracing
from serving.build import build_engine, resolve_dtype
from serving.config import default_mesh, parse_mesh_spec
from serving.protocol import read_token
from serving.group_kv import MemberKV, MemberPulls, owner_ranks
from serving.transfer import make_transport
from serving.weights_peer import pull_weights
from serving.worker import ROLE_EXECUTABLES, Worker
from sharding import DECODE_RULES, PREFILL_RULES, Topology

log = logging.getLogger(__name__)


def start(FLAGS, role: str) -> "Worker | None":
    """Build this process's part of a `role` worker from the worker flags: engine (or, in a group, the leader's
    engine with its mirror), transport and `Worker` (not serving yet). A group follower runs the leader's calls to
    the end here and returns None. Shared by `python -m serving.worker` and `python -m serving.dynamo`."""
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        jax.config.update("jax_num_cpu_devices", FLAGS.devices)  # before the backend starts; CPU only
    if FLAGS.compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", FLAGS.compilation_cache_dir)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    t0 = time.perf_counter()
    ckpt = serving_flags.checkpoint(FLAGS)
    mcfg = checkpoints.config_of(ckpt)
    group = spec = None
    if FLAGS.weights_from and FLAGS.num_processes > 1:
        raise ValueError("--weights_from is for single-process workers; a worker group reads the checkpoint")
    if FLAGS.num_processes > 1:   # checked before jax.distributed starts, then agreed on before any compile
        spec = group_mod.GroupSpec(FLAGS.coordinator_address or "", FLAGS.num_processes, FLAGS.process_id,
                                   fence_s=FLAGS.fence_s, init_timeout_s=FLAGS.group_timeout_s,
                                   step_timeout_s=FLAGS.group_step_timeout_s)
        if FLAGS.mesh:
            group_mod.check_mesh_fits(spec, int(np.prod(list(parse_mesh_spec(FLAGS.mesh).values()))), FLAGS.devices)
        group = group_mod.join(spec)
    mesh_spec = FLAGS.mesh or default_mesh(role, len(jax.devices()), mcfg.num_attention_heads, mcfg.n_routed_experts)
    ecfg = serving_flags.engine_config(mcfg, FLAGS)
    if group is not None:
        group.agree(group_mod.settings_of(role=role, mesh=mesh_spec, model=mcfg, engine=ecfg, dtype=FLAGS.dtype,
                                          quant=FLAGS.quant, devices=FLAGS.devices, transport=FLAGS.transport,
                                          group_kv=FLAGS.group_kv))
    topo = Topology.from_devices()
    mesh = topo.allocate(role, **parse_mesh_spec(mesh_spec), allow_cross_domain=FLAGS.allow_cross_domain)
    domains = sorted({topo.domain_of[i] for i in topo.placement(role).device_ids.ravel()})
    if role == "decode" and len(domains) > 1 and mesh.shape["dp"] * mesh.shape["ep"] > 1:
        log.warning("decode mesh %s over domains %s: attention ranks and routed experts span every dp x ep device "
                    "(wide EP), so the MoE all-to-all crosses domains (per-step bytes: python -m bench.group_comm)",
                    mesh_spec, domains)
    token = read_token(FLAGS.token_file)
    transport = make_transport(FLAGS.transport, FLAGS.host, FLAGS.transfer_port, token)
    model, weights = None, {"source": "checkpoint"}
    if FLAGS.weights_from:   # a running worker's weights over the transfer server; the checkpoint if that fails
        model, weights = pull_weights(FLAGS.weights_from, token=token, transport=transport, checkpoint=ckpt,
                                      dtype=resolve_dtype(FLAGS.dtype, mesh, name=role), quant=FLAGS.quant,
                                      redundant_experts=ecfg.redundant_experts, timeout_s=FLAGS.weights_timeout_s)
    engine = build_engine(ecfg, mesh=mesh,
                          rules=PREFILL_RULES if role == "prefill" else DECODE_RULES, name=role, roles=ROLE_EXECUTABLES[role],
                          checkpoint=ckpt if model is None else None, model=model, dtype=FLAGS.dtype, quant=FLAGS.quant,
                          kv_memory_fraction=FLAGS.kv_memory_fraction, device_memory_gb=FLAGS.device_memory_gb,
                          progress=True)
    group_info = None
    owners = owner_ranks(engine) if group is not None and role == "decode" and FLAGS.group_kv == "member" else None
    if group is not None:
        member_kv = None
        if owners and not spec.leader:   # pulls the KV of its own ranks (before the barrier: the leader asks)
            member_kv = MemberKV(group, engine, transport, host=FLAGS.host, pull_timeout_s=FLAGS.pull_timeout_s,
                                 verify_checksums=FLAGS.verify_checksums, lease_s=FLAGS.lease_s)
        group.start_heartbeats(FLAGS.host)   # also a barrier: returns once every member has built its engine
        if not spec.leader:
            print("TANDEM_GROUP_MEMBER_READY " + json.dumps({"process_id": spec.process_id, "mesh": mesh_spec,
                                                             "startup_s": round(time.perf_counter() - t0, 2)}),
                  flush=True)
            rx = group.receiver(member_kv)
            group.count_compiles()   # reported with its heartbeats: the leader's health shows every member's
            n = group_mod.follow(engine, rx)
            log.info("follower %d ran %d calls; exiting", spec.process_id, n)
            if member_kv is not None:
                member_kv.close()
            group.close()
            return None
        engine.mirror = group.mirror(FLAGS.host)
        ep = engine.runtime.expert_parallel
        group_info = {"num_processes": spec.num_processes, "coordinator": spec.coordinator_address,
                      "fence_s": spec.fence_s, "devices": len(mesh.devices.flat),
                      "channels": [engine.mirror.address, group.beat_address],
                      "moe_dispatch": f"hierarchical over {ep.domain_axis!r}" if getattr(ep, "domain_axis", None)
                      else "flat" if ep is not None else None}
        log.info("group of %d processes, mesh %s, MoE dispatch %s", spec.num_processes, mesh_spec,
                 group_info["moe_dispatch"])
    w = Worker(role, engine, host=FLAGS.host, port=FLAGS.port, transport=transport, token=token,
               lease_s=FLAGS.lease_s, pull_timeout_s=FLAGS.pull_timeout_s, verify_checksums=FLAGS.verify_checksums,
               eos_ids=mcfg.eos_token_ids, fault_pull_delay_s=FLAGS.fault_pull_delay_s,
               fault_step_delay_s=FLAGS.fault_step_delay_s, group_info=group_info,
               overlap_decode=FLAGS.overlap_decode)
    w.group, w.mesh_spec, w.checkpoint, w.weights = group, mesh_spec, ckpt, weights
    w.fault_corrupt_pages = FLAGS.fault_corrupt_pages
    if group is not None:
        w.busy_hook = group.busy
        if owners:   # KV straight into the member owning the request's rank (serving.group_kv)
            w.members = MemberPulls(group, owners)
            log.info("KV into this group: pulled by the member owning each request's rank (ranks per process: %s)",
                     {p: len(r) for p, r in owners.items()})
    tracing.configure(f"tandem-{role}-worker", endpoint=FLAGS.otlp_traces_endpoint, forward=True)
    w.count_compiles()   # from here on, any XLA compile is on the request path (reported in health_ok)
    w.startup_s = round(time.perf_counter() - t0, 2)
    return w


def run(w: "Worker") -> None:
    """Serve until stopped; a group's leader that fails fences its group (the router migrates); then close."""
    group = w.group
    try:
        w.serve_forever()
    except BaseException as e:
        if group is not None:   # the members' state is no longer known to agree: fence (the router migrates)
            group.on_fence(f"leader failed: {type(e).__name__}: {e}")
        raise
    finally:
        if group is not None:
            w.engine.mirror.stop()
            group.close()
        w.close()
