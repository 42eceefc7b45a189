"""Worker groups: one engine over the devices of several processes, driven by its leader.

    python -m serving.worker --role=decode --devices=4 --mesh=dp=4,ep=2 --port=7201 \\
        --coordinator_address=127.0.0.1:7300 --num_processes=2 --process_id=0 --checkpoint=DIR   # leader
    python -m serving.worker --role=decode --devices=4 --mesh=dp=4,ep=2 \\
        --coordinator_address=127.0.0.1:7300 --num_processes=2 --process_id=1 --checkpoint=DIR   # follower

A group is one JAX program over `num_processes` processes (`jax.distributed`: one global mesh over all their
devices, collectives between them; host = process in the topology). JAX's multi-controller model needs every
process to run the same executables in the same order on the same inputs. So the group has one brain:

* the **leader** (process 0) is the worker the router sees — control endpoint, scheduler, page pool, transport.
  Its engine sends each executable call (the executable's key and its host inputs: tokens, positions, page
  tables, sampling rows, pages to insert) to the followers before running it (`Mirror`);
* each **follower** runs those calls on its own engine (`follow`) and decides nothing. Every member passes the
  same numpy inputs, so each puts its own addressable shards of the global input arrays; the executables' small
  outputs are replicated, so the leader reads them from its own devices (nothing gathered to a host).

**Agreement before compile.** Each member posts its settings (model config, engine config, dtype, mesh, roles) in
jax.distributed's key-value store; the leader compares them and every member stops with the same error naming the
members and fields that differ, before any weight is loaded or anything compiled.

**Fencing.** Every member publishes a heartbeat (ZeroMQ PUB, every `fence_s / 5`) and watches the others'. A
member silent for `fence_s` (killed, stopped, hung host), or the leader's engine work stuck for `step_timeout_s`
(a collective that never completes while every member still beats), fences the group: each member that notices
exits at once (code 3) — a process blocked in a collective whose partner is gone would otherwise never return. jax.distributed's
own heartbeat (`2 x fence_s`) is the backstop: it aborts the survivors if ours did not. The leader exiting is what
the router sees (its heartbeats stop): the group is marked dead and its requests migrate. A restarted group (all
members) registers as a new incarnation of the same worker.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
import weakref
from typing import Callable

import msgpack
import numpy as np
import zmq

log = logging.getLogger("serving.group")

FENCED_EXIT_CODE = 3
_PREFIX = "tandem/group/"


class GroupError(RuntimeError):
    """A group cannot form: bad process counts, an unreachable coordinator, members that disagree."""


@dataclasses.dataclass(frozen=True)
class GroupSpec:
    coordinator_address: str      # HOST:PORT of jax.distributed's coordinator (process 0 serves it)
    num_processes: int
    process_id: int
    fence_s: float = 10.0         # a member silent this long fences the group
    init_timeout_s: float = 120.0  # forming the group (coordinator, agreement, channels) must finish within this
    step_timeout_s: float = 120.0  # the leader's engine work (a step: dispatch + results) stuck this long fences

    def __post_init__(self):
        if self.num_processes < 2:
            raise GroupError(f"num_processes={self.num_processes}: a group has at least 2 processes")
        if not 0 <= self.process_id < self.num_processes:
            raise GroupError(f"process_id={self.process_id} outside [0, {self.num_processes})")
        host, _, port = self.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            raise GroupError(f"coordinator_address={self.coordinator_address!r}: expected HOST:PORT")
        if self.fence_s <= 0 or self.init_timeout_s <= 0 or self.step_timeout_s <= 0:
            raise GroupError("fence_s, init_timeout_s and step_timeout_s must be positive")

    @property
    def leader(self) -> bool:
        return self.process_id == 0


def check_mesh_fits(spec: GroupSpec, mesh_size: int, local_devices: int) -> None:
    """The group's devices must be exactly the mesh: num_processes x local devices == dp x ep x tp."""
    total = spec.num_processes * local_devices
    if total != mesh_size:
        raise GroupError(f"the mesh needs {mesh_size} devices but {spec.num_processes} processes x {local_devices} "
                         f"devices = {total}: make num_processes x devices per process equal dp x ep x tp")


