"""Structured output: a request's grammar (JSON schema, any JSON object, regex, choice, Lark) as a token mask.

Through llguidance (Microsoft's grammar engine for LLM serving, also a vLLM and llama.cpp backend), chosen over
xgrammar because it depends on nothing (xgrammar's wheel requires torch and transformers, which Tandem never loads
at run time) and reads the checkpoint's `tokenizer.json` directly. Its matcher computes the allowed next tokens
incrementally (the lexer's token trie, ~tens of microseconds per mask on small vocabularies).

The host keeps one matcher per constrained request: before a step it fills the request's bitmask (one bit per
vocabulary entry, 32 per int32), the compiled step applies it to the logits (`serving.logits.process`; the same
executables, no recompile per grammar), and the sampled token is fed back to the matcher. A decode dispatch runs
several steps on the device, so a constrained row keeps only its first step's token (the rest, computed
unconstrained, are dropped and their positions decoded again); with MTP the draft is verified against the masked
distribution, so a draft the grammar forbids is always rejected and replaced by a token it allows.
"""

from __future__ import annotations

import json
import re

import numpy as np

KINDS = ("json", "json_object", "regex", "choice", "grammar")
# JSON layout: one space after ',' and ':' and no other whitespace. Flexible whitespace (llguidance's default) lets a
# model spend its whole budget on newlines before the first key; a schema's "x-guidance" options override this.
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def normalize(spec) -> tuple[str, str] | None:
    """A structured-output request as (kind, text): from vLLM's dict form ({"json": schema}, {"json_object": True},
    {"regex": ...}, {"choice": [...]}, {"grammar": lark}) or a (kind, text) pair. ValueError naming the problem."""
    if spec is None:
        return None
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str):
        kind, value = spec
    elif isinstance(spec, dict):
        given = [k for k in KINDS if spec.get(k) not in (None, False)]
        if len(given) != 1 or set(spec) - set(KINDS):
            raise ValueError(f"structured_output needs exactly one of {list(KINDS)}, got {sorted(spec)}")
        kind, value = given[0], spec[given[0]]
    else:
        raise ValueError(f"structured_output must be a dict like {{'json': schema}}, got {type(spec).__name__}")
    if kind not in KINDS:
        raise ValueError(f"structured_output kind {kind!r}: expected one of {list(KINDS)}")
    if kind == "json_object":
        return kind, ""
    if kind == "json" and not isinstance(value, str):
        value = json.dumps(value)
    if kind == "choice":
        if isinstance(value, str):
            value = json.loads(value)
        if not isinstance(value, (list, tuple)) or not value or any(not isinstance(c, str) for c in value):
            raise ValueError("structured_output choice must be a non-empty list of strings")
        value = json.dumps(list(value))
    if not isinstance(value, str) or (kind != "json_object" and not value):
        raise ValueError(f"structured_output {kind} must be a non-empty string")
    return kind, value


def _grammar_text(kind: str, value: str) -> str:
    import llguidance

    M = llguidance.LLMatcher
    if kind == "json":
        return M.grammar_from_json_schema(value, defaults=JSON_LAYOUT)
    if kind == "json_object":
        return M.grammar_from_json_schema(json.dumps({"type": "object"}), defaults=JSON_LAYOUT)
    if kind == "regex":
        return M.grammar_from_regex(value)
    if kind == "choice":
        return M.grammar_from_regex("(" + "|".join(re.escape(c) for c in json.loads(value)) + ")")
    return M.grammar_from_lark(value)


class Grammars:
    """Matchers for one tokenizer and vocabulary (building the llguidance tokenizer takes ~a second on large
    vocabularies: one per process)."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_ids=()):
        import llguidance

        eos = list(eos_ids)
        self.tokenizer = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size,
                                                eos_token=(eos[0] if len(eos) == 1 else eos) if eos else None)
        self.vocab_size = vocab_size

    def matcher(self, spec: tuple[str, str]):
        """A fresh matcher for `spec`; ValueError with the library's message when the grammar is rejected."""
        import llguidance

        try:
            m = llguidance.LLMatcher(self.tokenizer, _grammar_text(*spec), log_level=0)
        except (ValueError, RuntimeError, TypeError) as e:
            raise ValueError(f"structured_output {spec[0]} rejected: {e}") from None
        if m.is_error():
            raise ValueError(f"structured_output {spec[0]} rejected: {m.get_error()}")
        return m


def mask_of(matcher, vocab_size: int) -> np.ndarray:
    """The matcher's allowed next tokens as an int32 bitmask [ceil(vocab / 32)] (bit i % 32 of word i // 32)."""
    import llguidance.numpy as lln

    out = np.zeros((1, -(-vocab_size // 32)), np.int32)
    lln.fill_next_token_bitmask(matcher, out)
    return out[0]


def consume(matcher, tokens) -> str | None:
    """Feed sampled tokens to the matcher; an error message if the grammar rejects one (never expected: the mask
    allowed it), else None."""
    for t in tokens:
        if matcher.is_stopped():
            return None
        if not matcher.consume_token(int(t)):
            return f"structured output: token {int(t)} violates the grammar ({matcher.get_error()})"
    return None


def of_checkpoint(checkpoint: str | None, model_cfg) -> Grammars:
    """Grammars over a checkpoint's tokenizer.json (ValueError when it has none)."""
    from model.tokenizer import Tokenizer

    tok = Tokenizer.of_checkpoint(checkpoint)
    if tok is None:
        raise ValueError(f"structured output needs the checkpoint's tokenizer.json ({checkpoint})")
    return Grammars(tok.to_json(), model_cfg.vocab_size, model_cfg.eos_token_ids)


def prefill_row(req, vocab_size: int) -> dict:
    """A request's sampling row for prefill, with its grammar's mask for the first token when it has one."""
    row = req.sampling_row()
    if req.matcher is not None:
        row["mask"] = mask_of(req.matcher, vocab_size)
    return row
