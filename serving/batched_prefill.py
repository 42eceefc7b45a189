"""Batched prefill on a prefill engine (the disaggregated prefill thread, a prefill worker): the prompts waiting
together run through `Engine.prefill_batch` together instead of one request after another.

Each round takes every unfinished request's next chunk; chunks of the same bucket T run in one call of as many
rows as the engine's row buckets allow for T (`EngineConfig.rows_for`: rows x T within `prefill_tokens`), the
largest bucket they fill, so no padding rows are computed (the colocated scheduler's policy). A request is
reported as soon as its last chunk has run, so a short prompt batched with a long one does not wait for it.
Rows of one call are independent (own positions, pages, sampling row), so the tokens equal one-at-a-time
prefill's.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator

import numpy as np

from serving.steps import PrefillOut


@dataclasses.dataclass
class PrefillJob:
    prompt: np.ndarray            # token ids
    pages: list[int]              # the request's pages on the prefill engine
    sampling: dict                # its sampling row (`Request.sampling_row()`)
    start: int = 0                # tokens already in `pages` (a cached prefix)


def prefill_many(engine, jobs: list[PrefillJob], stats: collections.Counter | None = None,
                 progress: Callable[[int, int, PrefillOut], None] | None = None) -> Iterator[tuple[int, PrefillOut]]:
    """Prefill every job; yields (job index, its PrefillOut) as each finishes. `stats` counts calls and rows.
    `progress(job index, tokens in its pages, out)` runs after each chunk but a job's last (a prefill worker offers
    the finished pages of a long prompt while the rest computes)."""
    chunks = [engine.prefill_chunks(len(j.prompt) - j.start, j.start) for j in jobs]
    prompt_lps: dict[int, list] = {}
    while any(chunks):
        by_bucket: dict[int, list[int]] = {}
        for i, cs in enumerate(chunks):
            if cs:
                by_bucket.setdefault(cs[0][2], []).append(i)
        for T, idx in by_bucket.items():
            rows = engine.cfg.rows_for(T)
            while idx:
                take = max(r for r in rows if r <= len(idx))
                group, idx = idx[:take], idx[take:]
                outs = engine.prefill_batch([(jobs[i].prompt, chunks[i].pop(0), jobs[i].pages, jobs[i].sampling)
                                             for i in group])
                if stats is not None:
                    stats["prefill_calls"] += 1
                    stats["prefill_rows"] += len(group)
                for i, out in zip(group, outs):
                    if out.prompt_logprobs is not None:   # prompt logprobs come chunk by chunk
                        prompt_lps.setdefault(i, []).extend(out.prompt_logprobs)
                    if chunks[i] and progress is not None:
                        progress(i, chunks[i][0][0], out)   # tokens before the next chunk are in its pages
                    if not chunks[i]:
                        yield i, (out._replace(prompt_logprobs=prompt_lps.pop(i)) if i in prompt_lps else out)


__all__ = ["PrefillJob", "prefill_many"]
