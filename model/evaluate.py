"""Held-out evaluation of a model: perplexity and the MTP head's t+2 accuracy (the command line is
`python -m tools.evaluate`).

The text is tokenized as one document (`bos` + tokens) and cut into consecutive windows of
`--context` inputs; each window is fed from position 0 (no state carried across windows), so every scored token sees
between 0 and context-1 tokens of context — the setting the shipped model was trained in.

Reported per dtype:
  * perplexity = exp(mean next-token NLL) over every token after the first;
  * main head top-1 accuracy for t+1;
  * MTP top-1 accuracy for t+2: the MTP module gets h_t and the true token t+1 and predicts t+2 (as in training);
  * unigram baseline for t+2: always predict the most frequent token of the evaluated text (an oracle unigram,
    so a generous baseline).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from model.tokenizer import Tokenizer


def load_tokenizer(checkpoint: str) -> Tokenizer:
    tok = Tokenizer.of_checkpoint(checkpoint)
    if tok is None:
        raise FileNotFoundError(f"{checkpoint} has no tokenizer.json")
    return tok


def encode(tok: Tokenizer, text: str, bos_id: int | None) -> np.ndarray:
    ids = tok.encode(text)
    return np.asarray(([bos_id] if bos_id is not None else []) + ids, dtype=np.int32)


@partial(jax.jit, static_argnums=0)
def _window_stats(graphdef, state, tokens_BT, valid_B):
    """Sums over the windows (row b holds valid_B[b] real tokens, then padding) of: next-token NLL, t+1 hits and
    t+2 MTP hits. Padding sits after the real tokens, so causal attention keeps it out of every scored position."""
    from flax import nnx

    model = nnx.merge(graphdef, state)
    B, T = tokens_BT.shape
    pos = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, hidden, _ = model.forward(tokens_BT, pos)
    m1 = pos[:, 1:] < valid_B[:, None]                 # target t+1 is a real token
    lp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), -1)
    nll = -(jnp.take_along_axis(lp, tokens_BT[:, 1:, None], -1)[..., 0] * m1).sum()
    hit1 = ((logits[:, :-1].argmax(-1) == tokens_BT[:, 1:]) & m1).sum()
    if len(model.mtp) == 0 or T < 3:
        return nll, hit1, jnp.int32(0)
    m2 = pos[:, 2:] < valid_B[:, None]                 # target t+2 is a real token
    mtp_logits, _, _ = model.mtp_forward(hidden[:, :-2], tokens_BT[:, 1:-1], pos[:, :-2])
    hit2 = ((mtp_logits.argmax(-1) == tokens_BT[:, 2:]) & m2).sum()
    return nll, hit1, hit2


def evaluate(model, ids: np.ndarray, context: int = 128, batch: int = 8) -> dict:
    """Perplexity, t+1 and MTP t+2 top-1 accuracy of `model` over token ids `ids` in windows of `context` inputs.

    Windows of context + 1 tokens overlap by one token, so every token after the first is scored once for t+1; for
    t+2, each window scores its targets 2..context (one target per window boundary is skipped). The last window and
    the last batch are
    padded (and masked), so one compiled shape serves the whole text.
    """
    from flax import nnx

    if len(ids) < 3:
        raise ValueError("need at least 3 tokens")
    graphdef, state = nnx.split(model)
    L = context + 1
    starts = list(range(0, len(ids) - 1, context))
    nll = hit1 = hit2 = n1 = n2 = 0
    for i in range(0, len(starts), batch):
        x = np.zeros((batch, L), np.int32)
        valid = np.zeros((batch,), np.int32)
        for r, s in enumerate(starts[i:i + batch]):
            w = ids[s:s + L]
            x[r, : len(w)], valid[r] = w, len(w)
            n1 += len(w) - 1
            n2 += max(len(w) - 2, 0)
        a, b, c = _window_stats(graphdef, state, jnp.asarray(x), jnp.asarray(valid))
        nll, hit1, hit2 = nll + float(a), hit1 + int(b), hit2 + int(c)
    # Unigram baseline for t+2: the most frequent target token, scored over the same t+2 targets.
    targets = np.concatenate([ids[s + 2:s + L] for s in starts])
    uni = np.bincount(targets).max() / max(len(targets), 1)
    return {"tokens_scored": n1, "nll": nll / n1, "perplexity": float(np.exp(nll / n1)), "top1_t+1": hit1 / n1,
            "mtp_top1_t+2": (hit2 / n2) if n2 and len(model.mtp) else None, "mtp_positions": n2,
            "unigram_top1_t+2": float(uni)}
