#!/usr/bin/env python
"""Causal-LM fine-tuning of a Performer GPT-2 with Trainer (in the style of transformers' run_clm.py), then
sampling with ``model.generate``, which decodes through the recurrent FAVOR+ state: a constant-size
running sum per layer instead of a key/value cache that grows with the context.

    python examples/run_clm.py --model_name_or_path PATH_TO_GPT2 --dataset_name pydoc_chapters \
        --max_seq_length 512 --output_dir runs/clm --do_train --do_eval --use_cpu \
        --performer_nb_features 256 --performer_calibration_steps 100 --prompt "The with statement"

    accelerate launch --config_file examples/accelerate_fsdp.yaml examples/run_clm.py ... --bf16

Text: --dataset_name (offline: a cached datasets name) or 'pydoc_chapters', or --train_file .txt / .csv /
.json; texts are concatenated and cut into blocks of --max_seq_length tokens. Causal FAVOR+ attention must
not look ahead, so it uses per-head statistics fitted by the calibration step on training text (done
automatically when a softmax checkpoint is converted here). Every TrainingArguments option works
(--gradient_accumulation_steps, --activation_checkpointing, --bf16/--fp16, --resume_from_checkpoint PATH or
"latest", --max_steps, ...). Evaluation reports the perplexity.
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

from hf_performer.training import PerformerTrainer  # noqa: E402


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Softmax or Performer GPT-2 checkpoint (local path)."})
    tokenizer_name: str | None = field(default=None)


@dataclass
class GenerationArguments:
    prompt: list[str] = field(default_factory=lambda: ["The"], metadata={"help": "Prompt(s) to sample from after training."})
    max_new_tokens: int = field(default=40)
    do_sample: bool = field(default=True)
    top_p: float = field(default=0.9)
    temperature: float = field(default=0.8)


def sample(model, tokenizer, gen: GenerationArguments, seed: int, synced: bool = False) -> list[dict]:
    """Sample a continuation of every prompt; reports which cache generate() used. ``synced``: every rank of a
    sharded (FSDP) model runs this together (generate's synced_gpus: each forward gathers parameters from all ranks,
    so all keep stepping until every one has finished)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    batch = tokenizer(gen.prompt, return_tensors="pt", padding=True).to(device)
    torch.manual_seed(seed)
    model.eval()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, top_p=gen.top_p,
                             temperature=gen.temperature, pad_token_id=tokenizer.pad_token_id,
                             return_dict_in_generate=True, synced_gpus=True if synced else None)
    cache = getattr(out, "cache", None)  # the name in transformers >= 5.2x (past_key_values before, deprecated since)
    cache = out.past_key_values if cache is None else cache
    layers = getattr(cache, "layers", [])
    kinds = sorted({type(layer).__name__ for layer in layers}) or [type(cache).__name__]
    texts = tokenizer.batch_decode(out.sequences[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    return [{"prompt": p, "continuation": t, "cache": f"{type(cache).__name__}({', '.join(kinds)})"}
            for p, t in zip(gen.prompt, texts)]


def main(argv=None) -> dict:
    model_args, data_args, perf_args, gen_args, training_args = common.parse_args(
        (ModelArguments, common.LMDataArguments, common.PerformerArguments, GenerationArguments, tf.TrainingArguments),
        argv)
    tf.set_seed(training_args.seed)
    tokenizer = tf.AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if perf_args.max_position_embeddings:
        tokenizer.model_max_length = perf_args.max_position_embeddings
    raw = common.load_lm_texts(data_args)
    train, evaluation = common.lm_blocks(raw, tokenizer, data_args, training_args, add_labels=True)

    texts = None if common.resume_path(training_args) else [
        tokenizer.decode(ids) for ids in train[: data_args.calibration_samples]["input_ids"]]
    model = common.load_model(tf.AutoModelForCausalLM, model_args.model_name_or_path, perf_args, tokenizer=tokenizer,
                              calibration_texts=texts, max_length=data_args.max_seq_length, seed=training_args.seed)
    trainer_cls = PerformerTrainer if common.is_performer(model) else tf.Trainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train if training_args.do_train else None,
                          eval_dataset=evaluation if training_args.do_eval else None, processing_class=tokenizer,
                          data_collator=tf.default_data_collator)
    results = common.train_and_evaluate(trainer, training_args, perplexity=True)
    # under FSDP the model's forward gathers its parameters from every rank: all ranks sample (rank 0 alone waited
    # on the others forever), and rank 0 reports
    sharded = bool(getattr(trainer, "is_fsdp_enabled", False))
    samples = None
    if sharded or trainer.is_world_process_zero():
        samples = sample(trainer.accelerator.unwrap_model(trainer.model), tokenizer, gen_args, training_args.seed,
                         synced=sharded)
    if trainer.is_world_process_zero():
        results["samples"] = samples
        for s in samples:
            print(f"[sample, {s['cache']}] {s['prompt']!r} -> {s['continuation']!r}")
        (Path(training_args.output_dir) / "samples.json").write_text(json.dumps(samples, indent=1))
        print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}, indent=1))
    return results


if __name__ == "__main__":
    main()