def wait_for_coordinator(address: str, timeout_s: float) -> None:
    """Followers: the coordinator's port answers within `timeout_s`, or a GroupError naming it (jax.distributed
    itself would abort the process without saying why)."""
    host, _, port = address.rpartition(":")
    end = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return
        except OSError as e:
            if time.monotonic() > end:
                raise GroupError(f"coordinator {address} unreachable for {timeout_s:.0f}s ({e}); start process 0 "
                                 "of the group there, or fix --coordinator_address") from None
            time.sleep(0.2)


def join(spec: GroupSpec) -> "Group":
    """jax.distributed over the group (call after setting the local device count, before any jax computation)."""
    import jax

    if not spec.leader:
        wait_for_coordinator(spec.coordinator_address, spec.init_timeout_s)
    # the coordinator (process 0) listens on the given address only, not on every interface (jax's default)
    jax.distributed.initialize(spec.coordinator_address, spec.num_processes, spec.process_id,
                               initialization_timeout=int(spec.init_timeout_s),
                               heartbeat_timeout_seconds=max(2, int(2 * spec.fence_s)),
                               coordinator_bind_address=spec.coordinator_address)
    # jax's preemption notifier takes SIGTERM over (a training-checkpoint feature): the member would ignore
    # `kill`/`timeout`/an orchestrator's stop and run on. Give SIGTERM back its default: the process ends (and its
    # group fences), as a plain worker does.
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    return Group(spec)


