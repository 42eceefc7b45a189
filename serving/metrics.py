"""The server's Prometheus collectors (TTFT, TPOT, ITL, e2e, tokens, KV pages, prefix-cache hit rate, ...)."""

from __future__ import annotations

from serving.api import Request, output_of

class Metrics:
    """Prometheus collectors on a private registry (several servers can live in one process: tests)."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        lat = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "arrival -> first token", buckets=lat,
                              registry=r)
        self.tpot = Histogram("tandem_time_per_output_token_seconds", "(e2e - ttft) / (tokens - 1)", buckets=lat,
                              registry=r)
        self.itl = Histogram("tandem_inter_token_latency_seconds", "gaps between streamed chunks", buckets=lat,
                             registry=r)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "arrival -> finish", buckets=lat, registry=r)
        self.requests = Counter("tandem_requests", "finished requests", ["finish_reason"], registry=r)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "prompt tokens", registry=r)
        self.generation_tokens = Counter("tandem_generation_tokens", "generated tokens", registry=r)
        self.cached_tokens = Counter("tandem_prefix_cached_tokens", "prompt tokens served from the prefix cache",
                                     registry=r)
        self.rejected = Counter("tandem_rejected_requests", "requests refused", ["code"], registry=r)
        self.spec_proposed = Counter("tandem_spec_decode_draft_tokens", "MTP drafts verified", registry=r)
        self.spec_accepted = Counter("tandem_spec_decode_accepted_tokens", "MTP drafts accepted", registry=r)
        self.transfer_s = Histogram("tandem_kv_transfer_seconds", "KV transfer per request (disaggregated)",
                                    buckets=lat, registry=r)
        self.transfer_bytes = Counter("tandem_kv_transfer_bytes", "KV bytes moved prefill -> decode", registry=r)
        self.queue = Gauge("tandem_num_requests_in_flight", "requests admitted and not finished", registry=r)
        self.running = Gauge("tandem_num_requests_running", "requests decoding", registry=r)
        self.waiting = Gauge("tandem_num_requests_waiting", "requests waiting or prefilling", registry=r)
        self.prefill_budget = Gauge("tandem_prefill_budget_tokens", "prompt tokens the last colocated step could "
                                    "prefill (grows with the prefill backlog)", registry=r)
        self.pages = Gauge("tandem_kv_pages", "KV pages by state", ["engine", "state"], registry=r)
        self.features = Counter("tandem_feature_requests", "finished requests that used a feature", ["feature"],
                                registry=r)
        self.prefix_hit_rate = Gauge("tandem_prefix_cache_hit_rate", "prefix-cache block hit rate by tier",
                                     ["engine", "tier"], registry=r)
        self.expert_imbalance = Gauge("tandem_expert_load_imbalance", "max/mean routed token copies per EP rank "
                                      "(per expert without EP) since the last placement, by MoE layer",
                                      ["engine", "layer"], registry=r)
        self.expert_copies = Gauge("tandem_expert_routed_copies", "routed token copies counted (all MoE layers)",
                                   ["engine"], registry=r)
        self.eplb_rebalances = Gauge("tandem_eplb_rebalances", "EPLB placements applied", ["engine"], registry=r)

    def observe(self, req: Request, transfer_bytes: int = 0) -> None:
        m = output_of(req).metrics
        self.requests.labels(req.finish_reason or "unknown").inc()
        self.prompt_tokens.inc(m.prompt_tokens)
        self.generation_tokens.inc(m.output_tokens)
        self.cached_tokens.inc(m.cached_tokens)
        for h, v in ((self.ttft, m.ttft_s), (self.tpot, m.tpot_s), (self.e2e, m.e2e_s), (self.transfer_s,
                                                                                         m.transfer_s)):
            if v is not None:
                h.observe(v)
        for g in m.itl_s:
            self.itl.observe(g)
        p = req.params
        for name, used in (("logprobs", p.logprobs is not None), ("prompt_logprobs", p.prompt_logprobs is not None),
                           ("structured_output", p.structured_output is not None),
                           ("penalties", p.presence_penalty != 0 or p.frequency_penalty != 0
                            or p.repetition_penalty != 1), ("logit_bias", bool(p.logit_bias)),
                           ("min_tokens", p.min_tokens > 0), ("cache_salt", p.cache_salt is not None)):
            if used:
                self.features.labels(name).inc()
        self.spec_proposed.inc(m.spec_proposed)
        self.spec_accepted.inc(m.spec_accepted)
        if transfer_bytes:
            self.transfer_bytes.inc(transfer_bytes)
