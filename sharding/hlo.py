"""Reading an XLA HLO module's text: its collectives (wire bytes per device) and its kernel count.

Shared by `bench.comm_bytes` (collectives of a real-dims decode step) and `sharding.planner` (the planner's step
profiles). Bytes per device are wire bytes under the usual algorithms, for a group of n devices and a per-device
result of R bytes: all-to-all and all-gather (n-1)/n*R, reduce-scatter (n-1)*R, all-reduce 2(n-1)/n*R (ring),
collective-permute R.
"""

from __future__ import annotations

import re

OPS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1,
         "s64": 8, "f64": 8}
FLOAT_TYPES = ("bf16", "f16", "f32", "f64", "f8e4m3fn")
_LINE = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>\(.*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?)\s+"
                   r"(?P<op>" + "|".join(OPS) + r")(?:-start)?\(")


def shape_bytes(s: str, *, floats: bool | None = None) -> int:
    """Bytes of an HLO shape string (a tuple sums its parts); floats=True/False: only float / non-float parts."""
    total = 0
    for dt, dims in re.findall(r"(\w+)\[([^\]]*)\]", s):
        if floats is not None and (dt in FLOAT_TYPES) != floats:
            continue
        n = 1
        for d in filter(None, dims.split(",")):
            n *= int(d)
        total += n * BYTES.get(dt, 4)
    return total


def group_size(line: str, n_devices: int) -> int:
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if m:  # mesh['axis_0'=8,'axis_1'=4] {'axis_0'}: groups along the named axes
        sizes = {k: int(v) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))}
        n = 1
        for a in re.findall(r"'(\w+)'", m.group(2)):
            n *= sizes[a]
        return n
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", line)
    if m:
        return int(m.group(2))
    m = re.search(r"replica_groups=\{(\{[^}]*\})", line)
    if m:
        return len(m.group(1).strip("{}").split(","))
    if "collective-permute" in line:
        return 2
    return n_devices


def replica_groups(line: str, n_devices: int) -> list[list[int]]:
    """The device (partition) groups of one collective line: explicit `{{0,1},{2,3}}`, iota `[G,S]<=[dims]T(perm)`,
    `mesh[...] {axes}`, a collective-permute's source/target pairs; all devices in one group when none is given."""
    import numpy as np

    if "collective-permute" in line:
        m = re.search(r"source_target_pairs=\{(.*?)\}\}", line)
        return [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", m.group(1) + "}")] if m else []
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", line)
    if m:
        dims = [int(d) for d in m.group(3).split(",")]
        ids = np.arange(int(np.prod(dims))).reshape(dims)
        if m.group(4):
            ids = ids.transpose([int(p) for p in m.group(4).split(",")])
        return ids.reshape(int(m.group(1)), int(m.group(2))).tolist()
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
    if m:
        sizes = [(k, int(v)) for k, v in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
        names = [k for k, _ in sizes]
        axes = [names.index(a) for a in re.findall(r"'(\w+)'", m.group(2))]
        ids = np.arange(int(np.prod([v for _, v in sizes]))).reshape([v for _, v in sizes])
        rest = [i for i in range(len(sizes)) if i not in axes]
        return ids.transpose(rest + axes).reshape(-1, int(np.prod([sizes[i][1] for i in axes]))).tolist()
    m = re.search(r"replica_groups=\{(\{[\d,]*\}(?:,\{[\d,]*\})*)\}", line)
    if m:
        return [[int(x) for x in g.split(",") if x] for g in re.findall(r"\{([\d,]*)\}", m.group(1))]
    return [list(range(n_devices))]


def cross_domain_fraction(groups: list[list[int]], domain_of, permute: bool = False) -> float:
    """The share of a collective's wire bytes that leave a domain: per device, the fraction of its peers (in its
    group) in another domain, averaged over devices (every peer gets an equal share, as in all-to-all); for a
    collective-permute, the share of (source, target) pairs that cross."""
    if permute:
        return sum(domain_of[a] != domain_of[b] for a, b in groups) / len(groups) if groups else 0.0
    shares = [sum(domain_of[p] != domain_of[d] for p in g) / (len(g) - 1) for g in groups if len(g) > 1 for d in g]
    return sum(shares) / len(shares) if shares else 0.0


def wire_factor(op: str, n: int) -> float:
    """Wire bytes per device per byte of the op's per-device result, for a group of n."""
    if n <= 1:
        return 0.0
    return {"all-to-all": (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": float(n - 1),
            "all-reduce": 2 * (n - 1) / n, "collective-permute": 1.0}[op]


def collectives(hlo: str, n_devices: int, domain_of=None) -> list[dict]:
    """Every collective in an HLO module: op, result bytes (all; float parts; the rest), group size, wire bytes,
    op_name metadata; with `domain_of` (partition id -> domain, e.g. host) also `cross_wire`, the wire bytes that
    leave the domain (`cross_domain_fraction`)."""
    out = []
    for line in hlo.splitlines():
        m = _LINE.match(line)
        if not m or "-done(" in line:
            continue
        shape = m.group("shape")
        R = shape_bytes(shape)
        n = group_size(line, n_devices)
        name = re.search(r'op_name="([^"]*)"', line)
        out.append(dict(op=m.group("op"), bytes=R, float_bytes=shape_bytes(shape, floats=True),
                        other_bytes=shape_bytes(shape, floats=False), group=n,
                        wire=wire_factor(m.group("op"), n) * R, op_name=name.group(1) if name else ""))
        if domain_of is not None:
            frac = cross_domain_fraction(replica_groups(line, n_devices), domain_of,
                                         permute=m.group("op") == "collective-permute")
            out[-1]["cross_wire"] = out[-1]["wire"] * frac
    return out


# Instructions that launch no kernel of their own (bookkeeping, views, control flow shells).
_FREE = {"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "after-all", "partition-id",
         "replica-id", "iota", "while", "conditional", "call", "opt-barrier", "add-dependency", "domain"}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?:\(.*?\)|\w+\[[^\]]*\](?:\{[^}]*\})?|\w+\[\])\s+"
                    r"(?P<op>[\w\-]+)\(")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")


def kernel_count(hlo: str) -> int:
    """Kernels one run of a compiled module launches, counting each loop/branch body once: the instructions of
    every computation that is not a fusion body (fusions, dots, copies, collectives, custom calls, ...), minus
    bookkeeping (parameters, tuples, bitcasts, control-flow shells)."""
    n, in_fused = 0, False
    for line in hlo.splitlines():
        c = _COMP.match(line)
        if c and "=" not in line.split("{")[0]:
            in_fused = "fused" in c.group("name") or "fusion" in c.group("name")
            continue
        if in_fused:
            continue
        m = _INSTR.match(line)
        if m and m.group("op") not in _FREE:
            n += 1
    return n
