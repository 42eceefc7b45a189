"""Stop rules, decided in one place, and incremental detokenization.

Both backends (the in-process scheduler and the router client) end a request through `append_tokens`:

* token rules — a stop token (`stop_token_ids`, or EOS unless `ignore_eos`) is kept in the ids and left out of the
  text; the limit (max_tokens capped by max_model_len) ends the request with "length";
* text rules — a stop string ends it with "stop" and cuts the text before it.

Text is built incrementally (`IncrementalDetokenizer`): each step decodes only a short window of the newest tokens
(vLLM's prefix/read offsets), and stop strings are searched only where the new text could complete one. A step's
cost is O(new tokens), not O(output so far): the whole output is never decoded again.
"""

from __future__ import annotations

from typing import Callable, Sequence

from serving.api import Event, Request


class IncrementalDetokenizer:
    """Text deltas for a growing list of token ids.

    `push(ids)` returns the text the new ids add. Two offsets bound the work: text is decoded from `prefix` (a few
    tokens back, so a token whose text depends on its left neighbour decodes right) and what lies before `read` was
    already returned. A delta that ends in an incomplete UTF-8 sequence ("\\ufffd") is held back until the next
    token completes it; `flush()` returns whatever is left."""

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(int(t) for t in ids)
        if not ids:
            return ""
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before):]
        return ""

    def flush(self) -> str:
        before = self.decode(self.ids[self.prefix:self.read])
        now = self.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""


class StopRules:
    """One request's stop state: its token rules and, with a detokenizer, its text and stop strings."""

    def __init__(self, req: Request, eos_ids: Sequence[int], decode: Callable[[list[int]], str] | None = None):
        p = req.params
        self.limit = req.limit
        self.stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_ids))
        self.stop_strings = tuple(p.stop)
        self.detok = IncrementalDetokenizer(decode) if decode is not None else None
        self.text = ""           # the output text so far (cut before a stop string)
        self.sent = 0            # how much of it has been streamed
        # streaming holds back the chars a stop string could still start in: never send text it would cut
        self.hold = max((len(s) for s in self.stop_strings), default=1) - 1

    def tokens(self, n_before: int, new_tokens: Sequence[int]) -> tuple[list[int], str | None]:
        """Token rules: (tokens kept, "stop" / "length" / None) for `new_tokens` after `n_before` output tokens."""
        kept, reason = [], None
        for t in new_tokens:
            kept.append(int(t))
            if t in self.stop_ids:
                return kept, "stop"
            if n_before + len(kept) >= self.limit:
                return kept, "length"
        return kept, reason

    def text_of(self, decode: Callable[[list[int]], str], kept: Sequence[int], reason: str | None,
                final: bool) -> tuple[str, bool]:
        """Text rules for tokens the token rules kept: (text delta to stream, whether a stop string ended the
        request here). `final`: the request ends with these tokens (flush the held-back text)."""
        if self.detok is None:
            self.detok = IncrementalDetokenizer(decode)
        shown = kept[:-1] if reason == "stop" and kept and kept[-1] in self.stop_ids else kept
        delta = self.detok.push(shown)
        if final:
            delta += self.detok.flush()
        start = len(self.text)
        full, hit = self.text + delta, False
        for s in self.stop_strings:   # only where the new text can complete a stop string
            i = full.find(s, max(0, start - len(s) + 1))
            if i >= 0:
                full, hit = full[:i], True
        self.text = full
        end = len(full) if (final or hit) else max(self.sent, len(full) - self.hold)
        out, self.sent = full[self.sent:end], end
        return out, hit


def _rules(req: Request, eos_ids: Sequence[int]) -> StopRules:
    if req.stop_rules is None:
        req.stop_rules = StopRules(req, eos_ids)
    return req.stop_rules


def append_tokens(req: Request, tokens: Sequence[int], now: float, eos_ids: Sequence[int],
                  detokenize: Callable[[list[int]], str] | None = None,
                  logprobs: Sequence | None = None) -> tuple[Event, str | None]:
    """The token rules on `req`'s new tokens (and, given `detokenize`, the text rules in line): extend its ids and
    token times (and logprobs: one per token, for a request that asked). Returns the event to stream and the
    finish reason (None while it runs); the caller ends the request when there is one. Without `detokenize` the
    event carries no text: a `TextStage` adds it later."""
    rules = _rules(req, eos_ids)
    kept, reason = rules.tokens(len(req.output_ids), tokens)
    if req.first_token_time is None and kept:
        req.first_token_time = now
    req.output_ids.extend(kept)
    new_lps = None
    if req.params.logprobs is not None:
        if logprobs is None or len(logprobs) < len(kept):
            raise RuntimeError(f"request {req.id} asked for logprobs but {len(kept)} tokens came with "
                               f"{0 if logprobs is None else len(logprobs)}")
        new_lps = list(logprobs[:len(kept)])
        if req.output_logprobs is None:
            req.output_logprobs = []
        req.output_logprobs.extend(new_lps)
    req.token_times.extend([now] * len(kept))
    delta = ""
    if detokenize is not None:
        delta, hit = rules.text_of(detokenize, kept, reason, reason is not None)
        if hit:
            reason = "stop"
        req.text = rules.text
    return Event(req, kept, delta, reason is not None, new_lps), reason


class TextStage:
    """The text rules apart from the token rules: detokenization and stop strings, run after a step by `LLM` or
    on the HTTP server's text thread — never on its engine thread.

    `apply(events, abort)` returns the events with their text. A stop string ends a request here: its event comes
    out finished with reason "stop", `abort(request_id)` is called so the backend stops generating it (and frees
    its pages), and the backend's own last event for it is swallowed."""

    def __init__(self, decode: Callable[[list[int]], str] | None, eos_ids: Sequence[int]):
        self.decode, self.eos_ids = decode, tuple(eos_ids)
        self._stopped: set[str] = set()     # ended here; the backend's last event for them is still to come

    def apply(self, events: Sequence[Event], abort: Callable[[str], None]) -> list[Event]:
        out = []
        for ev in events:
            req = ev.request
            if req.id in self._stopped:
                if ev.finished:
                    self._stopped.discard(req.id)
                continue
            if self.decode is None:
                out.append(ev)
                continue
            rules = _rules(req, self.eos_ids)
            reason = req.finish_reason if ev.finished else None
            delta, hit = rules.text_of(self.decode, ev.new_token_ids, reason, ev.finished)
            req.text = rules.text
            if hit and not ev.finished:
                req.text_stopped = True
                req.finish_reason = "stop"
                self._stopped.add(req.id)
                abort(req.id)
            elif hit:
                req.text_stopped = True
                req.finish_reason = "stop"
            out.append(Event(req, ev.new_token_ids, delta, ev.finished or hit, ev.new_logprobs))
        return out
