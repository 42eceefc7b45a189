"""Worker groups (serving/group.py): one decode engine over 2 processes x 4 CPU devices (jax.distributed, gloo),
driven by its leader behind the router — tokens equal to the single-device colocated engine, settings agreed
before any compile, and a killed member fencing the whole group within a bound while its requests migrate."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import pytest

import checkpoints
import hf_reference
from serving import LLM, SamplingParams
from serving.group import Group, GroupSpec
from test_pd_multiprocess import (EC, PROMPTS, ROOT, TOKEN, Proc, _free_port, check_drained, control, router_cfg,
                                  wait_ready)

FENCE_S = 3.0


class Member(Proc):
    """One process of a worker group: 4 CPU devices of its own (jax_num_cpu_devices), no forced device count."""

    def start(self):
        env = dict(os.environ, XLA_FLAGS=os.environ["TANDEM_TEST_XLA_FLAGS"], TANDEM_TOKEN=TOKEN, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
        self.p = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=open(self.log, "a"),
                                  stderr=subprocess.STDOUT)


def start_group(ckpt, tmp, mesh, *extra, n=2, devices=4):
    coord = f"127.0.0.1:{_free_port()}"
    return [Member("decode", ckpt, tmp, f"--devices={devices}", f"--mesh={mesh}", f"--coordinator_address={coord}",
                   f"--num_processes={n}", f"--process_id={k}", f"--fence_s={FENCE_S}", "--group_timeout_s=90",
                   *extra) for k in range(n)]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("group_ckpt"))
    hf_reference.build(path, dict(num_hidden_layers=2, max_position_embeddings=128), seed=11)
    return path


@pytest.fixture(scope="module")
def group(ckpt, tmp_path_factory):
    """A dp=4,ep=2 decode group (2 processes x 4 devices) and a plain 1-device decode worker to migrate to."""
    tmp = str(tmp_path_factory.mktemp("group_run"))
    members = start_group(ckpt, tmp, "dp=4,ep=2")
    solo = Proc("decode", ckpt, tmp)
    yield {"leader": members[0], "members": members, "solo": solo, "tmp": tmp}
    for w in members + [solo]:
        if w.p.poll() is None:
            w.kill()


@pytest.fixture(scope="module")
def colocated(ckpt, group):
    model = checkpoints.load(ckpt, dtype=jnp.float32)
    llm = LLM(model=model, engine_config=EC)
    wait_ready([group["leader"], group["solo"]], timeout=240)
    yield llm
    llm.close()


def test_group_equals_single_device_colocated(ckpt, group, colocated):
    L = group["leader"]
    params = [SamplingParams(max_tokens=8), SamplingParams(max_tokens=8, temperature=0.8, top_p=0.9, seed=123),
              SamplingParams(max_tokens=5), SamplingParams(max_tokens=8)]
    want = colocated.generate(PROMPTS, params)
    with LLM(workers=[L.addr], router_config=router_cfg()) as llm:
        got = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    # the README's batch job against the group's leader
    inp, out = os.path.join(group["tmp"], "in.jsonl"), os.path.join(group["tmp"], "out.jsonl")
    with open(inp, "w") as f:
        for i, p in enumerate(PROMPTS):
            f.write(json.dumps({"id": f"q{i}", "prompt_token_ids": p, "max_tokens": 8}) + "\n")
    job = subprocess.run([sys.executable, "-m", "serving.batch", f"--workers={L.addr}", f"--checkpoint={ckpt}",
                          f"--input={inp}", f"--output={out}"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, TANDEM_TOKEN=TOKEN, JAX_PLATFORMS="cpu"))
    assert job.returncode == 0, job.stdout[-2000:] + job.stderr[-2000:]
    rows = {r["id"]: r for r in map(json.loads, open(out))}
    want8 = colocated.generate(PROMPTS, SamplingParams(max_tokens=8))
    assert [rows[f"q{i}"]["token_ids"] for i in range(len(PROMPTS))] == [o.token_ids for o in want8]
    h = control(L.addr, "stats")
    assert h["group"]["num_processes"] == 2 and h["group"]["devices"] == 8, h["group"]
    assert h["group"]["moe_dispatch"] == "hierarchical over 'dp'", h["group"]   # dp slices = the two processes
    # every listener of the group on 127.0.0.1 by default: step channel, heartbeats, jax's coordinator
    assert all(a.startswith("127.0.0.1:") for a in h["group"]["channels"]), h["group"]
    assert "distributed service on 127.0.0.1:" in open(L.log).read(), "the coordinator binds the given address"
    assert h["metrics"].get("compiles", 0) == 0          # everything compiled at start-up, on every member:
    assert h["group"]["member_compiles"] == {"1": 0}, h["group"]   # the follower's count, from its heartbeats
    check_drained([L.addr])
    assert all(m.p.poll() is None for m in group["members"])


def test_prefill_group_to_decode_group_equals_colocated(ckpt, group, colocated):
    """A tp=4 prefill group over 2 processes x 2 devices (TP crosses the two hosts) hands prefixes to the dp=4,ep=2
    decode group: every prompt prefilled remotely, tokens equal to colocated, leases and pages drained."""
    coord = f"127.0.0.1:{_free_port()}"
    pre = [Member("prefill", ckpt, group["tmp"], "--devices=2", "--mesh=tp=4", "--allow_cross_domain",
                  f"--coordinator_address={coord}", "--num_processes=2", f"--process_id={k}",
                  f"--fence_s={FENCE_S}", "--group_timeout_s=90") for k in range(2)]
    try:
        wait_ready(pre[:1], timeout=240)
        L = group["leader"]
        early = control(L.addr, "stats")["metrics"].get("parts_pulled_early", 0)
        with LLM(workers=[pre[0].addr, L.addr], router_config=router_cfg()) as llm:
            # 4 requests (the leader's ranks 0-3), then 8 (the rest reach the follower's ranks 4-7)
            for prompts in (PROMPTS, PROMPTS + [p[::-1] for p in PROMPTS]):
                want = colocated.generate(prompts, SamplingParams(max_tokens=8))
                got = llm.generate(prompts, SamplingParams(max_tokens=8))
                assert [o.token_ids for o in got] == [o.token_ids for o in want]
            m = llm.backend.router.snapshot()["metrics"]
        assert m["transfers"] == m["remote_prefills"] >= 8, m   # the rest prefilled on the decode group
        check_drained([pre[0].addr, L.addr])
        # KV straight into the member owning each request's rank: the follower pulled the prefixes of its own ranks
        # from the prefill group (checked, kept) and their inserts carried a reference; the leader relayed nothing
        h = control(L.addr, "stats")
        mirror, got = h["group"]["mirror"], h["metrics"].get("member_pulls", 0)
        assert h["group"]["kv_into"] == "members" and got >= 1, h
        assert mirror["held_sent"] >= got and mirror["data_sent"] == 0 and mirror["data_skipped"] > 0, mirror
        # a 20-token prompt (or its reverse) prefilled remotely runs in 2 chunks: its first 2 pages stream group ->
        # group, pulled ahead by the member that takes the request; the follower holds nothing afterwards
        n, end = m.get("kv_parts_streamed", 0), time.monotonic() + 10
        while True:   # (the follower's counters come with its heartbeats)
            fk = control(L.addr, "stats")["group"]["member_kv"].get("1", {})
            ahead = h["metrics"].get("parts_pulled_early", 0) - early + fk.get("parts_pulled_early", 0)
            if (fk.get("pulls") == got and fk.get("held") == 0) or time.monotonic() > end:
                break
            time.sleep(0.2)
        assert n >= 1 and ahead == n and fk.get("parts_pulled_late", 0) == 0, (m, fk)
        assert fk["pulls"] == got and fk["held"] == 0 and fk["pieces_inserted"] >= got, fk
        assert control(pre[0].addr, "stats")["metrics"].get("compiles", 0) == 0
    finally:
        for w in pre:
            if w.p.poll() is None:
                w.kill()


def test_members_that_disagree_stop_before_compiling(ckpt, tmp_path):
    """Different page sizes: both members stop with one error naming the field, before loading or compiling."""
    coord = f"127.0.0.1:{_free_port()}"
    common = ["--devices=2", "--mesh=dp=2,ep=2", f"--coordinator_address={coord}", "--num_processes=2",
              "--group_timeout_s=60"]
    a = Member("decode", ckpt, str(tmp_path), *common, "--process_id=0")
    b = Member("decode", ckpt, str(tmp_path), *common, "--process_id=1", "--page_size=16")
    for m in (a, b):
        m.p.wait(timeout=90)
        assert m.p.returncode != 0
        log = m.tail()
        assert "group members disagree" in log and "page_size=16" in log, log
        assert "compiled" not in log, log


def test_bad_group_configuration_is_named(ckpt, tmp_path):
    # process counts that do not fit the mesh: refused before jax.distributed starts
    m = Member("decode", ckpt, str(tmp_path), "--devices=4", "--mesh=dp=4,ep=4",
               f"--coordinator_address=127.0.0.1:{_free_port()}", "--num_processes=2", "--process_id=1")
    m.p.wait(timeout=60)
    assert m.p.returncode != 0 and "2 processes x 4 devices = 8" in m.tail(), m.tail()
    # a follower whose coordinator never answers: a timeout naming the address
    port = _free_port()
    m = Member("decode", ckpt, str(tmp_path), "--devices=4", "--mesh=dp=4,ep=2",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", "--process_id=1",
               "--group_timeout_s=2")
    m.p.wait(timeout=60)
    assert m.p.returncode != 0 and f"coordinator 127.0.0.1:{port} unreachable" in m.tail(), m.tail()


def test_killed_follower_fences_the_group_and_requests_migrate(group, colocated):
    """kill -9 of the follower mid-generation: the leader fences itself within the bound (no process left blocked
    in a collective), the router marks the group dead, its requests finish on the other worker, tokens equal;
    the restarted group rejoins and serves."""
    L, F, solo = group["leader"], group["members"][1], group["solo"]
    n = 40
    prompts = PROMPTS + [p[::-1] for p in PROMPTS]
    want = [o.token_ids for o in colocated.generate(prompts, SamplingParams(max_tokens=n, ignore_eos=True))]
    with LLM(workers=[L.addr, solo.addr], router_config=router_cfg()) as llm:
        t0 = time.monotonic()
        reqs = [llm.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
        llm.backend.router.wait_until(lambda s: any(r["decode"] == L.addr and r["tokens"] >= 4 and r["state"] ==
                                             "decoding" for r in s["requests"].values()), 60)
        t_kill = time.monotonic()
        F.kill()
        L.p.wait(timeout=4 * FENCE_S)                   # the leader fences itself: exits on its own
        fence_s = time.monotonic() - t_kill
        assert L.p.returncode == 3, (L.p.returncode, L.tail())
        why = next(l for l in L.tail().splitlines() if l.startswith("TANDEM_GROUP_FENCED"))
        print(f"group fenced {fence_s:.2f}s after kill -9 of a follower (fence_s={FENCE_S}): {why[:160]}")
        for _ in llm._stream(reqs):
            assert time.monotonic() - t0 < 90
        migrated = [r for r in reqs if L.addr in r.workers and r.workers[-1] == solo.addr]
        assert migrated, [r.workers for r in reqs]
        assert [r.output_ids for r in reqs] == want
        assert all(r.finish_reason == "length" for r in reqs)
        assert llm.backend.router.snapshot()["metrics"]["worker_deaths"] >= 1
        check_drained([solo.addr])
        # the restarted group (both members, same flags) rejoins as a new incarnation and takes traffic
        for m in group["members"]:
            m.start()
        llm.backend.router.wait_until(lambda s: s["workers"][L.addr]["alive"], 240)
        reqs = [llm.submit(p, SamplingParams(max_tokens=n, ignore_eos=True)) for p in prompts]
        for _ in llm._stream(reqs):
            pass
        assert L.addr in {r.workers[-1] for r in reqs}
        assert [r.output_ids for r in reqs] == want
    check_drained([solo.addr, L.addr])


def test_hung_follower_is_fenced_by_heartbeats(ckpt, colocated, tmp_path):
    """The dp=2,ep=4 layout equals colocated too; then SIGSTOP of the follower (alive, silent: no socket error
    tells anyone) — the leader's heartbeat watch fences it within fence_s + one beat, and the follower, once
    continued, finds the leader gone and exits as well: no member left running."""
    L, F = members = start_group(ckpt, str(tmp_path), "dp=2,ep=4")
    try:
        wait_ready([L], timeout=240)
        want = colocated.generate(PROMPTS, SamplingParams(max_tokens=6))
        with LLM(workers=[L.addr], router_config=router_cfg()) as llm:
            assert [o.token_ids for o in llm.generate(PROMPTS, SamplingParams(max_tokens=6))] == [
                o.token_ids for o in want]
        t0 = time.monotonic()
        F.p.send_signal(signal.SIGSTOP)
        L.p.wait(timeout=4 * FENCE_S)
        dt = time.monotonic() - t0
        assert L.p.returncode == 3 and "silent for" in L.tail(), L.tail()
        assert FENCE_S * 0.8 <= dt <= FENCE_S * 1.5 + 1, dt
        print(f"hung follower fenced after {dt:.2f}s (fence_s={FENCE_S})")
        F.p.send_signal(signal.SIGCONT)
        F.p.wait(timeout=4 * FENCE_S + 10)
        assert F.p.returncode != 0
    finally:
        for m in members:
            if m.p.poll() is None:
                m.kill()


class _KV:
    """An in-process stand-in for jax.distributed's key-value store."""

    def __init__(self):
        self.d, self.cv = {}, threading.Condition()

    def key_value_set(self, k, v):
        with self.cv:
            self.d[k] = v
            self.cv.notify_all()

    def blocking_key_value_get(self, k, timeout_ms):
        with self.cv:
            if not self.cv.wait_for(lambda: k in self.d, timeout_ms / 1000):
                raise TimeoutError(k)
            return self.d[k]


