"""KV into a worker group straight into the member owning the request's rank (serving/group_kv.py), in one process:
a member's KV service pulls an offer (its streamed parts ahead, then the offer) from a real transport, checks the
checksums and keeps the pages; the leader gets shape-only `Held` pieces; the step channel carries a reference
the member resolves, zeros to everyone else; a piece the leader lets go is dropped on the member."""

import gc
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from serving.group import Group, GroupError, GroupSpec, Held
from serving.group_kv import MemberKV, MemberPulls
from serving.transfer import TcpTransport, layout_of, page_checksums, part_uuid
from test_worker_group import _KV


class _Engine:   # what MemberKV uses of an engine: nothing (the shapes are checked by the leader's KVReceiver)
    pass


def _groups(n=2):
    kv = _KV()
    return [Group(GroupSpec("127.0.0.1:1", n, k, init_timeout_s=5.0), on_fence=lambda why: None, kv=kv)
            for k in range(n)]


def _offer(src: TcpTransport, uuid: int, pages: np.ndarray, n_pages: int, parts=()) -> dict:
    x = jax.device_put(pages)
    src.offer(uuid, [x])
    return {"addr": src.address, "uuid": uuid, "arrays": [layout_of(x)], "checksums": page_checksums(pages),
            "n_pages": n_pages, "parts": list(parts)}


def _part(src: TcpTransport, uuid: int, k: int, pages: np.ndarray, start: int, end: int) -> dict:
    x = jax.device_put(pages)
    src.offer(part_uuid(uuid, k), [x])
    return {"uuid": part_uuid(uuid, k), "start": start, "end": end, "addr": src.address, "arrays": [layout_of(x)],
            "checksums": page_checksums(pages)}


def _wait(cond, timeout=5.0):
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


@pytest.fixture
def members():
    g0, g1 = _groups()
    src, dst = TcpTransport(), TcpTransport()
    svc = MemberKV(g1, _Engine(), dst, pull_timeout_s=5.0, lease_s=30.0)
    pulls = MemberPulls(g0, {0: [0, 1], 1: [2, 3]})
    yield pulls, svc, src
    svc.close()
    for t in (src, dst):
        t.close()


def test_a_member_pulls_checks_and_keeps_the_pages_until_the_insert_takes_them(members):
    pulls, svc, src = members
    rng = np.random.default_rng(0)
    part = rng.standard_normal((2, 2, 4, 8)).astype(np.float32)      # [layers, pages, page size, latent]
    rest = rng.standard_normal((2, 4, 4, 8)).astype(np.float32)
    p = _part(src, 7, 0, part, 0, 2)
    pulls.part(1, "r1", p)                                             # streamed while the prompt runs
    assert _wait(lambda: getattr(svc._early.get("r1", {}).get(p["uuid"]), "done", threading.Event()).is_set())
    pieces = pulls.pull(1, "r1", _offer(src, 7, rest, 3, [p]), timeout_s=10)
    assert [(h.owner, h.shape, h.dtype, k) for h, k in pieces] == [(1, part.shape, np.float32, 2),
                                                                    (1, rest.shape, np.float32, 3)]
    rep = svc.report()
    assert rep["held"] == 1 and rep["pulls"] == 1 and rep["parts_pulled_early"] == 1, rep
    assert rep["parts_pulled_late"] == 0
    # the insert calls take each piece once, exactly as pulled
    np.testing.assert_array_equal(svc.take(pieces[0][0].key, 0), part)
    np.testing.assert_array_equal(svc.take(pieces[1][0].key, 1), rest)
    with pytest.raises(KeyError):
        svc.take(pieces[1][0].key, 1)
    assert svc.report()["held"] == 0


def test_pages_the_leader_lets_go_are_dropped_on_the_member(members):
    pulls, svc, src = members
    pages = np.ones((2, 2, 4, 8), np.float32)
    pieces = pulls.pull(1, "r2", _offer(src, 8, pages, 2), timeout_s=10)
    assert svc.report()["held"] == 1
    del pieces   # aborted after its pull, a failed attempt, a re-sent prefix: the Prefix goes away uninserted
    gc.collect()
    assert _wait(lambda: svc.report()["held"] == 0), svc.report()
    # consumed by an insert (Mirror): no drop
    pieces = pulls.pull(1, "r3", _offer(src, 9, pages, 2), timeout_s=10)
    pieces[0][0].consumed()
    del pieces
    gc.collect()
    time.sleep(0.3)
    assert svc.report()["held"] == 1 and svc.report()["dropped"] == 1