def _kv_client():
    """jax.distributed's key-value store client (one compatibility point: it is not public API)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise GroupError("jax.distributed is not initialized")
    return client


class Group:
    """This process's membership: agreement, heartbeats and the step channel."""

    def __init__(self, spec: GroupSpec, on_fence: Callable[[str], None] | None = None, kv=None):
        """kv: the key-value store (default: jax.distributed's; tests pass their own)."""
        self.spec = spec
        self.kv = kv if kv is not None else _kv_client()
        self.ctx = zmq.Context.instance()
        self.on_fence = on_fence or _exit_fenced
        self._beat_thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.busy_since: float | None = None   # the engine work in flight started then (`busy`)
        self.compiles = 0                      # XLA compiles in this process since `count_compiles`
        self.member_compiles: dict[int, int] = {}   # the other members' counts, from their heartbeats
        self.report: Callable[[], dict] = dict   # sent with the heartbeats: this member's KV service counters
        self.member_kv: dict[int, dict] = {}      # the other members' (serving.group_kv: pieces held, pulls)

    def count_compiles(self) -> None:
        """From now on count this process's XLA compiles; they travel with its heartbeats (after start-up there
        must be none on any member)."""
        import jax

        def on_event(name, *a, **k):
            if "backend_compile" in name:
                self.compiles += 1

        jax.monitoring.register_event_duration_secs_listener(on_event)

    # ---- key-value store ---------------------------------------------------------------------------------------
    def _put(self, key: str, value: str) -> None:
        self.kv.key_value_set(_PREFIX + key, value)

    def _get(self, key: str, what: str) -> str:
        try:
            return self.kv.blocking_key_value_get(_PREFIX + key, int(self.spec.init_timeout_s * 1000))
        except Exception as e:  # a deadline: the other member never posted it
            raise GroupError(f"group member did not post {what} within {self.spec.init_timeout_s:.0f}s: "
                             f"{type(e).__name__}: {str(e)[:200]}") from None

    # ---- agreement ---------------------------------------------------------------------------------------------
    def agree(self, settings: dict) -> None:
        """Every member runs the same engine: same settings (JSON-able dict) or a GroupError on every member naming
        what differs. Call before loading weights or compiling."""
        mine = json.dumps(settings, sort_keys=True, default=str)
        self._put(f"settings/{self.spec.process_id}", mine)
        if self.spec.leader:
            diffs = []
            for pid in range(1, self.spec.num_processes):
                theirs = json.loads(self._get(f"settings/{pid}", f"its settings (process {pid})"))
                ref = json.loads(mine)
                keys = sorted(k for k in set(ref) | set(theirs) if ref.get(k) != theirs.get(k))
                diffs += [f"process {pid} {k}={theirs.get(k)} (process 0: {ref.get(k)})" for k in keys]
            verdict = "ok" if not diffs else "group members disagree: " + "; ".join(diffs)
            self._put("verdict", verdict)
        else:
            verdict = self._get("verdict", "the leader's verdict on the settings (process 0)")
        if verdict != "ok":
            raise GroupError(verdict)

    # ---- heartbeats and fencing --------------------------------------------------------------------------------
    def start_heartbeats(self, host: str = "127.0.0.1") -> None:
        pub = self.ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        port = pub.bind_to_random_port(f"tcp://{host}")
        self.beat_address = f"{host}:{port}"
        self._put(f"beat/{self.spec.process_id}", self.beat_address)
        others = [p for p in range(self.spec.num_processes) if p != self.spec.process_id]
        sub = self.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        for p in others:
            sub.connect("tcp://" + self._get(f"beat/{p}", f"its heartbeat address (process {p})"))
        self._beat_thread = threading.Thread(target=self._beat, args=(pub, sub, others), name="group-heartbeat",
                                             daemon=True)
        self._beat_thread.start()

    def _beat(self, pub, sub, others: list[int]) -> None:
        fence, period = self.spec.fence_s, self.spec.fence_s / 5
        start = time.monotonic()
        seen = {p: None for p in others}
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                try:
                    rep = json.dumps(self.report())
                except Exception:   # a report is never worth a missed beat (a missed beat fences the group)
                    rep = "{}"
                pub.send(f"{self.spec.process_id}:{self.compiles}:{rep}".encode())
                next_beat = now + period
            if sub.poll(int(period * 1000 / 2)):
                while True:
                    try:
                        pid, n, rep = sub.recv(zmq.NOBLOCK).split(b":", 2)
                        seen[int(pid)] = time.monotonic()
                        self.member_compiles[int(pid)], self.member_kv[int(pid)] = int(n), json.loads(rep)
                    except zmq.Again:
                        break
                    except ValueError:
                        continue
            now = time.monotonic()
            since = self.busy_since
            if since is not None and now - since > self.spec.step_timeout_s:
                self._stop.set()
                self.on_fence(f"engine step stuck for {now - since:.1f}s (step_timeout_s={self.spec.step_timeout_s:g}):"
                              f" fencing the group (process {self.spec.process_id} exits)")
                return
            for p, t in seen.items():
                # before a member's first beat arrives (PUB/SUB joins late) the start-up time counts instead
                last = t if t is not None else start + self.spec.init_timeout_s - fence
                if now - last > fence:
                    self._stop.set()
                    self.on_fence(f"group member {p} silent for {now - (t or start):.1f}s (fence_s={fence:g}): "
                                  f"fencing the group (process {self.spec.process_id} exits)")
                    return
        pub.close(0)
        sub.close(0)

    def close(self) -> None:
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join(timeout=5)

    def busy(self, on: bool) -> None:
        """Around each piece of engine work (a step until its results are on the host): work stuck longer than
        `step_timeout_s` — a collective that never completes although every member still beats — fences."""
        self.busy_since = time.monotonic() if on else None

    # ---- the step channel --------------------------------------------------------------------------------------
    def mirror(self, host: str = "127.0.0.1") -> "Mirror":
        """Leader: the channel its engine sends each call into (waits until every follower has connected)."""
        assert self.spec.leader
        return Mirror(self, host)

    def receiver(self, store=None) -> "Receiver":
        assert not self.spec.leader
        return Receiver(self, store)


def _exit_fenced(why: str) -> None:
    log.critical("%s", why)
    print(f"TANDEM_GROUP_FENCED {why}", flush=True)
    os._exit(FENCED_EXIT_CODE)


