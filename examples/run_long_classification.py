#!/usr/bin/env python
"""Long-document classification (4096-8192 tokens) with a Performer model whose position table is extended
(Longformer recipe: tiled copies of the pretrained positions), with Trainer. At these lengths exact
attention's O(L^2) compute dominates a training step; FAVOR+ is O(L).

    python examples/run_long_classification.py --model_name_or_path PATH --train_file train.jsonl \
        --validation_file dev.jsonl --max_position_embeddings 4096 --max_seq_length 4096 \
        --output_dir runs/long --do_train --do_eval --bf16 --activation_checkpointing \
        --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --benchmark_length 8192

    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/run_long_classification.py ...

Before training it measures, each in its own process, one training step (forward, backward, AdamW;
batch --benchmark_batch_size of --benchmark_length tokens) of the stock model with SDPA attention (as
configured, and with attention dropout 0, which CPU SDPA needs for its flash kernel) and of the Performer
model: time and peak memory, written to OUTPUT_DIR/long_step_benchmark.{json,md}
(--benchmark_length 0 skips it; --benchmark_only stops after it). Both use the run's precision
(--bf16 / --fp16 autocast) and --activation_checkpointing. Data options are run_classification.py's.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from run_classification import DataArguments, ModelArguments, build_trainer  # noqa: E402

from hf_performer.conversion.memory import available_memory_bytes  # noqa: E402


@dataclass
class BenchmarkArguments:
    benchmark_length: int = field(default=8192, metadata={"help": "Tokens per sequence of the side-by-side "
                                                                  "training-step measurement (0 = skip)."})
    benchmark_batch_size: int = field(default=1)
    benchmark_repeats: int = field(default=2, metadata={"help": "Measured steps (median) after one warm-up step."})
    benchmark_only: bool = field(default=False, metadata={"help": "Stop after the measurement."})
    benchmark_isolate: bool = field(default=True, metadata={
        "help": "Measure each model in its own fresh process (clean allocator state and peak; survives an OOM kill). "
                "False: in this process (faster to start; smoke tests)."})
    benchmark_no_dropout_stock: bool = field(default=True, metadata={
        "help": "Also measure the stock model with attention dropout 0: training with attention dropout sends "
                "CPU SDPA to its math kernel (an L x L matrix per head); without it CPU and CUDA use flash kernels."})
    benchmark_cpu_memory_gb: float | None = field(default=None, metadata={
        "help": "CPU only: cap on what one measured step may allocate (default: 60%% of the available memory). "
                "A step past it reports 'oom' instead of meeting the kernel's OOM killer."})


STOCK, STOCK_NO_DROPOUT, PERFORMER = "stock (sdpa)", "stock (sdpa, no attention dropout)", "performer"


def _no_attention_dropout(model) -> None:
    """Attention-probability dropout off (hidden-state dropout stays): the model the flash kernels serve."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and ("attention.self" in name or name.endswith("attn_dropout")):
            module.p = 0.0


def build(path: str, perf_args: common.PerformerArguments, length: int, num_labels: int, which: str):
    """The stock model with sdpa (``which="stock"``, or ``"stock-no-dropout"``) or the Performer model, for
    sequence classification with ``length`` positions. From a softmax checkpoint the Performer model is its conversion; from a Performer
    checkpoint the stock model is its architecture with sdpa attention (weights do not change the cost)."""
    config = tf.AutoConfig.from_pretrained(path)
    performer_ckpt = common.is_performer_config(config)
    if which == "performer" and performer_ckpt:
        model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    elif performer_ckpt:
        fields = {k: v for k, v in config.to_dict().items()
                  if k not in ("performer", "hf_performer_version", "layer_types", "model_type", "architectures")}
        stock_cfg = tf.AutoConfig.for_model(config.model_type.removeprefix("performer_"), **fields)
        stock_cfg.num_labels = num_labels
        model = tf.AutoModelForSequenceClassification.from_config(stock_cfg, attn_implementation="sdpa")
    else:
        model = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                      attn_implementation="sdpa")
    if common.max_tokens(model.config) < length:
        common.extend_positions(model, length)
    if which == "performer" and not common.is_performer(model):
        model = common.hfp.convert_to_performer(model, perf_args.settings())
    if which == "stock-no-dropout":
        _no_attention_dropout(model)
    return model