def test_watchdog_fences_a_stuck_step_then_the_silent_member():
    """The leader's engine work stuck past step_timeout_s fences it (a collective that never completes while every
    member still beats); its heartbeats stop, and the follower fences within fence_s. No processes needed."""
    kv, fenced = _KV(), {0: [], 1: []}
    groups = [Group(GroupSpec("127.0.0.1:1", 2, k, fence_s=1.0, init_timeout_s=5.0, step_timeout_s=1.5),
                    on_fence=fenced[k].append, kv=kv) for k in (0, 1)]
    t = threading.Thread(target=groups[1].start_heartbeats)
    t.start()
    groups[0].start_heartbeats()
    t.join(timeout=10)
    try:
        end = time.monotonic() + 5           # each has heard the other's beat; nobody fenced
        while not (groups[0].member_compiles and groups[1].member_compiles) and time.monotonic() < end:
            time.sleep(0.02)
        assert groups[0].member_compiles == {1: 0} and fenced == {0: [], 1: []}
        t0 = time.monotonic()
        groups[0].busy(True)
        end = t0 + 5
        while not fenced[0] and time.monotonic() < end:
            time.sleep(0.02)
        assert fenced[0] and "stuck" in fenced[0][0], fenced
        assert 1.5 <= time.monotonic() - t0 <= 2.2
        while not fenced[1] and time.monotonic() < end + 3:
            time.sleep(0.02)
        assert fenced[1] and "member 0 silent" in fenced[1][0], fenced
    finally:
        for g in groups:
            g.close()


def test_a_member_ends_on_sigterm(tmp_path):
    """jax.distributed's preemption notifier swallows SIGTERM; a member must still end on it (kill, timeout, an
    orchestrator's stop), as a plain worker does. Two bare members (no model): SIGTERM the follower, it is gone."""
    port = _free_port()
    code = ("import sys, time; from serving.group import GroupSpec, join; "
            f"join(GroupSpec('127.0.0.1:{port}', 2, int(sys.argv[1]), fence_s=3.0, init_timeout_s=60)); "
            "print('joined', flush=True); time.sleep(120)")
    env = dict(os.environ, XLA_FLAGS=os.environ["TANDEM_TEST_XLA_FLAGS"], PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(k)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for k in (0, 1)]
    try:
        assert procs[1].stdout.readline().strip() == "joined"   # bounded by the test timeout and init_timeout_s
        procs[1].send_signal(signal.SIGTERM)
        assert procs[1].wait(timeout=10) == -signal.SIGTERM
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
