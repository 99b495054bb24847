#!/usr/bin/env python
"""Masked-LM continued pretraining of a Performer BERT / RoBERTa / DistilBERT with Trainer (in the style of
transformers' run_mlm.py).

Typical use: after extending the position table (Longformer recipe: tiled copies of the 512 pretrained
positions), a short masked-LM run teaches the model the new positions and adapts it to FAVOR+:

    python examples/run_mlm.py --model_name_or_path PATH --dataset_name pydoc_chapters \
        --max_position_embeddings 2048 --max_seq_length 2048 --output_dir runs/mlm \
        --do_train --do_eval --use_cpu --performer_nb_features 256 --performer_redraw_interval 100

    accelerate launch --config_file examples/accelerate_ddp.yaml examples/run_mlm.py ... --bf16

Text: --dataset_name (offline: a cached datasets name) or 'pydoc_chapters', or --train_file .txt / .csv /
.json; texts are concatenated and cut into blocks of --max_seq_length tokens. Every TrainingArguments
option works (--gradient_accumulation_steps, --activation_checkpointing, --bf16/--fp16,
--resume_from_checkpoint PATH or "latest", --max_steps, ...). Evaluation reports the perplexity.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from hf_performer.training import PerformerTrainer  # noqa: E402


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Softmax or Performer masked-LM checkpoint (local path)."})
    tokenizer_name: str | None = field(default=None)
    mlm_probability: float = field(default=0.15, metadata={"help": "Fraction of tokens masked."})


def main(argv=None) -> dict:
    model_args, data_args, perf_args, training_args = common.parse_args(
        (ModelArguments, common.LMDataArguments, common.PerformerArguments, tf.TrainingArguments), argv)
    tf.set_seed(training_args.seed)
    tokenizer = tf.AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    if perf_args.max_position_embeddings:  # the tokenizer must allow the longer blocks before tokenizing
        tokenizer.model_max_length = perf_args.max_position_embeddings
    raw = common.load_lm_texts(data_args)
    train, evaluation = common.lm_blocks(raw, tokenizer, data_args, training_args, add_labels=False)

    texts = None if common.resume_path(training_args) else [
        tokenizer.decode(ids, skip_special_tokens=True) for ids in train[: data_args.calibration_samples]["input_ids"]]
    model = common.load_model(tf.AutoModelForMaskedLM, model_args.model_name_or_path, perf_args, tokenizer=tokenizer,
                              calibration_texts=texts, max_length=data_args.max_seq_length, seed=training_args.seed)
    collator = tf.DataCollatorForLanguageModeling(tokenizer, mlm_probability=model_args.mlm_probability,
                                                  pad_to_multiple_of=8 if (training_args.bf16 or training_args.fp16) else None)
    trainer_cls = PerformerTrainer if common.is_performer(model) else tf.Trainer
    trainer = trainer_cls(model=model, args=training_args, train_dataset=train if training_args.do_train else None,
                          eval_dataset=evaluation if training_args.do_eval else None, processing_class=tokenizer,
                          data_collator=collator)
    results = common.train_and_evaluate(trainer, training_args, perplexity=True)
    if trainer.is_world_process_zero():
        print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}, indent=1))
    return results


if __name__ == "__main__":
    main()