def test_a_corrupted_or_missing_offer_fails_the_pull_and_nothing_is_kept(members):
    pulls, svc, src = members
    pages = np.arange(2 * 2 * 4 * 8, dtype=np.float32).reshape(2, 2, 4, 8)
    offer = _offer(src, 10, pages, 2)
    offer["checksums"] = offer["checksums"][::-1]
    with pytest.raises(Exception, match="checksum"):
        pulls.pull(1, "r4", offer, timeout_s=10)
    with pytest.raises(Exception, match="member 1"):
        pulls.pull(1, "r5", {**offer, "uuid": 11, "checksums": page_checksums(pages)}, timeout_s=10)   # never offered
    assert svc.report()["held"] == 0 and svc.report()["pull_failures"] == 2


def test_the_step_channel_sends_a_reference_to_the_owner_and_zeros_to_the_rest():
    """3 processes: an insert with data for process 1 (the relay: `--group_kv=leader`), then one whose pages
    process 2 holds: 2 resolves the reference from its store, 1 and the leader run with zeros."""
    g = _groups(3)
    stores = {1: None, 2: type("S", (), {"take": lambda self, k, i: np.full((2, 3), 7.0, np.float32)
                                          if (k, i) == ("r/1/0", 0) else {}[k]})()}
    rx = {}
    ts = [threading.Thread(target=lambda k=k: rx.__setitem__(k, g[k].receiver(stores[k]))) for k in (1, 2)]
    for t in ts:
        t.start()
    mirror = g[0].mirror()
    for t in ts:
        t.join(timeout=10)
    try:
        ids, data = np.array([5], np.int32), np.ones((2, 3), np.float32)
        np.testing.assert_array_equal(mirror("insert", 2, (ids, data), data_owners={1})[1], data)
        got = {k: rx[k].next(2000) for k in (1, 2)}
        np.testing.assert_array_equal(got[1][2][1], data)
        np.testing.assert_array_equal(got[2][2][1], np.zeros((2, 3)))
        assert mirror.stats["data_sent"] == 1 and mirror.stats["data_skipped"] == 1
        # a bf16 / fp8 KV cache's pages keep their dtype on the wire (numpy's code for ml_dtypes is '<V2')
        for dt in (jnp.bfloat16, jnp.float8_e4m3fn):
            x = (np.arange(6).reshape(2, 3) / 4).astype(dt)
            mirror("insert", 2, (ids, x), data_owners={1})
            got = {k: rx[k].next(2000) for k in (1, 2)}
            assert got[1][2][1].dtype == got[2][2][1].dtype == x.dtype
            np.testing.assert_array_equal(got[1][2][1], x)
        dropped = []
        held = Held(2, "r/1/0", 0, (2, 3), "float32", lambda owner, key: dropped.append(key))
        local = mirror("insert", 2, (ids, held), data_owners={2})
        np.testing.assert_array_equal(local[1], np.zeros((2, 3)))            # the leader: zeros
        got = {k: rx[k].next(2000) for k in (1, 2)}
        np.testing.assert_array_equal(got[2][2][1], np.full((2, 3), 7.0))    # the owner: its own pulled pages
        np.testing.assert_array_equal(got[1][2][1], np.zeros((2, 3)))
        assert mirror.stats["held_sent"] == 1 and mirror.stats["data_sent"] == 3
        del held
        gc.collect()
        assert dropped == []   # consumed: nothing to drop
        with pytest.raises(GroupError, match="held by process 2"):   # placed on another member's rank
            mirror("insert", 2, (ids, Held(2, "r/2/0", 0, (2, 3), "float32", lambda *a: None)), data_owners={1})
    finally:
        mirror.close()
        for r in rx.values():
            r.close()


def test_a_part_arriving_after_its_offers_pull_began_is_not_pulled_twice(members):
    """Each message to a member comes on its own connection, so a part can trail its offer's pull:
    then the pull takes the part itself and the late notice is ignored (a second pull of the same part would wait
    for an offer the prefill worker served already)."""
    _, svc, src = members
    part, rest = np.full((2, 2, 4, 8), 3.0, np.float32), np.full((2, 2, 4, 8), 5.0, np.float32)
    p = _part(src, 12, 0, part, 0, 2)
    svc._handle(b"nobody", {"op": "pull", "rid": "r6", "key": "r6/12/0", "offer": _offer(src, 12, rest, 2, [p])})
    svc._handle(b"nobody", {"op": "part", "rid": "r6", "part": p})
    assert _wait(lambda: svc.report()["held"] == 1), svc.report()
    rep = svc.report()
    assert rep["parts_after_offer"] == 1 and rep["parts_pulled_late"] == 1 and "r6" not in svc._early, rep
    np.testing.assert_array_equal(svc.take("r6/12/0", 0), part)
