"""Compiled executables on disk, so a restarted engine skips tracing, lowering and compiling.

XLA's persistent compilation cache (`--compilation_cache_dir`) only skips the backend compile: its key is the
lowered HLO, so a restart still traces and lowers every executable (the shipped model's disaggregated pair: most of
its warm start-up). This cache is keyed before tracing: an entry's *slot* (its file) is the engine's identity —
model config, weights' shapes/dtypes/shardings, mesh and devices, cache layout, engine settings, runtime choices —
plus the executable's key (`("decode", B, window)`, ...); its header records what else an executable depends on
(jax/jaxlib versions, Tandem's own source, XLA flags, platform). An entry is used only when all of it matches and
its digest checks; a truncated or corrupt file, or a stale one (another version wrote it), is counted, recompiled
and replaced — never loaded.

Entries are the jax executable serialization (`jax.experimental.serialize_executable`, pickle-based, machine code
inside): the directory is as trusted as the code — created private (0700), files 0600, never shared over the wire.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import pickle
import struct
import tempfile

import jax
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger(__name__)

MAGIC = b"TANDEMX1"
_PACKAGES = ("pallas_kernels", "model", "sharding", "checkpoints", "serving")   # what traced code comes from
_source_digest: str | None = None


def source_digest() -> str:
    """Digest of Tandem's traced source (every .py of the packages an executable's code comes from)."""
    global _source_digest
    if _source_digest is None:
        root = pathlib.Path(__file__).resolve().parent.parent
        d = hashlib.blake2b(digest_size=16)
        for pkg in _PACKAGES:
            for p in sorted((root / pkg).rglob("*.py")):
                d.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
        _source_digest = d.hexdigest()
    return _source_digest


def versions() -> dict:
    """What a compiled executable depends on besides its slot; an entry written under other values is stale."""
    import jaxlib
    backend = jax.devices()[0].client
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "tandem_source": source_digest(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""), "platform": backend.platform,
            "platform_version": backend.platform_version, "x64": bool(jax.config.jax_enable_x64),
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
            "processes": [jax.process_index(), jax.process_count()]}


@contextlib.contextmanager
def fresh_compiles():
    """Compiles inside bypass XLA's persistent compilation cache. Measured with jaxlib 0.10.2 on XLA:CPU: an
    executable that was itself loaded from that cache serializes without some of its functions (the copy fails at
    its first call: "Function bitcast_gather_fusion.3 not found"), so what this cache stores is compiled afresh."""
    if not (jax.config.jax_compilation_cache_dir and jax.config.jax_enable_compilation_cache):
        yield
        return
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()   # the "is the cache used" answer is memoized; ask again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", True)
        compilation_cache.reset_cache()


class ExecutableCache:
    """One engine's executables in `directory`. identity: the engine's identity string (`Engine.identity()`)."""

    def __init__(self, directory: str, identity: str):
        self.dir = pathlib.Path(directory).expanduser()
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.identity = identity
        self.versions = versions()
        self.stats = {"hits": 0, "misses": 0, "stale": 0, "corrupt": 0, "stored": 0, "store_failed": 0}

    def path(self, key) -> pathlib.Path:
        d = hashlib.blake2b((self.identity + "\0" + repr(key)).encode(), digest_size=16)
        return self.dir / f"{d.hexdigest()}.exe"

    def load(self, key) -> "jax.stages.Compiled | None":
        """The executable stored for `key`, or None (absent, stale or corrupt: the caller compiles and stores)."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.stats["misses"] += 1
            return None
        try:
            header, payload = _unpack(data)
        except ValueError as e:
            self.stats["corrupt"] += 1
            log.warning("executable cache: %s for %s is unusable (%s); recompiling it", path.name, key, e)
            return None
        if header.get("identity") != self.identity or header.get("key") != repr(key):
            self.stats["corrupt"] += 1   # another slot's content under this name: never load it
            log.warning("executable cache: %s holds another executable than %s; recompiling it", path.name, key)
            return None
        if header.get("versions") != self.versions:
            self.stats["stale"] += 1
            changed = sorted(k for k in self.versions if header.get("versions", {}).get(k) != self.versions[k])
            log.info("executable cache: %s for %s is stale (%s changed); recompiling it", path.name, key,
                     ", ".join(changed))
            return None
        try:
            blob, in_tree, out_tree = pickle.loads(payload)
            by_id = {d.id: d for d in jax.devices()}
            exe = serialize_executable.deserialize_and_load(   # on the devices it was compiled for, in order
                blob, in_tree, out_tree, execution_devices=[by_id[i] for i in header["devices"]])
        except Exception as e:   # a digest-valid entry this jaxlib cannot load: compile instead
            self.stats["corrupt"] += 1
            log.warning("executable cache: %s for %s did not load (%s: %s); recompiling it", path.name, key,
                        type(e).__name__, e)
            return None
        self.stats["hits"] += 1
        return exe

    def store(self, key, exe: "jax.stages.Compiled") -> "jax.stages.Compiled":
        """Write `exe` for `key` (atomically: a reader sees the old file or the whole new one); returns `exe`."""
        try:
            payload = pickle.dumps(serialize_executable.serialize(exe), protocol=pickle.HIGHEST_PROTOCOL)
            devices = [d.id for d in exe._executable._unloaded_executable.device_list]
        except Exception as e:   # e.g. an executable with constants jax cannot serialize: not cached
            self.stats["store_failed"] += 1
            log.warning("executable cache: %s not stored (%s: %s)", key, type(e).__name__, e)
            return exe
        data = _pack({"identity": self.identity, "key": repr(key), "versions": self.versions, "devices": devices},
                     payload)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(key))
        except BaseException:
            pathlib.Path(tmp).unlink(missing_ok=True)
            raise
        self.stats["stored"] += 1
        return exe


def _pack(header: dict, payload: bytes) -> bytes:
    h = json.dumps(header, sort_keys=True).encode()
    digest = hashlib.blake2b(h + payload, digest_size=32).digest()
    return MAGIC + struct.pack("<QQ", len(h), len(payload)) + digest + h + payload


def _unpack(data: bytes) -> tuple[dict, bytes]:
    n0 = len(MAGIC) + 16 + 32
    if len(data) < n0 or data[:len(MAGIC)] != MAGIC:
        raise ValueError("not an executable cache entry (bad magic or too short)")
    nh, np_ = struct.unpack("<QQ", data[len(MAGIC):len(MAGIC) + 16])
    if len(data) != n0 + nh + np_:
        raise ValueError(f"truncated or padded: {len(data)} bytes, header says {n0 + nh + np_}")
    digest, body = data[len(MAGIC) + 16:n0], data[n0:]
    if hashlib.blake2b(body, digest_size=32).digest() != digest:
        raise ValueError("digest mismatch (corrupt)")
    return json.loads(body[:nh]), body[nh:]