def _measure_one(which, path, perf_args, bench, device, dtype, checkpointing, limit, num_labels, queue):
    """Child process: build one model, measure one training step, put the result on ``queue``."""
    try:
        model = build(path, perf_args, bench.benchmark_length, num_labels, which)
        if checkpointing:
            model.activation_checkpointing_enable()
        model.to(device)
        g = torch.Generator().manual_seed(0)
        vocab = model.config.vocab_size
        ids = torch.randint(min(1000, vocab // 2), vocab, (bench.benchmark_batch_size, bench.benchmark_length), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                 "labels": torch.randint(0, num_labels, (bench.benchmark_batch_size,), generator=g)}
        result = common.measure_train_step(model, batch, repeats=bench.benchmark_repeats,
                                           autocast_dtype=getattr(torch, dtype) if dtype else None,
                                           cpu_memory_limit=limit)
        result["nb_features"] = model.config.performer["nb_features"] if common.is_performer(model) else None
    except Exception as exc:  # reported, not raised: the other model is still measured
        result = {"status": "error", "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
    queue.put(result)


def benchmark(model_args, perf_args, bench: BenchmarkArguments, training_args, num_labels: int = 2) -> dict:
    """Each model in its own fresh process (spawn): clean allocator state and peak memory; a model killed for
    memory is reported as such."""
    import multiprocessing as mp

    device = training_args.device
    dtype = "bfloat16" if training_args.bf16 else "float16" if training_args.fp16 else None
    checkpointing = bool(getattr(training_args, "activation_checkpointing", False)
                         or getattr(training_args, "gradient_checkpointing", False))
    limit = None
    if device.type == "cpu":
        gb = bench.benchmark_cpu_memory_gb
        limit = int(gb * 2**30) if gb else int(0.6 * (available_memory_bytes() or 8 * 2**30))
    ctx = mp.get_context("spawn")
    rows = {}
    runs = [("performer", PERFORMER), ("stock", STOCK)]
    if bench.benchmark_no_dropout_stock:
        runs.append(("stock-no-dropout", STOCK_NO_DROPOUT))
    for which, name in runs:
        if not bench.benchmark_isolate:
            out = []
            _measure_one(which, model_args.model_name_or_path, perf_args, bench, str(device), dtype, checkpointing,
                         limit, num_labels, type("Q", (), {"put": staticmethod(out.append)}))
            rows[name] = out[0]
            continue
        queue = ctx.Queue()
        proc = ctx.Process(target=_measure_one, args=(which, model_args.model_name_or_path, perf_args, bench,
                                                      str(device), dtype, checkpointing, limit, num_labels, queue))
        proc.start()
        proc.join()
        rows[name] = queue.get() if not queue.empty() else {
            "status": "killed", "error": f"measuring process exited with code {proc.exitcode} (out of memory?)"}
    p = rows[PERFORMER]

    def ratio(stock: str, key: str):
        s = rows.get(stock, {})
        return p[key] / max(s[key], 1e-12) if s.get("status") == p.get("status") == "ok" else None

    return {
        "length": bench.benchmark_length, "batch_size": bench.benchmark_batch_size, "device": str(device),
        "precision": dtype or "float32", "activation_checkpointing": checkpointing,
        "nb_features": p.get("nb_features") or perf_args.performer_nb_features, "env": common.env_summary(),
        "results": rows, "cpu_memory_limit_bytes": limit,
        "time_ratio": ratio(STOCK, "time_s"), "memory_ratio": ratio(STOCK, "peak_bytes"),
        "time_ratio_no_dropout": ratio(STOCK_NO_DROPOUT, "time_s"),
        "memory_ratio_no_dropout": ratio(STOCK_NO_DROPOUT, "peak_bytes"),
        "note": "each model measured in its own process; median of the timed steps after a warm-up step, then "
                "one step for the peak memory",
    }


def render(r: dict) -> str:
    def cell(x, key, fmt):
        return fmt(x[key]) if x.get("status") == "ok" else x.get("status", "-")

    lines = [f"One training step at {r['length']} tokens (batch {r['batch_size']}, {r['precision']}, "
             f"activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}, FAVOR+ m={r['nb_features']}; "
             f"{r['env']}, device {r['device']})", "",
             "| model | step time | peak memory |", "| --- | --- | --- |"]
    for name in (STOCK, STOCK_NO_DROPOUT, PERFORMER):
        if name not in r["results"]:
            continue
        x = r["results"][name]
        lines.append(f"| {name} | {cell(x, 'time_s', lambda v: f'{v:.2f} s')} | "
                     f"{cell(x, 'peak_bytes', lambda v: f'{v / 2**20:.0f} MiB')} |")
    for name, x in r["results"].items():
        if x.get("status") != "ok":
            why = (" With attention dropout, SDPA on a CPU materialises each layer's [batch, heads, L, L] attention "
                   "probabilities." if name == STOCK and x.get("status") == "oom" else "")
            lines += ["", f"{name}: {x.get('status')}: {x.get('error', '')}{why}"]
    for stock, suffix in ((STOCK, ""), (STOCK_NO_DROPOUT, "_no_dropout")):
        if r.get("time_ratio" + suffix) is not None:
            lines += ["", f"Performer / {stock}: time {r['time_ratio' + suffix]:.2f}x (target <= 0.5x), peak memory "
                          f"{r['memory_ratio' + suffix]:.2f}x (target <= 1.5x)."]
    if r.get("memory_ratio_no_dropout") is not None:
        lines += ["", "Without attention dropout SDPA runs its flash kernel, which keeps nothing L x L either: both "
                      "models' memory is then linear in L and mostly the model's activations, FAVOR+ adding its [L, m] "
                      "features on top (about as much, or a little more). The difference is time: FAVOR+'s grows "
                      "linearly in L, flash's quadratically."]
    if r["results"][PERFORMER].get("method"):
        lines += ["", f"Memory: one step's peak above the memory in use before it ({r['results'][PERFORMER]['method']})."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    model_args, data_args, perf_args, bench, training_args = common.parse_args(
        (ModelArguments, DataArguments, common.PerformerArguments, BenchmarkArguments, tf.TrainingArguments), argv)
    out = Path(training_args.output_dir)
    results = {}
    if bench.benchmark_length > 0 and training_args.process_index == 0:
        out.mkdir(parents=True, exist_ok=True)
        results["benchmark"] = benchmark(model_args, perf_args, bench, training_args)
        table = render(results["benchmark"])
        print("\n" + table + "\n")
        (out / "long_step_benchmark.json").write_text(json.dumps(results["benchmark"], indent=1))
        (out / "long_step_benchmark.md").write_text(table + "\n")
    if bench.benchmark_only:
        return results
    if perf_args.max_position_embeddings is None:
        perf_args.max_position_embeddings = data_args.max_seq_length
    trainer = build_trainer(model_args, data_args, perf_args, training_args)
    results.update(common.train_and_evaluate(trainer, training_args))
    if trainer.is_world_process_zero():
        print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}, indent=1))
    return results


if __name__ == "__main__":
    main()
