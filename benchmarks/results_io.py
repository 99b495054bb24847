"""Writing a benchmark's results: ``benchmarks/results/NAME.json`` and ``NAME.md``, each to a temporary file first
and then renamed, so an interrupted run never leaves half a file (rewritten after every measurement)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save(doc: dict, name: str, render: Callable[[dict], str]) -> None:
    """doc -> RESULTS/name.json (indented JSON) and RESULTS/name.md (``render(doc)``); an absolute ``name`` writes
    there instead."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(doc, indent=1)), (".md", render(doc))):
        path = RESULTS / (name + suffix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
