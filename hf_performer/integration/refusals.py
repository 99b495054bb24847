"""Families that cannot be converted honestly, and why: refused before anything changes.

FAVOR+ estimates exp(q·k / √d) with positive random features of q and k. Anything inside the softmax that is not a
function of one query and one key through their dot product (a bias per (query, key) pair, a cap on the logit, an
extra logit in the normaliser) has no such estimate, so a converted model would silently compute something else.
"""

from __future__ import annotations

_RELATIVE = ("relative-position biases computed inside the attention (content-to-position and position-to-content "
             "terms per query/key pair)")
_ALIBI = "ALiBi: a linear bias per (query, key) distance added to the logits, which random features cannot carry"

# stock model_type -> the reason
UNCONVERTIBLE = {
    "deberta": _RELATIVE,
    "deberta-v2": _RELATIVE,
    "sew-d": _RELATIVE,
    "bloom": _ALIBI,
    "mpt": _ALIBI,
    "falcon": "its attention does not go through transformers' attention interface (and it may use ALiBi)",
    "gpt_oss": "attention sinks: a learned logit per head added to every softmax normaliser",
    "gemma2": "attention-logit soft-capping (tanh of the logits) and alternating sliding-window layers",
    "gemma3": "alternating sliding-window layers with a separate local rotary base",
    "t5": "relative-position buckets added to the attention logits",
    "mt5": "relative-position buckets added to the attention logits",
    "transfo-xl": "relative-position attention terms",
    "xlnet": "two-stream relative-position attention",
}


def unconvertible_reason(model_type: str | None) -> str | None:
    """Why ``model_type`` cannot be converted, or None when nothing is known against it."""
    return UNCONVERTIBLE.get(model_type)
