"""Device topology: hosts x devices x domains, and pool placement onto it.

A *domain* is a set of devices joined by a fast fabric (an NVLink/NVSwitch island: one HGX host, or a whole
GB200 NVL72 rack). Links inside a domain and links across domains have a bandwidth class each. Placement keeps
every TP group and every EP group of a pool inside one domain, because their collectives (all-reduce for TP,
all-to-all for EP) run every layer of every step; dp replicas only meet at the router and may span domains.

    topo = Topology.preset("cpu:8/2")                 # 8 fake CPU devices in 2 domains of 4 (tests)
    prefill = topo.allocate("prefill", ep=4)          # Mesh (dp=1, ep=4, tp=1) inside one domain
    decode = topo.allocate("decode", dp=2, tp=2)      # disjoint devices
    topo.placement("decode").report                   # where it went and the bandwidth class of its groups
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Sequence

import numpy as np
from jax.sharding import Mesh

from sharding.rules import MESH_AXES

log = logging.getLogger(__name__)


class PlacementError(ValueError):
    """A pool cannot be placed as asked on this topology."""


@dataclasses.dataclass(frozen=True)
class LinkClass:
    name: str                    # e.g. "nvlink5", "infiniband-400g"
    gbytes_per_s: float | None   # per-device, one direction; None where the preset does not declare one

    def __str__(self) -> str:
        bw = "bandwidth not declared" if self.gbytes_per_s is None else f"{self.gbytes_per_s:g} GB/s"
        return f"{self.name} ({bw})"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a pool went: mesh shape, device ids (topology indices) per mesh position, and how groups map to
    domains."""

    pool: str
    shape: tuple[int, int, int]                  # (dp, ep, tp)
    device_ids: np.ndarray                       # [dp, ep, tp] indices into Topology.devices
    tp_cross_domain: bool                        # some TP group spans more than one domain
    ep_cross_domain: bool                        # some EP group spans more than one domain
    link: LinkClass                              # the slowest link any TP/EP group uses
    report: str

    @property
    def cross_domain(self) -> bool:
        return self.tp_cross_domain or self.ep_cross_domain


