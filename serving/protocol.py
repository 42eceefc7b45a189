"""Control plane of multi-process PD: msgpack messages over ZeroMQ, validated and (optionally) authenticated.

Every control message is one ZeroMQ frame holding a msgpack map (never pickle). Common fields:

    {"v": 1, "type": <str>, "token": <str|None>, ...type-specific fields}

`decode_message` rejects — with a `ProtocolError` naming the problem — anything that is not a msgpack map, has an
unknown version or type, lacks a required field or has one of the wrong type, or carries the wrong shared-secret
token (compared in constant time). Receivers log the rejection, answer `error` when they can, and keep serving.

Message types (router <-> worker; see docs/pd_multiprocess.md for the flow):

    health      -> health_ok        liveness + load + page counts (also the heartbeat)
    prefill     -> offered | error  prefill worker: prefill, lease the pages, offer them under `uuid`
    part                            prefill worker -> router: pages of a long prompt already done, offered early
    prepull                         router -> the decode worker that will get the request: pull that part now
    decode      -> accepted | error decode worker: pull an offer (or prefill locally) then decode; streams `tokens`
    tokens                          decode worker -> router: new tokens of a request, `finished`/`reason`/`error`
    pulled                          decode worker -> router: an offer arrived (or failed: checksum, timeout, peer)
    release     -> released        prefill worker: the offer was consumed (ack) or is abandoned; end its lease
    abort                           either worker: drop a request
    bye                             router -> a draining worker it saw idle: everything arrived, exit now
    weights     -> weights_offer    a starting worker asks a running one for its weights (serving.weights_peer);
    weights_release                 ends that offer
    generate / cancel               client -> router process: submit / abort a request; router answers `tokens`
"""

from __future__ import annotations

import hmac
import logging
import os

import msgpack

from serving.sampling import SamplingParams
from serving.tracing import valid_traceparent

log = logging.getLogger(__name__)

VERSION = 1

_INT, _FLOAT, _STR, _LIST, _DICT, _BOOL = int, (int, float), str, (list, tuple), dict, bool
_OPT_STR = (str, type(None))

# required fields per message type (optional ones are checked where used)
SCHEMA: dict[str, dict[str, object]] = {
    "health": {},
    "health_ok": {"role": _STR, "worker": _STR, "incarnation": _STR},
    "prefill": {"rid": _STR, "prompt": _LIST, "sampling": _DICT, "uuid": _INT},
    "offered": {"rid": _STR, "uuid": _INT, "offer": _DICT},
    "part": {"rid": _STR, "uuid": _INT, "part": _DICT},
    "prepull": {"rid": _STR, "part": _DICT},
    "decode": {"rid": _STR, "prompt": _LIST, "sampling": _DICT, "limit": _INT},
    "accepted": {"rid": _STR},
    "tokens": {"rid": _STR, "tokens": _LIST, "finished": _BOOL},
    "pulled": {"rid": _STR, "ok": _BOOL},
    "release": {"uuid": _INT},
    "released": {"uuid": _INT},
    "abort": {"rid": _STR},
    "error": {"error": _STR},
    "generate": {"rid": _STR, "prompt": _LIST, "sampling": _DICT},
    "cancel": {"rid": _STR},
    "stats": {},
    "bye": {},
    "weights": {},
    "weights_offer": {"uuid": _INT, "transfer": _STR, "transport": _STR, "checkpoint": _STR, "leaves": _LIST},
    "weights_release": {"uuid": _INT},
    "stats_ok": {},
}

MAX_MESSAGE_BYTES = 16 << 20


class ProtocolError(ValueError):
    """A control message that is malformed or unauthenticated; `kind` is "malformed" or "unauthenticated"."""

    def __init__(self, kind: str, msg: str):
        super().__init__(f"{kind} message: {msg}")
        self.kind = kind


def encode_message(type_: str, token: str | None = None, **fields) -> bytes:
    if type_ not in SCHEMA:
        raise ValueError(f"unknown message type {type_!r}")
    return msgpack.packb({"v": VERSION, "type": type_, "token": token, **fields}, use_bin_type=True)


def decode_message(frame: bytes, token: str | None = None) -> dict:
    """Parse and validate one frame; raises ProtocolError (malformed / unauthenticated)."""
    if len(frame) > MAX_MESSAGE_BYTES:
        raise ProtocolError("malformed", f"{len(frame)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("malformed", f"not msgpack ({type(e).__name__}: {e})") from None
    if not isinstance(msg, dict):
        raise ProtocolError("malformed", f"expected a map, got {type(msg).__name__}")
    if msg.get("v") != VERSION:
        raise ProtocolError("malformed", f"protocol version {msg.get('v')!r}, expected {VERSION}")
    t = msg.get("type")
    if t not in SCHEMA:
        raise ProtocolError("malformed", f"unknown message type {t!r}")
    if token is not None:
        got = msg.get("token")
        if not isinstance(got, str) or not hmac.compare_digest(got.encode(), token.encode()):
            raise ProtocolError("unauthenticated", f"{t!r} with a missing or wrong token")
    for field, types in SCHEMA[t].items():
        if field not in msg:
            raise ProtocolError("malformed", f"{t!r} lacks field {field!r}")
        v = msg[field]
        if not isinstance(v, types) or (types is _INT and isinstance(v, bool)):
            raise ProtocolError("malformed", f"{t!r} field {field!r} has type {type(v).__name__}")
    if msg.get("trace") is not None and not valid_traceparent(msg["trace"]):
        raise ProtocolError("malformed", f"{t!r} field 'trace' is not a W3C traceparent")
    if "spans" in msg and not isinstance(msg["spans"], list):
        raise ProtocolError("malformed", f"{t!r} field 'spans' has type {type(msg['spans']).__name__}")
    if "prompt" in SCHEMA[t] and not all(isinstance(x, int) and not isinstance(x, bool) for x in msg["prompt"]):
        raise ProtocolError("malformed", f"{t!r} field 'prompt' must be a list of ints")
    return msg


SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos",
                   "cache_salt", "logprobs", "prompt_logprobs", "presence_penalty", "frequency_penalty",
                   "repetition_penalty", "min_tokens", "logit_bias", "structured_output")


def sampling_to_wire(params, seed: int) -> dict:
    """SamplingParams -> a msgpack-able dict with the resolved seed (so a migrated request samples the same)."""
    d = {f: getattr(params, f) for f in SAMPLING_FIELDS}
    d["stop"], d["stop_token_ids"], d["seed"] = list(d["stop"] or []), list(d["stop_token_ids"] or []), int(seed)
    d["logit_bias"] = [[int(t), float(b)] for t, b in d["logit_bias"]]
    d["structured_output"] = None if d["structured_output"] is None else list(d["structured_output"])
    return d


def sampling_from_wire(d: dict):
    try:
        return SamplingParams.from_dict(dict(d))
    except (TypeError, ValueError) as e:
        raise ProtocolError("malformed", f"bad sampling params: {e}") from None


def read_token(path: str | None) -> str | None:
    """The shared-secret token: the contents of `path` (stripped), else $TANDEM_TOKEN, else None (no auth)."""
    if path:
        with open(path) as f:
            return f.read().strip() or None
    return os.environ.get("TANDEM_TOKEN") or None