class Held:
    """Leader side of KV pages a follower pulled itself and keeps (`serving.group_kv`): their shape and dtype, and
    where they are. Written by reference (`Mirror`); dropped there if the leader lets it go uninserted."""

    def __init__(self, owner: int, key: str, index: int, shape, dtype, on_drop: Callable[[int, str], None]):
        self.owner, self.key, self.index = owner, key, index
        self.shape, self.dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        self._fin = weakref.finalize(self, on_drop, owner, key)   # aborted, failed, re-sent: the member frees it
        self._fin.atexit = False

    def consumed(self) -> None:
        self._fin.detach()


def dtype_name(dt) -> str:
    """A dtype on the wire: numpy's code, or the name for ml_dtypes' (bfloat16, float8_*: numpy's code is '<V2')."""
    dt = np.dtype(dt)
    return dt.name if dt.kind == "V" else dt.str


def _encode_arg(a) -> dict | None:
    if a is None:
        return None
    a = np.ascontiguousarray(a)
    return {"dtype": dtype_name(a.dtype), "shape": list(a.shape), "data": a.tobytes()}


def _decode_arg(d, store=None) -> np.ndarray | None:
    if d is None:
        return None
    if d.get("zeros"):   # data this process's devices do not use (pages of another process's rank)
        return np.zeros(d["shape"], np.dtype(d["dtype"]))
    if "held" in d:   # pages this process pulled itself (serving.group_kv)
        return store.take(*d["held"])
    return np.frombuffer(d["data"], np.dtype(d["dtype"])).reshape(d["shape"])