class Topology:
    """Devices (jax devices, or plain ids for a declared, unbound topology) with host and domain of each.

    Stateful only in which devices are taken by which pool; the device/host/domain description is fixed.
    """

    def __init__(self, name: str, devices: Sequence[Any], host_of: Sequence[int], domain_of: Sequence[int],
                 in_domain: LinkClass, cross_domain: LinkClass):
        if not (len(devices) == len(host_of) == len(domain_of)):
            raise ValueError("devices, host_of and domain_of must have one entry per device")
        if not devices:
            raise ValueError("a topology needs at least one device")
        self.name = name
        self.devices = tuple(devices)
        self.host_of = tuple(int(h) for h in host_of)
        self.domain_of = tuple(int(d) for d in domain_of)
        self.in_domain = in_domain
        self.cross_domain = cross_domain
        self._pools: dict[str, Placement] = {}

    # ---- description ----------------------------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        """True when `devices` are jax devices (meshes can be built), False for a declared planning topology."""
        return not isinstance(self.devices[0], int)

    @property
    def domains(self) -> tuple[tuple[int, ...], ...]:
        """Device indices of each domain, in domain order."""
        ids = sorted(set(self.domain_of))
        return tuple(tuple(i for i, d in enumerate(self.domain_of) if d == dom) for dom in ids)

    @property
    def hosts(self) -> tuple[tuple[int, ...], ...]:
        ids = sorted(set(self.host_of))
        return tuple(tuple(i for i, h in enumerate(self.host_of) if h == host) for host in ids)

    def link(self, a: int, b: int) -> LinkClass:
        return self.in_domain if self.domain_of[a] == self.domain_of[b] else self.cross_domain

    def free(self) -> list[int]:
        taken = {int(i) for p in self._pools.values() for i in p.device_ids.ravel()}
        return [i for i in range(len(self.devices)) if i not in taken]

    def __repr__(self) -> str:
        sizes = [len(d) for d in self.domains]
        return (f"Topology({self.name!r}: {len(self.devices)} devices, {len(self.hosts)} hosts, {len(sizes)} "
                f"domains of {sizes}; in-domain {self.in_domain}, cross-domain {self.cross_domain})")

    # ---- construction ---------------------------------------------------------------------------------------
    @classmethod
    def from_devices(cls, devices: Sequence[Any] | None = None, *, domain_size: int | None = None,
                     in_domain: LinkClass = LinkClass("in-domain", None),
                     cross_domain: LinkClass = LinkClass("cross-domain", None)) -> "Topology":
        """From jax devices: host = `process_index`; domain = `slice_index` where the platform gives one (TPU
        slices, multi-node NVLink; CPU devices report 0 for every process, so on CPU it is ignored), else the host
        (an HGX board is one NVLink domain). `domain_size` instead cuts each host's
        devices, in id order, into domains of that size (e.g. 72 for an NVL72 rack seen as 18 hosts: pass the
        devices in rack order)."""
        import jax

        devices = list(jax.devices() if devices is None else devices)
        devices.sort(key=lambda d: (d.process_index, d.id))
        host_of = [d.process_index for d in devices]
        if domain_size is not None:
            if len(devices) % domain_size:
                raise ValueError(f"{len(devices)} devices do not split into domains of {domain_size}")
            domain_of = [i // domain_size for i in range(len(devices))]
        elif devices[0].platform != "cpu" and all(getattr(d, "slice_index", None) is not None for d in devices):
            domain_of = [d.slice_index for d in devices]
        else:
            domain_of = host_of
        name = f"{devices[0].platform}:{len(devices)}"
        return cls(name, devices, host_of, domain_of, in_domain, cross_domain)

    @classmethod
    def preset(cls, name: str, *, hosts: int | None = None, devices: Sequence[Any] | None = None
               ) -> "Topology":
        """A declared topology.

        * `h100-8`      — HGX H100: 8 GPUs per host, one NVLink4 domain per host (900 GB/s), hosts joined by
                          400 Gb/s InfiniBand per GPU (50 GB/s).
        * `hgx-h200`    — HGX H200: as h100-8 (NVLink4, 900 GB/s per GPU, 400 Gb/s IB), 141 GB HBM3e per GPU.
        * `hgx-b200`    — HGX B200: 8 GPUs per host, one NVLink5 domain per host (1.8 TB/s), 400 Gb/s per GPU.
        * `gb200-nvl72` — GB200 NVL72: 18 compute trays (hosts) x 4 GPUs in one NVLink5 domain of 72 (1.8 TB/s);
                          racks joined by 400 Gb/s per GPU.
        * `cpu:N/D`     — N fake CPU devices in D equal domains, one host; no bandwidths (tests).

        `hosts` (or racks, for NVL72) defaults to 1. `devices`: the jax devices to bind to (must be exactly as
        many); without it a `cpu:N/D` preset binds to `jax.devices()[:N]` and the GPU presets stay unbound
        (planning only: `plan()` works, `allocate()` needs devices).
        """
        m = re.fullmatch(r"cpu:(\d+)/(\d+)", name)
        if m:
            n, d = int(m.group(1)), int(m.group(2))
            if d < 1 or n < 1 or n % d:
                raise ValueError(f"preset {name!r}: N={n} devices must split evenly into D={d} domains")
            if devices is None:
                import jax

                devices = jax.devices()[:n]
                if len(devices) < n:
                    raise ValueError(f"preset {name!r} needs {n} devices; jax has {len(jax.devices())} (set "
                                     f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before importing jax)")
            return cls._declared(name, n, 1, n // d, LinkClass("fake-in-domain", None),
                                 LinkClass("fake-cross-domain", None), devices)
        hosts = 1 if hosts is None else hosts
        if name == "h100-8":
            return cls._declared(name, 8 * hosts, 8, 8, LinkClass("nvlink4", 900.0),
                                 LinkClass("infiniband-400g", 50.0), devices)
        if name == "hgx-h200":
            return cls._declared(name, 8 * hosts, 8, 8, LinkClass("nvlink4", 900.0),
                                 LinkClass("infiniband-400g", 50.0), devices)
        if name == "hgx-b200":
            return cls._declared(name, 8 * hosts, 8, 8, LinkClass("nvlink5", 1800.0),
                                 LinkClass("infiniband-400g", 50.0), devices)
        if name == "gb200-nvl72":
            return cls._declared(name, 72 * hosts, 4, 72, LinkClass("nvlink5", 1800.0),
                                 LinkClass("infiniband-400g", 50.0), devices)
        raise ValueError(f"unknown topology preset {name!r}; known: h100-8, hgx-h200, hgx-b200, gb200-nvl72, cpu:N/D")

    @classmethod
    def _declared(cls, name, n, per_host, per_domain, fast, slow, devices):
        if devices is not None:
            devices = list(devices)
            if len(devices) != n:
                raise ValueError(f"preset {name!r} has {n} devices; {len(devices)} were given to bind to")
        else:
            devices = list(range(n))
        return cls(name, devices, [i // per_host for i in range(n)], [i // per_domain for i in range(n)],
                   fast, slow)

    # ---- placement ------------------------------------------------------------------------------------------
    def plan(self, pool: str, *, dp: int = 1, ep: int = 1, tp: int = 1, allow_cross_domain: bool = False
             ) -> Placement:
        """Choose devices for a (dp, ep, tp) pool among the free ones, without taking them.

        Each dp replica's ep x tp block (which holds all of its TP and EP groups) goes inside one domain when
        some free domain has room (best fit, so big holes stay for big blocks). Otherwise, only with
        `allow_cross_domain=True`, TP groups are still kept inside domains where they fit and EP groups (or, if
        tp exceeds a domain, TP groups too) span domains; the placement says so.
        """
        for k, v in (("dp", dp), ("ep", ep), ("tp", tp)):
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise PlacementError(f"pool {pool!r}: {k}={v!r} must be a positive integer")
        if pool in self._pools:
            raise PlacementError(f"pool {pool!r} is already allocated on {self.name}; release() it first")
        need = dp * ep * tp
        free = self.free()
        if need > len(free):
            raise PlacementError(f"pool {pool!r} needs dp*ep*tp = {dp}*{ep}*{tp} = {need} devices; only "
                                 f"{len(free)} of {len(self.devices)} are free on {self.name}")
        free_by_dom = {d: [i for i in dom if i in set(free)] for d, dom in enumerate(self.domains)}
        block = ep * tp
        ids = self._fit_blocks(free_by_dom, dp, block)
        if ids is None:
            sizes = [len(v) for v in free_by_dom.values()]
            if not allow_cross_domain:
                why = (f"an ep*tp block of {block} devices is larger than any domain "
                       f"({max(len(d) for d in self.domains)} devices)" if block > max(len(d) for d in self.domains)
                       else f"free devices per domain are {sizes}, which do not hold {dp} block(s) of {block}")
                raise PlacementError(
                    f"pool {pool!r} (dp={dp}, ep={ep}, tp={tp}) cannot keep every TP and EP group inside one "
                    f"domain of {self.name}: {why}. Use fewer devices per group, or allow_cross_domain=True to "
                    f"let groups span domains at cross-domain bandwidth ({self.cross_domain})")
            ids = self._cross_domain(free_by_dom, dp, ep, tp)
        arr = np.asarray(ids, dtype=np.int64).reshape(dp, ep, tp)
        tp_x = any(len({self.domain_of[i] for i in arr[a, b, :]}) > 1 for a in range(dp) for b in range(ep))
        ep_x = any(len({self.domain_of[i] for i in arr[a, :, c]}) > 1 for a in range(dp) for c in range(tp))
        link = self.cross_domain if (tp_x or ep_x) else self.in_domain
        doms = sorted({self.domain_of[i] for i in arr.ravel()})
        spans = [k for k, x in (("TP", tp_x), ("EP", ep_x)) if x]
        report = (f"pool {pool!r}: mesh dp={dp} ep={ep} tp={tp} on {need} devices of {self.name} in domain(s) "
                  f"{doms}; " + (f"{' and '.join(spans)} groups span domains: their collectives run at "
                                 f"cross-domain bandwidth {self.cross_domain}" if spans else
                                 f"every TP and EP group is inside one domain ({self.in_domain})"))
        return Placement(pool, (dp, ep, tp), arr, tp_x, ep_x, link, report)

    def allocate(self, pool: str, *, dp: int = 1, ep: int = 1, tp: int = 1, allow_cross_domain: bool = False
                 ) -> Mesh:
        """Take devices for `pool` and return its `Mesh` with axes ('dp', 'ep', 'tp'); see `plan`."""
        if not self.bound:
            raise PlacementError(f"topology {self.name!r} is declared without devices (planning only): use "
                                 "plan(), or Topology.preset(..., devices=jax.devices()) to build meshes")
        p = self.plan(pool, dp=dp, ep=ep, tp=tp, allow_cross_domain=allow_cross_domain)
        self._pools[pool] = p
        (log.warning if p.cross_domain else log.info)("%s", p.report)
        devs = np.empty(p.device_ids.shape, dtype=object)
        for idx, i in np.ndenumerate(p.device_ids):
            devs[idx] = self.devices[i]
        return Mesh(devs, MESH_AXES)

    def placement(self, pool: str) -> Placement:
        try:
            return self._pools[pool]
        except KeyError:
            raise KeyError(f"no pool {pool!r} on {self.name}; allocated: {sorted(self._pools)}") from None

    def release(self, pool: str) -> None:
        self.placement(pool)
        del self._pools[pool]

    @staticmethod
    def _fit_blocks(free_by_dom: dict[int, list[int]], n_blocks: int, block: int) -> list[int] | None:
        free = {d: list(v) for d, v in free_by_dom.items()}
        out: list[int] = []
        for _ in range(n_blocks):
            fits = [d for d, v in free.items() if len(v) >= block]
            if not fits:
                return None
            d = min(fits, key=lambda d: (len(free[d]), d))  # best fit
            out += free[d][:block]
            free[d] = free[d][block:]
        return out

    @staticmethod
    def _cross_domain(free_by_dom: dict[int, list[int]], dp: int, ep: int, tp: int) -> list[int]:
        # TP groups inside a domain wherever tp devices are free together, taken domain by domain so that the
        # EP groups built from consecutive TP groups touch as few domains as possible.
        groups: list[list[int]] = []
        rest: list[int] = []
        for d in sorted(free_by_dom):
            v = free_by_dom[d]
            k = len(v) // tp
            groups += [v[j * tp:(j + 1) * tp] for j in range(k)]
            rest += v[k * tp:]
        need = dp * ep
        if len(groups) < need:  # tp larger than what any domain has free: TP groups span domains as well
            flat = [i for g in groups for i in g] + rest
            return flat[: need * tp]
        return [i for g in groups[:need] for i in g]
