"""The decode worker's side of a KV transfer (`serving.worker.Worker` mixes it in): pull an offer's pages —
after the parts offered while its prompt still ran, most of them pulled ahead (`prepull`) — check them, and move
them onto the decode mesh as one `Prefix`, on a thread; the worker's loop takes the result from `_pulled`."""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import time

import numpy as np

from serving.steps import Prefix
from serving.logits import logprobs_from_wire
from serving.transfer import spec_from_wire, verify_pages

log = logging.getLogger("serving.worker")


@dataclasses.dataclass
class Early:
    """A part pulled ahead of its offer (`Worker._prepull`)."""
    done: threading.Event
    pages: tuple | None = None   # (the array as pulled, real pages)
    error: str | None = None


class KVReceiver:
    """Uses the worker's engine, transport, verify, pull_timeout_s, metrics, fault_* settings, drain_deadline,
    `_early` (rid -> parts pulled ahead), `_pulled` (results for the loop) and `_wake_w` (the loop's wake pipe)."""

    members = None   # a decode group's leader pulling into its members (`serving.group_kv.MemberPulls`)

    def _member_for(self, req, offer: dict | None, early: dict | None) -> int | None:
        """A group leader with `members`: the process whose ranks take this request (0: the leader's own), chosen
        before the pull — the one its streamed parts went to, else `Scheduler.owner_for`; None: any rank."""
        if self.members is None:
            return None
        if early is not None and "owner" in early:
            return early["owner"]
        n = self.engine.pages_needed(len(req.prompt_ids) + req.limit) if req is not None else 1
        hashes = (self.scheduler.pages.hashes(req.prompt_ids, req.salt)
                  if req is not None and (offer or {}).get("skip") and req.cacheable else None)
        pending = collections.Counter(s.get("owner") for s in self._pulls.values())
        pending.update(self.scheduler.ready_owners())
        return self.scheduler.owner_for(n, self.members.owners, pending, hashes)

    def _forget_early(self, rid: str) -> None:
        """Parts pulled ahead for `rid` are no longer wanted (abort, or no offer within lease_s)."""
        early = self._early.pop(rid, None)
        if early is not None and early.get("owner"):
            self.members.drop(early["owner"], rid=rid)

    def _prepull(self, rid: str, part: dict) -> None:
        """The router's early notice of a part of a request's offer (its prompt still prefilling): pull it now, on
        a thread, so the offer finds it here (in a group, on the member chosen for it). Kept until the request's
        `decode`, an abort, or `lease_s`."""
        if self.drain_deadline is not None or not isinstance(part, dict) or not isinstance(part.get("uuid"), int):
            return
        held = self._early.setdefault(rid, {"t": time.monotonic()})
        if self.members is not None and "owner" not in held:
            held["owner"] = self._member_for(None, None, None)
        if held.get("owner"):   # that member pulls it
            if part["uuid"] not in held:
                held[part["uuid"]] = None
                self.members.part(held["owner"], rid, part)
                self.metrics["parts_forwarded"] += 1
            return
        if part["uuid"] not in held:
            held[part["uuid"]] = e = Early(threading.Event())
            threading.Thread(target=self._pull_part, args=(part, e), name=f"prepull-{rid}", daemon=True).start()

    def _pull_part(self, part: dict, e: "Early | None" = None) -> tuple:
        """One part: (its pages as pulled [L, bucket, Z, C], checksummed; how many are real). With `e`: into it,
        never raising."""
        try:
            specs = [spec_from_wire(d) for d in part["arrays"]]
            (pages,) = self.transport.pull(part["addr"], int(part["uuid"]), specs, self.pull_timeout_s)
            if self.verify:
                verify_pages(np.asarray(pages), part["checksums"])
            got = (pages, int(part["end"]) - int(part["start"]))
            if not 0 < got[1] <= pages.shape[1]:
                raise ValueError(f"part of pages {part['start']}-{part['end']} in an array of {pages.shape[1]}")
            if e is None:
                return got
            e.pages = got
        except Exception as x:
            if e is None:
                raise
            e.error = f"{type(x).__name__}: {x}"
        finally:
            if e is not None:
                e.done.set()

    def _part_pages(self, offer: dict, early: dict | None) -> list[tuple]:
        """The pages of the offer's parts, in order: pulled early when the router said so, else now (or again, if
        that pull failed)."""
        out = []
        for part in offer.get("parts") or ():
            e = (early or {}).get(part.get("uuid"))
            if e is not None and e.done.wait(self.pull_timeout_s) and e.pages is not None:
                self.metrics["parts_pulled_early"] += 1
                out.append(e.pages)
            else:
                self.metrics["parts_pulled_late"] += 1   # not told of it, or its early pull failed
                if e is not None and e.error:
                    log.warning("early pull of part %s failed (%s); pulling it again", part.get("uuid"), e.error)
                out.append(self._pull_part(part))
        return out

    def _pull_pieces(self, offer: dict, early: dict | None) -> list[tuple]:
        """Transport -> offered layout -> checksums: (pages as pulled, real pages) of the offer's parts (pulled
        ahead or now), then of its own pages."""
        if self.fault_pull_delay_s:
            time.sleep(self.fault_pull_delay_s)  # fault injection (tests): widen the transfer window
        specs = [spec_from_wire(d) for d in offer["arrays"]]
        if len(specs) != 1:
            raise ValueError(f"an offer holds one array (the latent pages), got {len(specs)}")
        parts = self._part_pages(offer, early)
        (pages,) = self.transport.pull(offer["addr"], int(offer["uuid"]), specs, self.pull_timeout_s)
        if self.verify:
            host = np.asarray(pages)
            if self.fault_corrupt_pages and np.random.random() < self.fault_corrupt_pages:   # chaos
                host = host.copy()
                host.reshape(-1).view(np.uint8)[host.nbytes // 8 * 4 + 3] ^= 0x40   # a high exponent bit
            verify_pages(host, offer["checksums"])
        out = parts + [(pages, int(offer["n_pages"]))]
        self.metrics["pulled_bytes"] += sum(int(a.nbytes) for a, _ in out)
        return out

    def _pull(self, req, offer: dict, state: dict, early: dict | None = None) -> None:
        """Pull thread: the offer's pieces (`_pull_pieces`; in a group with `state["owner"]` a follower, that member
        pulls and keeps them: `serving.group_kv`) -> checked against this cache -> one Prefix on the decode mesh."""
        t0 = time.perf_counter()
        try:
            owner = state.get("owner")
            if owner:
                n = 1 + len(offer.get("parts") or ())
                pieces = self.members.pull(owner, req.id, offer, self.pull_timeout_s * n + self.fault_pull_delay_s)
                self.metrics["member_pulls"] += 1
            else:
                pieces = self._pull_pieces(offer, early)
            for data, _ in pieces:
                want = (self.engine.cache_shape[0], data.shape[1], *self.engine.cache_shape[2:])
                if tuple(data.shape) != want or data.shape[1] not in self.engine.cfg.transfer_buckets:
                    raise ValueError(f"offered pages {list(data.shape)} do not fit this cache (want {list(want)})")
            dq, skip = offer.get("draft_q"), int(offer.get("skip") or 0)
            if not 0 <= skip < self.engine.pages_needed(int(offer["length"])):
                raise ValueError(f"offer skips {skip} pages of a {offer['length']}-token prompt")
            prefix = Prefix(*pieces[0], int(offer["length"]), int(offer["first_token"]), int(offer.get("draft") or 0),
                            None if dq is None else np.frombuffer(dq, np.float32).copy(), skip=skip,
                            **logprobs_from_wire(offer, req.params), rest=tuple(pieces[1:]), owner=owner)
            self._pulled.put((req, offer, prefix if owner else self.engine.receive(prefix), None,
                              time.perf_counter() - t0))
        except Exception as e:
            self._pulled.put((req, offer, None, f"{type(e).__name__}: {e}", time.perf_counter() - t0))
        if (w := self._wake_w) >= 0:
            try:
                os.write(w, b"w")
            except OSError:   # closed meanwhile (the worker stopped)
                pass
