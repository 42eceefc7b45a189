"""KV-aware routing for `serving.router_core.RouterCore` (a mixin over its state: `workers`, `kv_index`, `cfg`,
`metrics`): the block hashes each worker reports cached (its KV events), a prompt's leading blocks a worker holds,
and Dynamo's cost (weight x blocks it would compute + blocks it is already serving) to pick among workers."""

from __future__ import annotations


class KVRouting:
    def _on_kv_events(self, w, kv) -> None:
        if not isinstance(kv, dict):
            return
        for h in kv.get("stored") or ():
            if isinstance(h, int):
                self.kv_index.setdefault(h, set()).add(w.addr)
                w.kv_blocks.add(h)
        for h in kv.get("removed") or ():
            if isinstance(h, int):
                holders = self.kv_index.get(h)
                if holders is not None:
                    holders.discard(w.addr)
                    if not holders:
                        del self.kv_index[h]
                w.kv_blocks.discard(h)

    def _drop_kv(self, w) -> None:
        self._on_kv_events(w, {"removed": list(w.kv_blocks)})

    def _prompt_hashes(self, prompt: list[int], info: dict, salt: str | None = None) -> list[int]:
        if not (self.cfg.kv_routing and self.kv_index):
            return []
        from serving.prefix_cache import block_hashes   # (numpy + hashlib; kept out of the core's imports)
        Z = int(info.get("page_size") or 16)
        return block_hashes(prompt, Z, (len(prompt) - 1) // Z, lookahead=int(info.get("kv_lookahead") or 0),
                            salt=salt)

    def _overlap(self, w, hashes: list[int]) -> int:
        """Leading prompt blocks `w` holds cached."""
        n = 0
        for h in hashes:
            if w.addr not in self.kv_index.get(h, ()):
                break
            n += 1
        return n

    def _kv_cost(self, w, hashes: list[int], blocks: int) -> tuple:
        """Weight x blocks it would prefill (prompt blocks minus its cached prefix) + blocks it is already serving
        (prefilling, or decoding: their prompts)."""
        active = sum(b or 0 for b in w.inflight.values())
        return (self.cfg.kv_overlap_weight * (blocks - self._overlap(w, hashes)) + active, len(w.inflight), w.addr)

    def _pick_prefill(self, cands: list, hashes: list[int], blocks: int):
        """Least `_kv_cost`. Without cache events this is the least-loaded worker."""
        p = min(cands, key=lambda w: self._kv_cost(w, hashes, blocks))
        hit = self._overlap(p, hashes)
        if hit:
            self.metrics["kv_routed_requests"] += 1
            self.metrics["kv_routed_blocks"] += hit
        return p
