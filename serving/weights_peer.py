"""Weights from a running peer instead of the checkpoint (what Dynamo's ModelExpress does for vLLM/SGLang).

A new worker started with `--weights_from=HOST:PORT` (a running worker's control address) asks it for its weights:

    weights        -> weights_offer   the peer offers every weight array on its KV transfer server (one uuid) and
                                      answers with the checkpoint identity, each leaf's path, layout and checksum
    weights_release                   the puller is done (or gave up): the peer ends the offer

The puller accepts the offer only for the same checkpoint (identity of config.json and the safetensors headers,
sizes and first/last bytes), the same transport and exactly the leaves its own load would make (paths, shapes,
dtypes: same dtype, quantization, MTP and redundant-expert slots); it pulls them in the peer's layout (what the
transfer needs), checks every leaf's checksum on device, and hands the model to `build_engine`, which places it
with the worker's own rules (any mesh). Anything else — no answer within the timeout, another checkpoint, a layout
this process cannot hold, a checksum mismatch — is logged and the worker reads the checkpoint instead.
The weights are offered as the live arrays (no copy on the jax transport); an EPLB placement moves with them.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import logging
import os
import secrets
import struct
import time

import jax
import jax.numpy as jnp
import numpy as np
import zmq
from flax import nnx

import checkpoints
from checkpoints.loader import mtp_layers_present
from checkpoints.tensors import checkpoint_quant
from serving.protocol import ProtocolError, decode_message, encode_message
from serving.transfer import TransferError, layout_of, offerable, spec_from_wire

log = logging.getLogger(__name__)


class PeerWeightsError(RuntimeError):
    """The peer's weights cannot be used (named reason); the caller reads the checkpoint."""


