"""KV into a worker group, straight into the member that owns the request's attention rank.

A decode group's leader is the worker the router talks to, but the pages of a request live on the devices of one
attention rank, and with data-parallel attention over several processes most ranks belong to a follower. Relaying
through the leader (pull there, then ship the pages with the insert call) costs the leader's link twice per
prefix and makes it the group's bottleneck. Instead (`--group_kv=member`, the default when every rank has one
owner process):

* when an offer (or the first streamed part of one) arrives, the leader picks the member whose ranks take the
  request (`Scheduler.owner_for`: cached prefix, rows per rank, free pages) before pulling anything;
* that member pulls the parts and the offer from the prefill worker itself (its own transport), checks the
  checksums and keeps the pages (`MemberKV`, a ROUTER socket on the member; msgpack, never pickle);
* the leader gets ok / an error back, and a `Held` piece per array (shape and dtype only): the scheduler places
  the prefix on that member's ranks, and the insert call carries a reference the member resolves from its store;
* a prefix the leader lets go uninserted (aborted, failed, re-sent) is dropped on the member (`Held`'s
  finalizer), and each member reports how many pieces it holds with its heartbeats (the leader's health).
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time

import msgpack
import numpy as np
import zmq

from serving.group import Group, Held, dtype_name
from serving.kv_receive import KVReceiver
from serving.transfer import TransferError, TransferTimeout

log = logging.getLogger("serving.group_kv")
_UUID_MASK = (1 << 57) - 1   # a part's uuid -> its offer's (`serving.transfer.part_uuid`)


def owner_ranks(engine) -> dict[int, list[int]] | None:
    """process -> the attention ranks whose pages only its devices hold; None unless every rank has exactly one
    owner and more than one process owns ranks (then the leader relays)."""
    out: dict[int, list[int]] = {}
    for r in range(engine.ranks):
        ps = engine.rank_processes(r)
        if len(ps) != 1:
            return None
        out.setdefault(next(iter(ps)), []).append(r)
    return out if len(out) > 1 else None


class MemberPulls:
    """The leader's side: which member owns which ranks, and a line to each member's KV service."""

    def __init__(self, group: Group, owners: dict[int, list[int]]):
        self.ctx, self.owners = group.ctx, owners
        self.addr = {p: group._get(f"kv/{p}", f"its KV service address (process {p})") for p in owners if p}
        self._keys = itertools.count()

    def _send(self, owner: int, msg: dict) -> None:
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 2000)
        s.connect("tcp://" + self.addr[owner])
        s.send(msgpack.packb(msg))
        s.close()

    def part(self, owner: int, rid: str, part: dict) -> None:
        """Tell the member a part of `rid`'s offer is ready (it pulls it now)."""
        self._send(owner, {"op": "part", "rid": rid, "part": part})

    def drop(self, owner: int, key: str | None = None, rid: str | None = None) -> None:
        """The member forgets the pages held under `key` and/or the parts it pulled ahead for `rid`."""
        try:
            self._send(owner, {"op": "drop", "key": key, "rid": rid})
        except zmq.ZMQError as e:   # (from a finalizer: never raise) the group fences if the member is gone
            log.warning("drop on member %d failed: %s", owner, e)

    def pull(self, owner: int, rid: str, offer: dict, timeout_s: float) -> list[tuple[Held, int]]:
        """The member pulls `offer` (its parts, then its pages) and keeps them: one `Held` per piece, with its real
        page count. Raises TransferError / TransferTimeout (the member dropped or will drop what it got)."""
        key = f"{rid}/{offer['uuid']}/{next(self._keys)}"
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect("tcp://" + self.addr[owner])
        try:
            s.send(msgpack.packb({"op": "pull", "rid": rid, "key": key, "offer": offer}))
            if not s.poll(int(timeout_s * 1000)):
                self.drop(owner, key)
                raise TransferTimeout(f"member {owner} did not pull offer {offer['uuid']} within {timeout_s:.0f}s")
            reply = msgpack.unpackb(s.recv())
        finally:
            s.close()
        if not reply.get("ok"):
            raise TransferError(f"member {owner}: {reply.get('error')}")
        counts = [int(p["end"]) - int(p["start"]) for p in offer.get("parts") or ()] + [int(offer["n_pages"])]
        if len(reply["shapes"]) != len(counts):
            self.drop(owner, key)
            raise TransferError(f"member {owner} holds {len(reply['shapes'])} pieces, the offer has {len(counts)}")
        return [(Held(owner, key, i, shape, reply["dtype"], self.drop), k)
                for i, (shape, k) in enumerate(zip(reply["shapes"], counts))]