class Mirror:
    """Leader side of the step channel: one ROUTER, one DEALER per follower (identity = its process id); each
    engine call goes to every follower, in order, with a sequence number (never dropped: unknown or gone
    followers raise, and the leader fences)."""

    def __init__(self, group: Group, host: str):
        self.group, self.seq = group, 0
        self.sock = group.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"{host}:{port}"
        group._put("steps", self.address)
        want = {f"m{p}".encode() for p in range(1, group.spec.num_processes)}
        self.followers = sorted(want)
        self.stats = {"calls": 0, "bytes": {f.decode(): 0 for f in want}, "data_skipped": 0, "data_sent": 0,
                      "held_sent": 0}
        self._zeros: dict[tuple, np.ndarray] = {}
        end = time.monotonic() + group.spec.init_timeout_s
        got: set[bytes] = set()
        while got != want:
            if not self.sock.poll(max(1, int((end - time.monotonic()) * 1000))):
                raise GroupError(f"followers {sorted(x.decode() for x in want - got)} did not connect to the step "
                                 f"channel within {group.spec.init_timeout_s:.0f}s")
            ident, _ = self.sock.recv_multipart()
            got.add(ident)
        for f in self.followers:
            self.sock.send_multipart([f, msgpack.packb({"kind": "start", "seq": 0})])

    def __call__(self, kind: str, key, args: tuple, data_owners: set[int] | None = None) -> tuple:
        """Send one call to every follower; returns the arguments the leader runs it with. `data_owners`: only
        these processes get the last argument's values (the pages of an insert); the others get its shape and
        dtype, and use zeros. A `Held` last argument is already on its owner: it gets a reference, the rest
        (the leader too) zeros."""
        self.seq += 1
        self.stats["calls"] += 1
        held = args[-1] if args and isinstance(args[-1], Held) else None
        args = tuple(np.asarray(a) for a in (args[:-1] if held is not None else args))
        head = {"kind": kind, "key": list(key) if isinstance(key, tuple) else key, "seq": self.seq}
        if held is not None:
            if data_owners != {held.owner}:   # the scheduler places a held prefix on its owner's ranks only
                raise GroupError(f"pages held by process {held.owner} inserted into the ranks of {data_owners}")
            shape = {"dtype": dtype_name(held.dtype), "shape": list(held.shape)}
            full = msgpack.packb({**head, "args": [_encode_arg(a) for a in args] + [
                {"held": [held.key, held.index], **shape}]})
            held.consumed()
            self.stats["held_sent"] += 1
            z = (held.shape, dtype_name(held.dtype))
            if z not in self._zeros:
                self._zeros[z] = np.zeros(held.shape, held.dtype)
            args += (self._zeros[z],)
        else:
            full = msgpack.packb({**head, "args": [_encode_arg(a) for a in args]})
        lean = full
        if data_owners is not None and args:
            last = args[-1]
            lean = msgpack.packb({**head, "args": [_encode_arg(a) for a in args[:-1]] + [
                {"zeros": True, "dtype": dtype_name(last.dtype), "shape": list(last.shape)}]})
        for f in self.followers:
            msg = full if data_owners is None or int(f[1:]) in data_owners else lean
            if data_owners is not None and held is None:   # pages to insert: to this follower, or zeros
                self.stats["data_sent" if msg is full else "data_skipped"] += 1
            self.stats["bytes"][f.decode()] += len(msg)
            try:
                self.sock.send_multipart([f, msg])
            except zmq.ZMQError as e:
                self.group.on_fence(f"step {self.seq} could not reach follower {f.decode()}: {e}")
                raise
        return args

    def stop(self) -> None:
        """Followers leave `follow` (the group shuts down in order)."""
        for f in self.followers:
            try:
                self.sock.send_multipart([f, msgpack.packb({"kind": "stop", "seq": self.seq + 1})], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    def close(self) -> None:
        self.sock.close(0)


class Receiver:
    """Follower side of the step channel."""

    def __init__(self, group: Group, store=None):
        """store: the pages this member pulled itself (`serving.group_kv.MemberKV`), for inserts by reference."""
        self.group, self.seq, self.store = group, 0, store
        self.sock = group.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, f"m{group.spec.process_id}".encode())
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect("tcp://" + group._get("steps", "its step channel (process 0)"))
        self.sock.send(b"hello")
        if not self.sock.poll(int(group.spec.init_timeout_s * 1000)):
            raise GroupError(f"the leader did not start the group within {group.spec.init_timeout_s:.0f}s")
        msg = msgpack.unpackb(self.sock.recv())
        if msg.get("kind") != "start":
            raise GroupError(f"unexpected first message on the step channel: {msg.get('kind')!r}")

    def next(self, poll_ms: int = 500):
        """(kind, key, args) of the next call, or None if nothing arrived within poll_ms."""
        if not self.sock.poll(poll_ms):
            return None
        msg = msgpack.unpackb(self.sock.recv())
        self.seq += 1
        if msg["seq"] != self.seq and msg["kind"] != "stop":
            self.group.on_fence(f"step channel out of order: got step {msg['seq']}, expected {self.seq}")
            raise GroupError("step channel out of order")
        key = msg.get("key")
        try:
            args = [_decode_arg(a, self.store) for a in msg.get("args") or []]
        except (KeyError, AttributeError) as e:   # a held piece this member does not have: the group disagrees
            self.group.on_fence(f"step {msg['seq']}: pages held here are missing ({e})")
            raise GroupError("held pages missing") from None
        return msg["kind"], tuple(key) if isinstance(key, list) else key, args

    def close(self) -> None:
        self.sock.close(0)


def follow(engine, receiver: Receiver, stop: threading.Event | None = None) -> int:
    """A follower's whole job: run every call the leader sends on this process's engine, until `stop` arrives.
    Returns the number of calls run."""
    n = 0
    while stop is None or not stop.is_set():
        item = receiver.next()
        if item is None:
            continue
        kind, key, args = item
        if kind == "stop":
            log.info("leader stopped the group after %d calls", n)
            return n
        engine.execute(kind, key, args)
        n += 1
    return n


def settings_of(**kw) -> dict:
    """A flat JSON-able view of what every member must agree on: dataclasses flattened to dotted keys
    ("engine.page_size"), so a disagreement names the field."""
    out = {}

    def put(key, v):
        if dataclasses.is_dataclass(v):
            v = dataclasses.asdict(v)
        if isinstance(v, dict):
            for k, x in v.items():
                put(f"{key}.{k}", x)
        else:
            out[key] = json.loads(json.dumps(v, default=str))

    for k, v in kw.items():
        put(k, v)
    return out