def checkpoint_identity(path: str) -> str:
    """config.json + each safetensors file's name, size, header and first/last 64 KiB of data."""
    d = hashlib.blake2b(digest_size=16)
    with open(os.path.join(path, "config.json"), "rb") as f:
        d.update(f.read())
    for fn in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        size = os.path.getsize(fn)
        with open(fn, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            head = f.read(min(n, 1 << 26))
            data = f.read(1 << 16)
            f.seek(max(8 + n, size - (1 << 16)))
            tail = f.read()
        d.update(os.path.basename(fn).encode() + struct.pack("<Q", size) + head + data + tail)
    return d.hexdigest()


@jax.jit
def _words(x: jax.Array) -> jax.Array:
    b = jax.lax.bitcast_convert_type(x, jnp.uint8).reshape(-1)   # (a trailing byte axis for wider dtypes)
    b = jnp.pad(b, (0, -b.shape[0] % 4))
    w = jax.lax.bitcast_convert_type(b.reshape(-1, 4), jnp.uint32)
    pos = w * (jnp.arange(w.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + 1)   # order-sensitive
    mixed = (w ^ (w >> 13)) * jnp.uint32(0x9E3779B1)   # nonlinear in the bits (sums partition across shards)
    return jnp.stack([jnp.sum(w, dtype=jnp.uint32), jnp.sum(pos, dtype=jnp.uint32), jnp.sum(mixed, dtype=jnp.uint32)])


def _words_host(a: np.ndarray) -> list[int]:
    """`_words` with numpy (uint32 arithmetic wraps the same way): no executable to compile per weight shape."""
    b = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
    w = np.concatenate([b, np.zeros(-b.size % 4, np.uint8)]).view(np.uint32)
    pos = w * (np.arange(w.size, dtype=np.uint32) * np.uint32(2654435761) + np.uint32(1))
    mixed = (w ^ (w >> np.uint32(13))) * np.uint32(0x9E3779B1)
    return [int(np.sum(v, dtype=np.uint32)) for v in (w, pos, mixed)]


def leaf_checksum(x: jax.Array) -> int:
    """A 96-bit checksum of an array's bytes (sums of its 32-bit words: plain, position-weighted, bit-mixed),
    computed where the array lives: on accelerators by a small executable, on CPU devices with numpy (same value)."""
    on_cpu = all(d.platform == "cpu" for d in x.devices())
    s, p, m = _words_host(np.asarray(x)) if on_cpu else (int(v) for v in np.asarray(jax.device_get(_words(x))))
    return (s << 64) | (p << 32) | m


def _leaves(state) -> tuple[list[str], list[jax.Array]]:
    pairs = jax.tree_util.tree_leaves_with_path(state)
    return [jax.tree_util.keystr(p) for p, _ in pairs], [x for _, x in pairs]


# ---- the peer (a running worker) --------------------------------------------------------------------------------------
class WeightServer:
    """A worker's side: offers its engine's weights on its transfer server, one offer per request, each ended by
    `weights_release` or after `lease_s`."""

    def __init__(self, worker, lease_s: float):
        self.w, self.lease_s = worker, lease_s
        self.offers: dict[int, float] = {}   # uuid -> expiry

    def handle(self, ident: bytes, msg: dict) -> None:
        now = time.monotonic()
        for u in [u for u, t in self.offers.items() if t <= now]:
            log.warning("weights offer %d expired unreleased", u)
            self._end(u, consumed=False)
        if msg["type"] == "weights_release":
            self.w.metrics["weights_released" if msg.get("consumed", True) else "weights_refused"] += 1
            self._end(msg["uuid"], consumed=bool(msg.get("consumed", True)))
            return
        eng = self.w.engine
        if eng.multiprocess or not self.w.checkpoint:
            self.w.send(ident, "error", error="weights: this worker cannot offer its weights (a worker group, or "
                        "no checkpoint to name them by)")
            return
        paths, arrays = _leaves(eng.params)
        arrays = [offerable(a) for a in arrays]
        uuid = secrets.randbits(62)
        self.w.transport.offer(uuid, arrays)
        self.offers[uuid] = now + self.lease_s
        self.w.metrics["weights_offered"] += 1
        self.w.send(ident, "weights_offer", uuid=uuid, transfer=self.w.transport.address,
                    transport=self.w.transport.name, checkpoint=checkpoint_identity(self.w.checkpoint),
                    leaves=[[p, layout_of(a), str(leaf_checksum(a))] for p, a in zip(paths, arrays)])

    def _end(self, uuid: int, consumed: bool) -> None:
        if self.offers.pop(uuid, None) is not None:
            self.w.transport.release(uuid, consumed=consumed)


# ---- the puller (a starting worker) ----------------------------------------------------------------------------------
def _ask(addr: str, token: str | None, type_: str, timeout_s: float, **fields) -> dict | None:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 500)
    try:
        s.connect(f"tcp://{addr}")
        s.send(encode_message(type_, token, **fields))
        if timeout_s <= 0:
            return None
        if not s.poll(int(timeout_s * 1000)):
            raise PeerWeightsError(f"no answer from {addr} within {timeout_s:.0f}s")
        return decode_message(s.recv(), token)
    finally:
        s.close()


def _abstract_state(checkpoint: str, dtype, quant: str | None, redundant_experts: int):
    """(graphdef, abstract state) of what `checkpoints.load` would make of `checkpoint` with these settings."""
    cfg, ckpt = checkpoints.config_of(checkpoint), checkpoints.Checkpoint(checkpoint)
    cfg = cfg.replace(num_nextn_predict_layers=mtp_layers_present(cfg, ckpt), n_redundant_experts=redundant_experts)
    stored = checkpoint_quant(checkpoint)
    fp8_stored = any(k.endswith(".weight_scale_inv") for k in ckpt.keys())
    return nnx.split(checkpoints.abstract_model(cfg, dtype=dtype, quant=quant or (stored or {}).get("format"),
                                                fp8_linears=fp8_stored))


def pull_weights(peer: str, *, token: str | None, transport, checkpoint: str, dtype, quant: str | None = None,
                 redundant_experts: int = 0, timeout_s: float = 30.0) -> tuple[object | None, dict]:
    """(model, info): the peer's weights as a model (unplaced: `build_engine(model=...)` places it), or None and
    the reason in info["fallback"] — the caller then loads the checkpoint."""
    t0, uuid = time.perf_counter(), None
    info: dict = {"source": "checkpoint", "peer": peer}
    try:
        graphdef, state = _abstract_state(checkpoint, dtype, quant, redundant_experts)
        rep = _ask(peer, token, "weights", timeout_s)
        if rep["type"] != "weights_offer":
            raise PeerWeightsError(f"peer answered {rep['type']}: {rep.get('error')}")
        uuid = rep["uuid"]
        if rep["checkpoint"] != checkpoint_identity(checkpoint):
            raise PeerWeightsError("the peer serves another checkpoint")
        if rep["transport"] != transport.name:
            raise PeerWeightsError(f"the peer's transport is {rep['transport']}, ours {transport.name}")
        paths, want = _leaves(state)
        got = [(p, tuple(d["shape"]), d["dtype"]) for p, d, _ in rep["leaves"]]
        mine = [(p, tuple(x.shape), jnp.dtype(x.dtype).name) for p, x in zip(paths, want)]
        if got != mine:
            diff = next((m, g) for m, g in itertools.zip_longest(mine, got) if m != g)
            raise PeerWeightsError(f"the peer's weights differ from this worker's load (dtype, quantization, "
                                   f"redundant experts?): ours {diff[0]}, theirs {diff[1]}")
        arrays = transport.pull(rep["transfer"], uuid, [spec_from_wire(d) for _, d, _ in rep["leaves"]], timeout_s)
        bad = [p for (p, _, c), a in zip(rep["leaves"], arrays) if leaf_checksum(a) != int(c)]
        if bad:
            raise PeerWeightsError(f"checksum mismatch on {len(bad)} weight(s), e.g. {bad[0]}")
        _ask(peer, token, "weights_release", 0, uuid=uuid, consumed=True)
        model = nnx.merge(graphdef, jax.tree.unflatten(jax.tree.structure(state), arrays))
        info.update(source="peer", seconds=round(time.perf_counter() - t0, 3),
                    bytes=int(sum(a.nbytes for a in arrays)), leaves=len(arrays))
        log.info("weights from peer %s: %d arrays, %.1f MB in %.2f s", peer, len(arrays), info["bytes"] / 1e6,
                 info["seconds"])
        return model, info
    except (PeerWeightsError, TransferError, ProtocolError, KeyError, TypeError, ValueError, zmq.ZMQError) as e:
        log.warning("weights from peer %s not used (%s: %s); reading the checkpoint", peer, type(e).__name__, e)
        if uuid is not None:
            try:
                _ask(peer, token, "weights_release", 0, uuid=uuid, consumed=False)
            except (zmq.ZMQError, PeerWeightsError):
                pass
        info["fallback"] = f"{type(e).__name__}: {e}"
        return None, info
