"""What serving under NVIDIA Dynamo needs besides the engine (no Dynamo import: benches and tests use it too):
the model card folder Dynamo's frontend reads, one-host settings with every listener on loopback, and the ZMQ event
broker that keeps Dynamo's event publishers off 0.0.0.0 (docs/dynamo.md)."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile

import zmq

from serving.openai_api import DEFAULT_CHAT_TEMPLATE


# ---- the model card Dynamo's frontend reads ----------------------------------------------------------------------
def model_card(checkpoint: str, max_model_len: int, root: str | None = None) -> str:
    """A folder Dynamo's frontend can load the tokenizer and chat template from: the checkpoint itself when its
    tokenizer_config.json has a chat_template, else a folder of links to its files plus a tokenizer_config.json
    with Tandem's default template (the one `serving.server` uses), so chat prompts match Tandem's server."""
    cfg_path = os.path.join(checkpoint, "tokenizer_config.json")
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            if json.load(f).get("chat_template"):
                return checkpoint
    root = root or os.path.join(tempfile.gettempdir(), f"tandem-dynamo-cards-{os.getuid()}")
    ckpt = os.path.abspath(checkpoint)
    # one folder per checkpoint path (a stable digest: every worker of a model must register the same card)
    card = os.path.join(root, f"{os.path.basename(ckpt.rstrip('/'))}-{hashlib.sha256(ckpt.encode()).hexdigest()[:12]}")
    os.makedirs(card, exist_ok=True)
    for name in os.listdir(ckpt):
        if name.endswith((".json", ".txt", ".model")) and name != "tokenizer_config.json":
            link = os.path.join(card, name)
            if not os.path.lexists(link):
                os.symlink(os.path.join(ckpt, name), link)
    special = _special_tokens(os.path.join(ckpt, "tokenizer.json"), os.path.join(ckpt, "config.json"))
    tmp = os.path.join(card, f".tokenizer_config.{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"chat_template": DEFAULT_CHAT_TEMPLATE, "model_max_length": max_model_len,
                   "tokenizer_class": "PreTrainedTokenizerFast", **special}, f)
    os.replace(tmp, os.path.join(card, "tokenizer_config.json"))
    return card


def _special_tokens(tokenizer_json: str, config_json: str) -> dict:
    with open(config_json) as f:
        cfg = json.load(f)
    try:
        with open(tokenizer_json) as f:
            added = {t["id"]: t["content"] for t in json.load(f).get("added_tokens", [])}
    except FileNotFoundError:
        return {}
    out = {}
    for key in ("bos_token", "eos_token"):
        ids = cfg.get(f"{key}_id")
        tid = ids[0] if isinstance(ids, list) and ids else ids
        if tid in added:
            out[key] = added[tid]
    return out


# ---- one-host settings and the event broker ----------------------------------------------------------------------
def local_env(state_dir: str, xsub_port: int, xpub_port: int) -> dict[str, str]:
    """Dynamo settings for one host with nothing else to start (no etcd, no NATS) and every listener on loopback:
    file discovery, TCP request plane, ZMQ events through the loopback broker (Dynamo's direct publishers would
    bind 0.0.0.0)."""
    return {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": os.path.join(state_dir, "discovery"),
            "DYN_REQUEST_PLANE": "tcp", "DYN_EVENT_PLANE": "zmq",
            "DYN_TCP_RPC_HOST": "127.0.0.1", "DYN_TCP_RESPONSE_STREAM_HOST": "127.0.0.1",
            "DYN_EVENT_PLANE_HOST": "127.0.0.1", "DYN_SYSTEM_HOST": "127.0.0.1", "DYN_HTTP_HOST": "127.0.0.1",
            "DYN_ZMQ_BROKER_URL": f"xsub=tcp://127.0.0.1:{xsub_port} , xpub=tcp://127.0.0.1:{xpub_port}",
            "HF_HUB_OFFLINE": "1"}


def run_broker(host: str, xsub_port: int, xpub_port: int) -> None:
    """Relay Dynamo's ZMQ events (publishers -> XSUB, subscribers <- XPUB), bound on `host` only."""
    ctx = zmq.Context.instance()
    xsub, xpub = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)
    xsub.bind(f"tcp://{host}:{xsub_port}")
    xpub.bind(f"tcp://{host}:{xpub_port}")
    print(f"TANDEM_DYNAMO_BROKER_READY xsub=tcp://{host}:{xsub_port} xpub=tcp://{host}:{xpub_port}", flush=True)
    zmq.proxy(xsub, xpub)
