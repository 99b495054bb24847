"""An offline English corpus: the prose paragraphs of the documentation Python ships in ``pydoc_data.topics``.

Used by the tests and the conversion benchmark (no download). Topics are split into paragraphs (blank-line
separated); grammar/code blocks (indented first line) and short lines are dropped. ``pydoc_paragraphs(split)`` splits by
*topic* (calibration and evaluation never read the same topic) and then by paragraph: topics repeat some
paragraphs of other topics, so the train split drops every paragraph the eval split holds. No paragraph is
in both, and none is repeated within a split.
"""

from __future__ import annotations

import hashlib


def _is_prose(paragraph: str, min_words: int) -> bool:
    lines = paragraph.splitlines()
    if not lines or lines[0].startswith((" ", "\t")):
        return False  # code, grammar productions, tables (list items' continuation lines are indented: kept)
    if set(lines[-1].strip()) <= set("*=-~^"):
        return False  # a heading's underline
    return len(paragraph.split()) >= min_words


def _topic_split(topic: str, eval_fraction: float) -> str:
    h = int(hashlib.sha256(topic.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "eval" if h < eval_fraction else "train"


def pydoc_paragraphs(split: str = "all", eval_fraction: float = 0.3, min_words: int = 20) -> list[str]:
    """Prose paragraphs of ``pydoc_data.topics`` (one line each). ``split``: "train", "eval" or "all";
    a topic belongs to exactly one split (stable hash of its name)."""
    if split not in ("train", "eval", "all"):
        raise ValueError(f"split={split!r}: expected 'train', 'eval' or 'all'.")
    from pydoc_data.topics import topics

    parts: dict[str, list[str]] = {"train": [], "eval": []}
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            paragraph = paragraph.strip("\n")
            if _is_prose(paragraph, min_words):
                parts[_topic_split(name, eval_fraction)].append(" ".join(paragraph.split()))
    held_out = list(dict.fromkeys(parts["eval"]))
    train = [p for p in dict.fromkeys(parts["train"]) if p not in set(held_out)]
    return {"train": train, "eval": held_out, "all": train + held_out}[split]
