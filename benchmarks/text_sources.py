"""Offline text sources of different domains for the conversion benchmark (nothing is downloaded).

| name | domain | where it comes from |
| --- | --- | --- |
| ``pydoc-train`` | Python documentation prose | ``pydoc_data.topics`` (shipped with Python), the *train* topics: the calibration text |
| ``pydoc-eval`` | the same domain, held out | the *eval* topics (``hf_performer.conversion.corpus``: no shared paragraph) |
| ``licenses`` | legal English | the license / notice files of the installed Python distributions (``importlib.metadata``; torch, transformers, numpy, ...), prose paragraphs, each kept once |
| ``code`` | Python source code | the held-out 10% of the standard library's ``.py`` files (``code_gpt2.code_documents("eval")``), which the code GPT-2 never trains on |

Each loader returns documents (strings, in a fixed order) or raises ``SourceMissing`` saying what is missing and
how to get it. ``sequences`` packs a source's token stream into sequences of one length, for evaluation.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as metadata
import re

from code_gpt2 import code_documents

from hf_performer.conversion.corpus import pydoc_paragraphs
from hf_performer.conversion.data import mixed_length_sequences

LICENSE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|NOTICE)", re.IGNORECASE)


class SourceMissing(RuntimeError):
    """A text source is not available on this machine (the message says what to install)."""


def _prose(paragraph: str, min_words: int = 12) -> bool:
    """A paragraph of running text: enough words, mostly letters (not a table, code or a URL list)."""
    if len(paragraph.split()) < min_words:
        return False
    return sum(c.isalpha() or c.isspace() for c in paragraph) / len(paragraph) > 0.8


def license_documents(min_documents: int = 20) -> list[str]:
    """One document per license/notice file of the installed distributions (sorted by distribution and path),
    made of its prose paragraphs not seen in an earlier file (the Apache and BSD texts repeat a lot)."""
    seen: set[str] = set()
    docs = []
    for dist in sorted(metadata.distributions(), key=lambda d: (d.metadata["Name"] or "").lower()):
        for f in sorted(dist.files or [], key=str):
            if ".dist-info" not in str(f) or not LICENSE_FILE.match(f.name):
                continue
            try:
                text = f.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError, TypeError):
                continue
            keep = []
            for p in re.split(r"\n\s*\n", text or ""):
                p = " ".join(p.split())
                if _prose(p) and p not in seen:
                    seen.add(p)
                    keep.append(p)
            if keep:
                docs.append(" ".join(keep))
    if len(docs) < min_documents:
        raise SourceMissing(f"only {len(docs)} license files with prose found in the installed distributions' "
                            f".dist-info folders (need {min_documents}): install the project's dependencies "
                            "(pip install -e '.[test]') into this environment.")
    return docs


def load(name: str) -> list[str]:
    """The documents of source ``name`` (see the module's table). Raises SourceMissing or KeyError."""
    try:
        if name == "pydoc-train":
            return pydoc_paragraphs("train")
        if name == "pydoc-eval":
            return pydoc_paragraphs("eval")
        if name == "licenses":
            return license_documents()
        if name == "code":
            return code_documents("eval")
    except ImportError as e:  # pydoc_data is missing from some minimal Python builds
        raise SourceMissing(f"text source {name!r} needs {e.name!r}, which this Python lacks: use a full "
                            "Python installation.") from e
    except FileNotFoundError as e:
        raise SourceMissing(f"text source {name!r}: {e}") from e
    raise KeyError(f"unknown text source {name!r}: expected pydoc-train, pydoc-eval, licenses or code")


DOMAINS = {"pydoc-train": "Python documentation, train topics", "pydoc-eval": "Python documentation, held-out topics",
           "licenses": "legal: licenses of installed packages", "code": "Python source code (held-out stdlib files)"}


def fingerprint(documents: list[str]) -> str:
    return hashlib.sha256("\x00".join(documents).encode()).hexdigest()[:12]


def sequences(documents: list[str], tokenizer, length: int, max_sequences: int | None) -> list[list[int]]:
    """Sequences of exactly ``length`` tokens (special tokens included) cut from the concatenated documents,
    at most ``max_sequences`` of them spread evenly over the source."""
    seqs = [s for s in mixed_length_sequences(documents, tokenizer, length, length) if len(s) == length]
    if max_sequences is not None and len(seqs) > max_sequences:
        step = len(seqs) / max_sequences
        seqs = [seqs[int(i * step)] for i in range(max_sequences)]
    return seqs
