"""How long a PD worker takes to be ready: cold, with XLA's persistent compilation cache warm, and with Tandem's
executable cache warm (`serving.exec_cache`).

    python -m bench.restart [--checkpoint=DIR] [--runs=3] [--roles=prefill,decode] [-- extra worker flags]

Each start is a fresh `python -m serving.worker` process (default engine settings unless given after `--`); the
time is the worker's own `startup_s` (flags parsed -> ready: weights, KV pool, executables) and the wall time from
spawn to its READY line. Each run: a cold start filling a fresh XLA cache, a start with it warm, a cold start
storing executables (the executable cache compiles afresh, bypassing XLA's cache), a start loading them. The headline
ratio is conservative: the slowest warm start over the fastest cold one.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_CKPT = flags.DEFINE_string("checkpoint", None, "checkpoint dir (default: the shipped model)")
_RUNS = flags.DEFINE_integer("runs", 3, "starts per variant")
_ROLES = flags.DEFINE_list("roles", ["prefill", "decode"], "worker roles to start")
_TIMEOUT = flags.DEFINE_float("timeout_s", 900.0, "a start that is not ready within this fails the benchmark")
_PEER = flags.DEFINE_bool("weights_peer", False, "instead: warm starts (executable cache) reading the checkpoint vs "
                          "taking the weights from a running worker (--weights_from)")


def start(role: str, extra: list[str], xla: str | None = None, exe: str | None = None, keep: bool = False) -> dict:
    """Spawn one worker, wait for READY (bounded), stop it (unless `keep`: then "proc" is in the result); its
    startup figures and READY line."""
    cmd = [sys.executable, "-m", "serving.worker", f"--role={role}", *extra]
    if _CKPT.value:
        cmd.append(f"--checkpoint={_CKPT.value}")
    if xla:
        cmd.append(f"--compilation_cache_dir={xla}")
    if exe:
        cmd.append(f"--executable_cache_dir={exe}")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = t0 + _TIMEOUT.value
    try:
        while True:
            if time.perf_counter() > deadline or proc.poll() is not None:
                raise RuntimeError(f"{role} worker not ready (rc={proc.poll()}, {' '.join(cmd)})")
            if sel.select(timeout=1.0):
                line = proc.stdout.readline()
                if line.startswith("TANDEM_WORKER_READY "):
                    info = json.loads(line.split(" ", 1)[1])
                    out = {"startup_s": info["startup_s"], "wall_s": time.perf_counter() - t0, "ready": info}
                    if keep:
                        out["proc"], proc = proc, None
                    return out
    finally:
        if proc is not None:
            stop(proc)


def stop(proc) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


def peer_runs(extra: list[str], root: str) -> None:
    """Warm starts (executables cached) with the weights from the checkpoint vs from a running peer."""
    rows = ["| role | weights from | startup s (runs) | pull + verify s | MB |", "|---|---|---|---|---|"]
    for role in _ROLES.value:
        xla, exe = os.path.join(root, role, "xla"), os.path.join(root, role, "exe")
        peer = start(role, extra, xla, exe, keep=True)   # fills the executable cache, stays up as the peer
        try:
            addr = peer["ready"]["control"]
            disk, pulled = [], []
            for r in range(_RUNS.value):
                disk.append(start(role, extra, xla, exe))
                pulled.append(start(role, extra + [f"--weights_from={addr}"], xla, exe))
                assert pulled[-1]["ready"]["weights"]["source"] == "peer", pulled[-1]["ready"]["weights"]
                print(role, r, disk[-1]["startup_s"], pulled[-1]["ready"]["weights"], flush=True)
        finally:
            stop(peer["proc"])
        w = [x["ready"]["weights"] for x in pulled]
        rows.append(f"| {role} | checkpoint | {', '.join('%.2f' % x['startup_s'] for x in disk)} | | |")
        rows.append(f"| {role} | peer | {', '.join('%.2f' % x['startup_s'] for x in pulled)} | "
                    f"{', '.join('%.2f' % x['seconds'] for x in w)} | {w[0]['bytes'] / 1e6:.1f} |")
    print("\n".join(rows))


def main(argv):
    extra = list(argv[1:])
    if _PEER.value:
        root = tempfile.mkdtemp(prefix="tandem-restart-")
        try:
            return peer_runs(extra, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    rows = ["| role | variant | startup s (runs) | wall to READY s (runs) |", "|---|---|---|---|"]
    summary = []
    root = tempfile.mkdtemp(prefix="tandem-restart-")
    try:
        for role in _ROLES.value:
            res: dict[str, list[dict]] = {"cold": [], "XLA cache warm": [], "cold, storing executables": [],
                                          "executable cache warm": []}
            for r in range(_RUNS.value):
                xla, exe = os.path.join(root, f"{role}{r}", "xla"), os.path.join(root, f"{role}{r}", "exe")
                res["cold"].append(start(role, extra, xla))   # fills XLA's cache
                res["XLA cache warm"].append(start(role, extra, xla))
                # the executable cache stores fresh compiles only (XLA's cache bypassed: serving.exec_cache)
                res["cold, storing executables"].append(start(role, extra, xla, exe))
                res["executable cache warm"].append(start(role, extra, xla, exe))
                print(role, r, {k: v[-1] for k, v in res.items()}, flush=True)
            for k, v in res.items():
                fmt = lambda field: ", ".join(f"{x[field]:.2f}" for x in v)
                rows.append(f"| {role} | {k} | {fmt('startup_s')} | {fmt('wall_s')} |")
            cold = min(x["startup_s"] for x in res["cold"] + res["cold, storing executables"])
            for k in ("XLA cache warm", "executable cache warm"):
                worst = max(x["startup_s"] for x in res[k])
                summary.append(f"{role}: {k} worst {worst:.2f} s = {worst / cold:.1%} of the fastest cold "
                               f"start ({cold:.2f} s)")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n".join(rows + [""] + summary))


if __name__ == "__main__":
    app.run(main)
