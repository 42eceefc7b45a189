"""`RouterClient`: a client of a running router process (`python -m serving.router`).

    c = RouterClient("127.0.0.1:7000", token)      # asks for `stats` (bounded) to learn the engine and workers
    c.submit("r1", [1, 2, 3], sampling_to_wire(params, seed), limit=16)
    for ev in c.events(timeout=1.0): ...          # {rid, tokens, finished, reason, error, metrics?}

The same submit / abort / events / snapshot calls as the in-process `serving.router.Router`; every wait is
bounded. One DEALER socket; thread-safe (one lock around the socket).
"""

from __future__ import annotations

import collections
import threading
import time

import zmq

from serving.protocol import decode_message, encode_message


class RouterClient:
    """A running router process, behind the same submit/abort/events/snapshot calls as `Router`."""

    def __init__(self, addr: str, token: str | None = None, timeout_s: float = 10.0):
        self.addr, self.token = addr, token
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"tcp://{addr}")
        self._pending: collections.deque = collections.deque()
        self._stats: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self.info = self.stats(timeout_s)

    def _recv(self, timeout: float) -> bool:
        if not self.sock.poll(int(timeout * 1000)):
            return False
        msg = decode_message(self.sock.recv(), self.token)
        if msg["type"] == "stats_ok":
            self._stats.append(msg)
        elif msg["type"] == "tokens":
            self._pending.append({k: msg.get(k) for k in ("rid", "tokens", "finished", "reason", "error",
                                                          "metrics")})
        elif msg["type"] == "error":
            raise RuntimeError(f"router {self.addr} rejected a message: {msg['error']}")
        return True

    def stats(self, timeout_s: float = 10.0) -> dict:
        with self._lock:
            self.sock.send(encode_message("stats", self.token))
            end = time.monotonic() + timeout_s
            while not self._stats:
                left = end - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"router {self.addr} did not answer within {timeout_s}s")
                self._recv(left)
            return self._stats.popleft()

    def snapshot(self, timeout: float = 10.0) -> dict:
        s = self.stats(timeout)
        return {"workers": s["workers"], "metrics": s["metrics"]}

    def submit(self, rid, prompt, sampling, limit=None, trace=None):
        with self._lock:
            self.sock.send(encode_message("generate", self.token, rid=rid, prompt=list(map(int, prompt)),
                                          sampling=sampling, limit=limit, trace=trace))

    def abort(self, rid):
        with self._lock:
            self.sock.send(encode_message("cancel", self.token, rid=rid))

    def events(self, timeout: float) -> list[dict]:
        with self._lock:
            if not self._pending:
                self._recv(timeout)
            while self._recv(0):
                pass
            out = list(self._pending)
            self._pending.clear()
            return out

    def close(self):
        self.sock.close(0)
