"""The values crossing the engine seam on the host side: what prefill hands to decode (`Prefix`), what one
prefill or decode call returns, what one decode dispatch takes. Plain data; the engine (serving/engine.py) makes
and consumes them, the scheduler and workers pass them around."""

from __future__ import annotations

import dataclasses
import typing

import jax
import numpy as np


@dataclasses.dataclass
class Prefix:
    """What prefill hands to decode: the request's latent pages and its first token."""

    pages: jax.Array          # [layers, n_bucket, Z, C]; the first n_pages are real
    n_pages: int
    length: int               # prompt tokens
    first_token: int
    draft: int = 0            # MTP: the drafted token after first_token (0 without MTP)
    draft_q: np.ndarray | None = None   # MTP: the distribution it was drawn from [W]
    skip: int = 0             # leading pages not sent: the receiver's prefix cache holds them (`pages` starts after)
    logprobs: typing.Any = None          # first_token's `TokenLogprobs` (when the request asked for logprobs)
    prompt_logprobs: list | None = None  # the prompt's tokens' (prompt_logprobs; the first is None)
    # further pieces (pages like `pages`, real pages), written after its n_pages in order: KV streamed during
    # prefill arrives as parts + the offer, each its own transfer bucket, inserted as it came (never concatenated)
    rest: tuple = ()
    owner: int | None = None   # a worker group: the member process holding the pages (`serving.group_kv.Held`)


class PrefillOut(typing.NamedTuple):
    token: int                # the first generated token
    draft: int                # MTP draft of the token after `token` (0 without MTP)
    draft_q: np.ndarray | None   # the draft's distribution [W] (None without MTP)
    logprobs: typing.Any = None  # the token's `serving.logits.TokenLogprobs` (if the row asked for logprobs)
    prompt_logprobs: list | None = None   # this chunk's prompt tokens' TokenLogprobs (if asked; see prefill_batch)


class DecodeOut(typing.NamedTuple):
    tokens: list[list[int]]   # per row, the tokens this dispatch emitted (decode_steps, or up to 2x with MTP)
    step_sizes: list[list[int]]   # per row, tokens emitted by each step (all 1 without MTP; 1 or 2 with it)
    accepted: list[list[bool]]    # per row and step, whether the MTP draft was accepted (all False without MTP)
    drafts: np.ndarray | None     # [n] next drafts (MTP)
    draft_q: "DeviceRows | None"  # [n, W] their distributions (MTP; read from the device only if a row needs it)
    logprobs: list | None = None  # per row, a TokenLogprobs per emitted token (None for rows that did not ask)


class DeviceRows:
    """An output of a dispatch left on the device: row i (`rows[i]`) is read to the host when first used as an
    array, the whole output in one read, once. MTP's draft distributions [B, vocab]: the next dispatch takes them
    from the device, so the host reads them only for a row that leaves the overlapped chain."""

    reads = 0   # whole-output reads so far (all instances; tests)

    def __init__(self, x, slot: np.ndarray):
        self._x, self._slot, self._host = x, slot, None

    def __getitem__(self, i: int) -> "_DeviceRow":
        return _DeviceRow(self, i)

    def host(self) -> np.ndarray:
        if self._host is None:
            DeviceRows.reads += 1
            self._host, self._x = np.asarray(self._x)[self._slot], None
        return self._host


class _DeviceRow:
    def __init__(self, rows: DeviceRows, i: int):
        self.rows, self.i = rows, i

    def __array__(self, dtype=None, copy=None):
        a = self.rows.host()[self.i]
        return a if dtype is None else a.astype(dtype)


@dataclasses.dataclass
class DecodeBatch:
    """Host-side arrays of one decode dispatch (rows = running requests, padded to a bucket by the engine)."""

    tokens: np.ndarray        # [n] int32: last token of each row
    positions: np.ndarray     # [n] int32: its position
    page_tables: np.ndarray   # [n, pages_per_seq] int32
    sampling: dict[str, np.ndarray]   # temperature/top_k/top_p/seed, [n] each
    drafts: np.ndarray | None = None      # MTP: [n] draft token for the position after `tokens`
    draft_q: np.ndarray | None = None     # MTP: [n, W] the distributions they were drawn from
    ranks: np.ndarray | None = None       # [n] attention rank of each row (data-parallel attention; None: 0)
    params: list | None = None            # [n] SamplingParams: logprobs and logits processors (None: neither)
    histories: list | None = None         # [n] each row's tokens so far (prompt + output; for the processors)
    prompt_lens: np.ndarray | None = None  # [n] each row's prompt length (with histories)
    masks: list | None = None             # [n] grammar bitmask of each row's next token (None: unconstrained)
    src: np.ndarray | None = None         # [n] int: row of the previous dispatch whose last token (still on the
                                          # device) this row starts from; -1 (or None): `tokens` (Engine.dispatch)