class MemberKV(KVReceiver):
    """A follower's KV service: pulls what the leader assigns to its ranks (parts ahead, then the offer), checks
    it, and keeps the pages for the insert that references them (`take`, via `serving.group.Receiver`)."""

    def __init__(self, group: Group, engine, transport, *, host: str = "127.0.0.1", pull_timeout_s: float = 20.0,
                 verify_checksums: bool = True, lease_s: float = 30.0):
        self.engine, self.transport, self.pull_timeout_s, self.verify = engine, transport, pull_timeout_s, \
            verify_checksums
        self.lease_s, self.fault_pull_delay_s, self.fault_corrupt_pages, self.drain_deadline = lease_s, 0.0, 0.0, None
        # every key present from the start: `report` (the heartbeat thread) copies it while pull threads count
        self.metrics: collections.Counter = collections.Counter(dict.fromkeys(
            ("pulls", "pull_failures", "pulled_bytes", "parts_pulled_early", "parts_pulled_late", "parts_after_offer",
             "pieces_inserted", "dropped"), 0))
        self._early: dict[str, dict] = {}
        self._store: dict[str, list] = {}
        self._dropped: collections.deque = collections.deque(maxlen=4096)   # keys dropped before their pull ended
        self._offers_seen: collections.OrderedDict[int, None] = collections.OrderedDict()   # uuids pulled (recent)
        self._lock = threading.Lock()
        self.ctx = group.ctx
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.address = f"{host}:{self.sock.bind_to_random_port(f'tcp://{host}')}"
        self._inproc = f"inproc://member-kv-{id(self)}"
        self._done = self.ctx.socket(zmq.PULL)
        self._done.bind(self._inproc)
        group._put(f"kv/{group.spec.process_id}", self.address)
        group.report = self.report
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="member-kv", daemon=True)
        self._thread.start()

    def report(self) -> dict:
        """For the leader's health (with the heartbeats): prefixes held now, pulls, parts pulled ahead / late."""
        with self._lock:
            return {"held": len(self._store), **self.metrics}

    def take(self, key: str, index: int) -> np.ndarray:
        """Piece `index` of the pages held under `key` (each taken once; KeyError if this member lacks it)."""
        with self._lock:
            pieces = self._store[key]
            a, pieces[index] = pieces[index], None
            if a is None:
                raise KeyError(f"{key}[{index}] taken twice")
            if all(p is None for p in pieces):
                del self._store[key]
        self.metrics["pieces_inserted"] += 1
        return a

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._done, zmq.POLLIN)
        while not self._stop.is_set():
            ready = dict(poller.poll(200))
            if self.sock in ready:
                ident, raw = self.sock.recv_multipart()
                try:
                    self._handle(ident, msgpack.unpackb(raw))
                except Exception as e:   # a malformed message: say so, keep serving
                    log.warning("member KV service: bad message: %s: %s", type(e).__name__, e)
            if self._done in ready:
                self.sock.send_multipart(self._done.recv_multipart())
            for rid in [r for r, e in self._early.items() if e["t"] < time.monotonic() - self.lease_s]:
                del self._early[rid]   # parts pulled for an offer that never came
        self.sock.close(0)
        self._done.close(0)

    def _handle(self, ident: bytes, msg: dict) -> None:
        op = msg.get("op")
        if op == "part":
            # each message comes on its own connection: a part may arrive after its offer's pull began, which
            # pulls it itself then (a second pull of the same part would wait for an offer served already)
            if int(msg["part"]["uuid"]) & _UUID_MASK in self._offers_seen:
                self.metrics["parts_after_offer"] += 1
                return
            self._prepull(msg["rid"], msg["part"])
        elif op == "pull":
            self._offers_seen[int(msg["offer"]["uuid"])] = None
            while len(self._offers_seen) > 4096:
                self._offers_seen.popitem(last=False)
            threading.Thread(target=self._pull_held, args=(ident, msg, self._early.pop(msg["rid"], None)),
                             name=f"member-pull-{msg['rid']}", daemon=True).start()
        elif op == "drop":
            if msg.get("rid") is not None:
                self._early.pop(msg["rid"], None)
            if msg.get("key") is not None:
                with self._lock:
                    if self._store.pop(msg["key"], None) is None:
                        self._dropped.append(msg["key"])   # its pull may still be running
                self.metrics["dropped"] += 1
        else:
            raise ValueError(f"unknown op {op!r}")

    def _pull_held(self, ident: bytes, msg: dict, early: dict | None) -> None:
        try:
            pieces = [np.asarray(p) for p, _ in self._pull_pieces(msg["offer"], early)]
            with self._lock:
                if msg["key"] not in self._dropped:
                    self._store[msg["key"]] = pieces
            self.metrics["pulls"] += 1
            reply = {"ok": True, "shapes": [list(p.shape) for p in pieces], "dtype": dtype_name(pieces[0].dtype)}
        except Exception as e:
            self.metrics["pull_failures"] += 1
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        push = self.ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 1000)
        push.connect(self._inproc)
        push.send_multipart([ident, msgpack.packb(reply)])
        push.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
