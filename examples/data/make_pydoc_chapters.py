"""Build ``pydoc_chapters.jsonl``: passages of the Python documentation labelled with their chapter.

Source: ``pydoc_data.topics`` (the text of ``help("if")`` etc.), which CPython generates from its
documentation (Language Reference and Library Reference). Each topic comes from one documentation
file; the label of a passage is that file, i.e. the chapter it was written in. Headings are removed,
so a passage never names its section. Run with the Python whose documentation you want:

    python examples/data/make_pydoc_chapters.py            # rewrites examples/data/pydoc_chapters.jsonl

The shipped file was made with CPython 3.11.7 (see examples/data/README.md for the license).
"""

from __future__ import annotations

import hashlib
import json
import pydoc_data.topics
import random
import re
import sys
from pathlib import Path

# chapter (documentation file) -> pydoc topic labels defined in it
CHAPTERS = {
    "lexical analysis": ["identifiers", "id-classes", "strings", "numbers", "integers", "floating", "imaginary"],
    "data model": ["objects", "types", "specialnames", "customization", "attribute-access", "callable-types",
                   "numeric-types", "sequence-types", "context-managers"],
    "execution model": ["execmodel", "naming", "dynamic-features", "exceptions"],
    "expressions": ["atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
                    "booleans", "calls", "comparisons", "conversions", "dict", "exprlists", "in", "lambda",
                    "lists", "operator-summary", "power", "shifting", "slicings", "subscriptions", "unary",
                    "assignment-expressions"],
    "simple statements": ["assert", "assignment", "augassign", "break", "continue", "del", "global", "import",
                          "nonlocal", "pass", "raise", "return", "yield"],
    "compound statements": ["compound", "if", "else", "while", "for", "try", "with", "function", "class", "async"],
    "library reference": ["truth", "specialattrs", "string-methods", "typesseq", "typesseq-mutable", "typesmapping",
                          "typesfunctions", "typesmethods", "typesmodules", "bltin-code-objects",
                          "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects", "formatstrings",
                          "debugger"],
}
LABELS = list(CHAPTERS)
MIN_WORDS, TARGET_WORDS, MAX_WORDS = 15, 30, 60
TEST_FRACTION = 0.4
SEED = 0
OUT = Path(__file__).with_name("pydoc_chapters.jsonl")

_UNDERLINE = re.compile(r"^([*=\-~^\"'`#+])\1{2,}$")


def paragraphs(text: str) -> list[str]:
    """Paragraphs (blank-line separated) with headings (a line underlined by ***, ===, ---) removed."""
    lines = text.splitlines()
    keep = []
    for i, line in enumerate(lines):
        nxt = lines[i + 1].strip() if i + 1 < len(lines) else ""
        if _UNDERLINE.match(line.strip()) or (line.strip() and _UNDERLINE.match(nxt) and len(nxt) >= len(line.strip())):
            keep.append("")
            continue
        keep.append(line)
    out, cur = [], []
    for line in keep + [""]:
        if line.strip():
            cur.append(line.strip())
        elif cur:
            out.append(" ".join(cur))
            cur = []
    return out


def passages(paras: list[str]) -> list[str]:
    """Merge consecutive paragraphs into passages of ~TARGET_WORDS words (long ones cut at MAX_WORDS)."""
    out, cur = [], []
    for p in paras:
        words = p.split()
        while len(words) > MAX_WORDS:
            out.append(" ".join(cur + words[:TARGET_WORDS]) if len(cur) < TARGET_WORDS else " ".join(cur))
            if len(cur) >= TARGET_WORDS:
                cur = []
                continue
            words, cur = words[TARGET_WORDS - len(cur):], []
        cur += words
        if len(cur) >= TARGET_WORDS:
            out.append(" ".join(cur))
            cur = []
    if len(cur) >= MIN_WORDS:
        out.append(" ".join(cur))
    return out


def build() -> list[dict]:
    topics = pydoc_data.topics.topics
    owner = {t: c for c, ts in CHAPTERS.items() for t in ts}
    missing = sorted(set(topics) - set(owner) - {"__main__"})
    if missing:
        raise SystemExit(f"topics without a chapter: {missing}")
    seen: set[str] = set()
    rows = []
    # longest topics first: container topics ("compound", "specialnames") keep their paragraphs contiguous
    for topic in sorted(topics, key=lambda t: -len(topics[t])):
        if topic not in owner:
            continue
        fresh = []
        for p in paragraphs(topics[topic]):
            key = hashlib.sha1(p.encode()).hexdigest()
            if key not in seen:
                seen.add(key)
                fresh.append(p)
        for text in passages(fresh):
            rows.append({"text": text, "label": LABELS.index(owner[topic]), "chapter": owner[topic], "topic": topic})
    return rows


def main() -> None:
    rows = build()
    rng = random.Random(SEED)
    by_label: dict[int, list[dict]] = {}
    for r in sorted(rows, key=lambda r: (r["topic"], r["text"])):
        by_label.setdefault(r["label"], []).append(r)
    out = []
    for label in sorted(by_label):  # stratified split
        group = by_label[label]
        rng.shuffle(group)
        n_test = round(TEST_FRACTION * len(group))
        out += [{**r, "split": "test"} for r in group[:n_test]] + [{**r, "split": "train"} for r in group[n_test:]]
    rng.shuffle(out)
    with OUT.open("w", encoding="utf-8") as f:
        for r in out:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    counts = {c: sum(r["chapter"] == c for r in out) for c in LABELS}
    print(f"{len(out)} passages from Python {sys.version.split()[0]} -> {OUT}: {counts}")


if __name__ == "__main__":
    main()
