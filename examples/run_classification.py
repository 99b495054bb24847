#!/usr/bin/env python
"""Fine-tune a Performer (FAVOR+) model for sequence classification with Trainer (in the style of
transformers' run_glue.py / run_classification.py).

    # softmax checkpoint converted on the fly, bundled task (Python docs chapters), CPU
    python examples/run_classification.py --model_name_or_path PATH --dataset_name pydoc_chapters \
        --output_dir runs/cls --do_train --do_eval --use_cpu --performer_nb_features 256

    # a converted checkpoint (hf-performer convert) loads as it is; local CSV / JSON files
    accelerate launch examples/run_classification.py --model_name_or_path converted/ \
        --train_file train.csv --validation_file dev.csv --output_dir runs/cls --do_train --do_eval --bf16

Every TrainingArguments option works (--gradient_accumulation_steps, --activation_checkpointing,
--bf16/--fp16, --resume_from_checkpoint PATH or "latest", --max_steps, ...). The FAVOR+ redraw schedule
(--performer_redraw_interval, in optimizer steps) runs through hf_performer.training.PerformerTrainer.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import transformers as tf
from datasets import DatasetDict, load_dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from hf_performer.training import PerformerTrainer  # noqa: E402

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_name_or_path: str = field(metadata={"help": "Softmax or Performer checkpoint (local path, or a cached Hub name)."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={
        "help": "A datasets name (offline: must be cached) or 'pydoc_chapters' (bundled, examples/data)."})
    dataset_config_name: str | None = field(default=None)
    train_file: str | None = field(default=None, metadata={"help": "CSV or JSON (lines) file with a text and a label column."})
    validation_file: str | None = field(default=None)
    text_column: str = field(default="text", metadata={"help": "Column(s) with the text; 'a,b' for sentence pairs."})
    label_column: str = field(default="label")
    max_seq_length: int = field(default=128, metadata={"help": "Longer inputs are truncated."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    calibration_samples: int = field(default=256, metadata={"help": "Training texts for the calibration step."})


def load_raw(data: DataArguments, cache_dir: str | None = None) -> DatasetDict:
    """Bundled task, a datasets name, or local CSV / JSON files -> DatasetDict with train / validation."""
    if data.dataset_name == "pydoc_chapters":
        raw = load_dataset("json", data_files=str(common.BUNDLED_DATA), split="train")
        return DatasetDict(train=raw.filter(lambda r: r["split"] == "train"),
                           validation=raw.filter(lambda r: r["split"] == "test"))
    if data.dataset_name is not None:
        raw = load_dataset(data.dataset_name, data.dataset_config_name, cache_dir=cache_dir)
        if "validation" not in raw and "test" in raw:
            raw["validation"] = raw["test"]
        return raw
    files = {k: v for k, v in (("train", data.train_file), ("validation", data.validation_file)) if v}
    if not files:
        raise ValueError("give --dataset_name or --train_file / --validation_file")
    ext = Path(next(iter(files.values()))).suffix.lstrip(".")
    return load_dataset("json" if ext in ("json", "jsonl") else ext, data_files=files, cache_dir=cache_dir)


def label_names(raw: DatasetDict, column: str) -> list:
    feature = next(iter(raw.values())).features[column]
    if hasattr(feature, "names"):
        return list(feature.names)
    return sorted({v for split in raw.values() for v in split[column]})


def text_of(batch: dict, columns: list[str]) -> tuple:
    return tuple(batch[c] for c in columns)


def build_trainer(model_args, data_args, perf_args, training_args, auto_cls=tf.AutoModelForSequenceClassification):
    """Everything up to the Trainer (shared with run_long_classification.py)."""
    tf.set_seed(training_args.seed)
    raw = load_raw(data_args, cache_dir=None)
    labels = label_names(raw, data_args.label_column)
    label2id = {v: i for i, v in enumerate(labels)}
    tokenizer = tf.AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path)
    columns = data_args.text_column.split(",")

    kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(map(str, labels))),
                  label2id={str(k): v for k, v in label2id.items()})
    texts = None  # calibration texts (not when resuming: the checkpoint holds the calibrated model)
    if "train" in raw and not common.resume_path(training_args):
        texts = [" ".join(map(str, t)) for t in zip(*text_of(raw["train"][: data_args.calibration_samples], columns))]
    model = common.load_model(auto_cls, model_args.model_name_or_path, perf_args, tokenizer=tokenizer,
                              calibration_texts=texts, max_length=data_args.max_seq_length, seed=training_args.seed,
                              **kwargs)
    max_len = min(data_args.max_seq_length, tokenizer.model_max_length)

    def preprocess(batch):
        enc = tokenizer(*text_of(batch, columns), truncation=True, max_length=max_len)
        enc["labels"] = [label2id[v] for v in batch[data_args.label_column]]
        return enc

    with training_args.main_process_first(desc="tokenizing"):
        ds = raw.map(preprocess, batched=True, remove_columns=next(iter(raw.values())).column_names)
    train, evaluation = ds.get("train"), ds.get("validation")
    if train is not None and data_args.max_train_samples:
        train = train.select(range(min(len(train), data_args.max_train_samples)))
    if evaluation is not None and data_args.max_eval_samples:
        evaluation = evaluation.select(range(min(len(evaluation), data_args.max_eval_samples)))

    def metrics(p):
        return {"accuracy": float((np.argmax(p.predictions, -1) == p.label_ids).mean())}

    trainer_cls = PerformerTrainer if common.is_performer(model) else tf.Trainer
    return trainer_cls(model=model, args=training_args, train_dataset=train if training_args.do_train else None,
                       eval_dataset=evaluation if training_args.do_eval else None, processing_class=tokenizer,
                       data_collator=tf.DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8 if
                                                                 (training_args.bf16 or training_args.fp16) else None),
                       compute_metrics=metrics)


def main(argv=None) -> dict:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    model_args, data_args, perf_args, training_args = common.parse_args(
        (ModelArguments, DataArguments, common.PerformerArguments, tf.TrainingArguments), argv)
    trainer = build_trainer(model_args, data_args, perf_args, training_args)
    results = common.train_and_evaluate(trainer, training_args)
    if trainer.is_world_process_zero():
        print(json.dumps({k: v for k, v in results.items() if isinstance(v, (int, float))}, indent=1))
    return results


if __name__ == "__main__":
    main()
