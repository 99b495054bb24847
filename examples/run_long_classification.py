#!/usr/bin/env python
"""Long-document classification (4096-8192 tokens) with a Performer model whose position table is extended
(Longformer recipe: tiled copies of the pretrained positions), with Trainer. At these lengths exact
attention's O(L^2) compute dominates a training step; FAVOR+ is O(L).

    python examples/run_long_classification.py --model_name_or_path PATH --train_file train.jsonl \
        --validation_file dev.jsonl --max_position_embeddings 4096 --max_seq_length 4096 \
        --output_dir runs/long --do_train --do_eval --bf16 --activation_checkpointing \
        --per_device_train_batch_size 1 --gradient_accumulation_steps 16 --benchmark_length 8192

    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/run_long_classification.py ...

Before training it measures, side by side in this process, one training step (forward, backward, AdamW;
batch --benchmark_batch_size of --benchmark_length tokens) of the stock model with SDPA attention and of
the Performer model: time and peak memory, written to OUTPUT_DIR/long_step_benchmark.{json,md}
(--benchmark_length 0 skips it; --benchmark_only stops after it). Both use the run's precision
(--bf16 / --fp16 autocast) and --activation_checkpointing. Data options are run_classification.py's.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from run_classification import DataArguments, ModelArguments, build_trainer  # noqa: E402


@dataclass
class BenchmarkArguments:
    benchmark_length: int = field(default=8192, metadata={"help": "Tokens per sequence of the side-by-side "
                                                                  "training-step measurement (0 = skip)."})
    benchmark_batch_size: int = field(default=1)
    benchmark_repeats: int = field(default=2, metadata={"help": "Measured steps (median) after one warm-up step."})
    benchmark_only: bool = field(default=False, metadata={"help": "Stop after the measurement."})
    benchmark_cpu_memory_gb: float | None = field(default=None, metadata={
        "help": "CPU only: cap on what one measured step may allocate (default: 60% of the available memory). "
                "A step past it reports 'oom' instead of meeting the kernel's OOM killer."})


def stock_and_performer(path: str, perf_args: common.PerformerArguments, length: int, num_labels: int):
    """(stock model with sdpa, Performer model), both for sequence classification with ``length`` positions.
    From a softmax checkpoint: the Performer model is its conversion. From a Performer checkpoint: the stock
    model is its architecture with sdpa attention (weights do not change the cost)."""
    config = tf.AutoConfig.from_pretrained(path)
    if common.is_performer_config(config):
        performer = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        fields = {k: v for k, v in config.to_dict().items()
                  if k not in ("performer", "hf_performer_version", "layer_types", "model_type", "architectures")}
        stock_cfg = tf.AutoConfig.for_model(config.model_type.removeprefix("performer_"), **fields)
        stock_cfg.num_labels = num_labels
        stock = tf.AutoModelForSequenceClassification.from_config(stock_cfg, attn_implementation="sdpa")
    else:
        stock = tf.AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels,
                                                                      attn_implementation="sdpa")
        performer = None
    for m in (stock, performer):
        if m is not None and common.max_tokens(m.config) < length:
            common.extend_positions(m, length)
    if performer is None:
        performer = common.hfp.convert_to_performer(copy.deepcopy(stock), perf_args.settings())
    return stock, performer


def benchmark(model_args, perf_args, bench: BenchmarkArguments, training_args, num_labels: int = 2) -> dict:
    device = training_args.device
    dtype = torch.bfloat16 if training_args.bf16 else torch.float16 if training_args.fp16 else None
    stock, performer = stock_and_performer(model_args.model_name_or_path, perf_args, bench.benchmark_length, num_labels)
    g = torch.Generator().manual_seed(0)
    vocab = stock.config.vocab_size
    ids = torch.randint(min(1000, vocab // 2), vocab, (bench.benchmark_batch_size, bench.benchmark_length), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "labels": torch.randint(0, num_labels, (bench.benchmark_batch_size,), generator=g)}
    checkpointing = bool(getattr(training_args, "activation_checkpointing", False)
                         or getattr(training_args, "gradient_checkpointing", False))
    limit = None
    if device.type == "cpu":
        gb = bench.benchmark_cpu_memory_gb
        limit = int(gb * 2**30) if gb else int(0.6 * (common.available_memory_bytes() or 8 * 2**30))
    rows = {}
    # the Performer first: a capped CPU allocation failure can leave oneDNN unusable for the rest of the process
    for name, model in (("performer", performer), ("stock (sdpa)", stock)):
        if checkpointing:
            model.gradient_checkpointing_enable()
        model.to(device)
        rows[name] = common.measure_train_step(model, batch, repeats=bench.benchmark_repeats, autocast_dtype=dtype,
                                               cpu_memory_limit=limit)
        model.to("cpu")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    s, p = rows["stock (sdpa)"], rows["performer"]
    ok = s.get("status") == p.get("status") == "ok"
    result = {
        "length": bench.benchmark_length, "batch_size": bench.benchmark_batch_size, "device": str(device),
        "precision": str(dtype).replace("torch.", "") if dtype else "float32", "activation_checkpointing": checkpointing,
        "nb_features": performer.config.performer["nb_features"], "env": common.env_summary(), "results": rows,
        "cpu_memory_limit_bytes": limit,
        "time_ratio": p["time_s"] / s["time_s"] if ok else None,
        "memory_ratio": p["peak_bytes"] / max(s["peak_bytes"], 1) if ok else None,
    }
    return result


def render(r: dict) -> str:
    def cell(x, key, fmt):
        return fmt(x[key]) if x.get("status") == "ok" else x.get("status", "-")

    lines = [f"One training step at {r['length']} tokens (batch {r['batch_size']}, {r['precision']}, "
             f"activation checkpointing {'on' if r['activation_checkpointing'] else 'off'}, FAVOR+ m={r['nb_features']}; "
             f"{r['env']}, device {r['device']})", "",
             "| model | step time | peak memory |", "| --- | --- | --- |"]
    for name in ("stock (sdpa)", "performer"):
        x = r["results"][name]
        lines.append(f"| {name} | {cell(x, 'time_s', lambda v: f'{v:.2f} s')} | "
                     f"{cell(x, 'peak_bytes', lambda v: f'{v / 2**20:.0f} MiB')} |")
    for name, x in r["results"].items():
        if x.get("status") != "ok":
            lines += ["", f"{name}: {x.get('status')}: {x.get('error', '')}"]
    if r["time_ratio"] is not None:
        lines += ["", f"Performer / stock: time {r['time_ratio']:.2f}x (target <= 0.5x), peak memory "
                      f"{r['memory_ratio']:.2f}x (target <= 1.5x). Memory: {r['results']['performer']['method']}."]
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
