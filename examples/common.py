"""Helpers shared by the example scripts (small on purpose: each script reads top to bottom).

* ``PerformerArguments``: the ``--performer_*`` options (also spelled ``--performer-*``) that convert a
  softmax checkpoint on the fly; a checkpoint that is already a Performer model loads as it is.
* ``load_model``: from_pretrained + optional conversion + optional position extension.
* ``calibrate``: the conversion pipeline's statistics step and attention-transfer calibration
  (``hf_performer.conversion.calibrate_model_statistics`` / ``hf_performer.conversion.calibrate``); ``extend_positions`` and
  ``max_tokens`` are ``conversion``'s (Longformer-style tiling of the position table).
* ``measure_train_step``: time and peak memory of one optimizer step (CUDA allocator peak, or the
  process's resident-set high-water mark on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import hf_performer.integration as hfp
from hf_performer import PerformerConfig
from hf_performer.conversion import CalibrationConfig, calibrate_model_statistics, extend_positions
from hf_performer.conversion import calibrate as attention_transfer
from hf_performer.conversion.data import BatchSchedule, pad_id, tokenize
from hf_performer.conversion.memory import proc_status, relax_malloc, reset_peak_rss
from hf_performer.conversion.positions import max_tokens

__all__ = ["BUNDLED_DATA", "LMDataArguments", "PerformerArguments", "calibrate", "extend_positions", "is_performer",
           "load_model", "max_tokens", "measure_train_step", "parse_args", "train_and_evaluate"]

EXAMPLES = Path(__file__).resolve().parent
BUNDLED_DATA = EXAMPLES / "data" / "pydoc_chapters.jsonl"


def _arg(default, help: str, name: str):
    dashed = name.replace("_", "-")
    return field(default=default, metadata={"help": help, **({"aliases": [f"--{dashed}"]} if dashed != name else {})})


@dataclass
class PerformerArguments:
    """FAVOR+ settings used when converting a softmax checkpoint (ignored for a Performer checkpoint)."""

    performer: bool = _arg(True, "Convert a softmax checkpoint to Performer FAVOR+ attention on the fly "
                           "(--performer False keeps softmax attention: the baseline).", "performer")
    performer_nb_features: int = _arg(256, "Random features m per layer.", "performer_nb_features")
    performer_kernel: str = _arg("softmax", "softmax | favor++ | relu | trig.", "performer_kernel")
    performer_redraw_interval: int = _arg(0, "Redraw the features every this many optimizer steps (0 = never).",
                                          "performer_redraw_interval")
    performer_seed: int = _arg(0, "Seed of the random features.", "performer_seed")
    performer_chunk_size: int = _arg(PerformerConfig.chunk_size, "FAVOR+ chunk size of the causal op (peak memory "
                                     "vs speed).", "performer_chunk_size")
    performer_calibration_steps: int = _arg(0, "Attention-transfer calibration steps after conversion "
                                            "(0 = statistics step only; needs the conversion package).",
                                            "performer_calibration_steps")
    max_position_embeddings: int | None = _arg(None, "Extend the learned position table to this many tokens "
                                               "(Longformer-style tiling) before training.", "max_position_embeddings")

    def settings(self) -> PerformerConfig:
        return PerformerConfig(nb_features=self.performer_nb_features, kernel=self.performer_kernel,
                               redraw_interval=self.performer_redraw_interval, seed=self.performer_seed,
                               chunk_size=self.performer_chunk_size)


def is_performer_config(config) -> bool:
    return str(getattr(config, "model_type", "")).startswith("performer_")


def is_performer(model) -> bool:
    return is_performer_config(model.config)


def load_model(auto_cls, name_or_path: str, performer_args: PerformerArguments, tokenizer=None,
               calibration_texts: list[str] | None = None, max_length: int = 128, seed: int = 0, **kwargs):
    """``auto_cls.from_pretrained`` (offline paths work as usual), then extend positions and convert as asked.

    A softmax checkpoint converted here is calibrated on ``calibration_texts`` (statistics step, plus
    ``--performer_calibration_steps`` of attention transfer from a copy of the softmax model); None skips both
    (resuming: the checkpoint holds the calibrated model). Texts without a tokenizer, or an empty list, raise
    ValueError. A softmax model keeps transformers' default attention (sdpa)."""
    if calibration_texts is not None and (tokenizer is None or not calibration_texts):
        raise ValueError("load_model: calibration_texts needs a tokenizer and at least one text (None: no statistics "
                         "step); got " + ("no tokenizer." if tokenizer is None else "an empty list."))
    model = auto_cls.from_pretrained(name_or_path, **kwargs)
    if performer_args.max_position_embeddings and performer_args.max_position_embeddings > max_tokens(model.config):
        info = extend_positions(model, performer_args.max_position_embeddings, tokenizer)
        print(f"[examples] position table extended from {info['from']} to {info['to']} tokens")
    if performer_args.performer and not is_performer(model):
        steps = performer_args.performer_calibration_steps
        teacher = copy.deepcopy(model).eval() if steps > 0 else None
        model = hfp.convert_to_performer(model, performer_args.settings())
        if calibration_texts is not None:
            done = calibrate(model, teacher, tokenizer, calibration_texts, steps=steps, max_length=max_length, seed=seed)
            print(f"[examples] calibration: {done}")
        del teacher
    return model


def calibrate(model, teacher, tokenizer, texts: list[str], steps: int = 0, max_length: int = 128,
              batch_size: int = 8, seed: int = 0, progress: bool = False) -> dict:
    """The conversion pipeline's statistics step (per-head FAVOR+ statistics from real text, seconds), then
    ``steps`` of attention-transfer calibration of ``model`` towards ``teacher`` (its softmax original), with a
    progress bar when ``progress``. Returns what ran."""
    schedule = BatchSchedule(tokenize(texts, tokenizer, max_length), batch_size, pad_id(tokenizer), seed=seed)
    batches = schedule.epoch()  # shortest first: take 8 spread over the lengths
    calibrate_model_statistics(model, batches[:: max(1, len(batches) // 8)][:8], progress=False)
    done = {"statistics": True, "transfer_steps": 0}
    if steps > 0:
        log = attention_transfer(model, teacher, schedule, CalibrationConfig(steps=steps, batch_size=batch_size,
                                                                  max_length=max_length, seed=seed), progress=progress)
        done.update(transfer_steps=log["steps_done"], transfer_loss=log["history"][-1]["loss"] if log["history"] else None)
    return done


# ---------------------------------------------------------------------------------------------- LM data
@dataclass
class LMDataArguments:
    """Text for run_mlm.py / run_clm.py: a datasets name (offline: cached), 'pydoc_chapters' (bundled Python
    documentation passages) or local .txt (one document per line) / .csv / .json files."""

    dataset_name: str | None = field(default=None, metadata={"help": "datasets name, or 'pydoc_chapters'."})
    dataset_config_name: str | None = field(default=None)
    train_file: str | None = field(default=None)
    validation_file: str | None = field(default=None)
    text_column: str = field(default="text")
    validation_split_percentage: int = field(default=10, metadata={"help": "Held out when there is no validation split."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per training block (texts are concatenated)."})
    max_train_samples: int | None = field(default=None)
    max_eval_samples: int | None = field(default=None)
    calibration_samples: int = field(default=64, metadata={"help": "Blocks used by the calibration step."})


def load_lm_texts(data: LMDataArguments):
    """DatasetDict(train=..., validation=...) with one column ``data.text_column``."""
    from datasets import DatasetDict, load_dataset

    if data.dataset_name == "pydoc_chapters":
        raw = load_dataset("json", data_files=str(BUNDLED_DATA), split="train")
        return DatasetDict(train=raw.filter(lambda r: r["split"] == "train"),
                           validation=raw.filter(lambda r: r["split"] == "test"))
    if data.dataset_name:
        raw = load_dataset(data.dataset_name, data.dataset_config_name)
    else:
        files = {k: v for k, v in (("train", data.train_file), ("validation", data.validation_file)) if v}
        if not files:
            raise ValueError("give --dataset_name or --train_file")
        ext = Path(next(iter(files.values()))).suffix.lstrip(".")
        ext = {"txt": "text", "jsonl": "json"}.get(ext, ext)
        raw = load_dataset(ext, data_files=files)
    if "validation" not in raw:
        split = raw["train"].train_test_split(test_size=data.validation_split_percentage / 100, seed=0)
        raw = DatasetDict(train=split["train"], validation=split["test"])
    return raw


def lm_blocks(raw, tokenizer, data: LMDataArguments, training_args, add_labels: bool):
    """Tokenize, concatenate and cut into blocks of max_seq_length tokens (run_mlm / run_clm grouping)."""
    size = min(data.max_seq_length, tokenizer.model_max_length)

    def tokenize(batch):
        return tokenizer([t for t in batch[data.text_column] if t and t.strip()], return_special_tokens_mask=not add_labels)

    def group(batch):
        joined = {k: sum(batch[k], []) for k in batch}
        total = (len(joined["input_ids"]) // size) * size
        out = {k: [v[i:i + size] for i in range(0, total, size)] for k, v in joined.items()}
        if add_labels:
            out["labels"] = [list(b) for b in out["input_ids"]]
        return out

    with training_args.main_process_first(desc="tokenizing"):
        tok = raw.map(tokenize, batched=True, remove_columns=raw["train"].column_names)
        blocks = tok.map(group, batched=True)
    train, evaluation = blocks["train"], blocks["validation"]
    if data.max_train_samples:
        train = train.select(range(min(len(train), data.max_train_samples)))
    if data.max_eval_samples:
        evaluation = evaluation.select(range(min(len(evaluation), data.max_eval_samples)))
    return train, evaluation


# ---------------------------------------------------------------------------------------------- training
def resume_path(training_args) -> str | None:
    """--resume_from_checkpoint PATH, or "latest": the newest checkpoint-* in --output_dir (None if none)."""
    r = training_args.resume_from_checkpoint
    if r == "latest":
        from transformers.trainer_utils import get_last_checkpoint

        return get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    return r


def train_and_evaluate(trainer, training_args, perplexity: bool = False) -> dict:
    """Train (resuming if asked), save the model and the metrics, evaluate; returns the metrics."""
    results = {}
    if training_args.do_train:
        out = trainer.train(resume_from_checkpoint=resume_path(training_args))
        trainer.save_model()
        trainer.log_metrics("train", out.metrics)
        trainer.save_metrics("train", out.metrics)
        trainer.save_state()
        results.update(out.metrics)
    if training_args.do_eval:
        metrics = trainer.evaluate()
        if perplexity and "eval_loss" in metrics:
            metrics["perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


def parse_args(dataclass_types, argv=None):
    """HfArgumentParser over the script's dataclasses (a single .json argument: read from that file)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(os.path.abspath(argv[0]))
    return parser.parse_args_into_dataclasses(argv)


# ---------------------------------------------------------------------------------------------- measuring
@contextlib.contextmanager
def cpu_memory_cap(extra_bytes: int | None):
    """Cap this process's address space at its current size + ``extra_bytes`` (Linux): an allocation past the
    cap fails inside torch ("can't allocate memory") instead of the kernel's OOM killer ending the process
    (or a neighbour). No-op when ``extra_bytes`` is None or the platform has no RLIMIT_AS."""
    try:
        import resource
    except ImportError:
        resource = None
    size = proc_status("VmSize")
    if extra_bytes is None or resource is None or size is None:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = size + int(extra_bytes)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (torch.OutOfMemoryError, MemoryError)) or "out of memory" in text \
        or "can't allocate memory" in text or "cannot allocate memory" in text


def measure_train_step(model, batch: dict, repeats: int = 2, lr: float = 1e-5, autocast_dtype=None,
                       cpu_memory_limit: int | None = None) -> dict:
    """Median time (s) of ``repeats`` optimizer steps (forward, backward, AdamW) after one warm-up step, then
    one more step for the peak memory above the state before it: CUDA max_memory_allocated (tensors), or on
    CPU the resident-set high-water mark, with glibc set to return large blocks at once (which slows
    allocation, hence after the timed steps and best in a fresh process: see run_long_classification.py).
    On CPU, ``cpu_memory_limit`` bytes cap what the steps may allocate (see cpu_memory_cap).
    Out-of-memory is returned as {"status": "oom"}, not raised."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    cuda = device.type == "cuda"

    def step():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize(device)

    cap = cpu_memory_cap(None if cuda else cpu_memory_limit)
    try:
        cap.__enter__()
        step()  # warm-up: kernels, optimizer state
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
        gc.collect()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            exact = reset_peak_rss()
            base = proc_status("VmRSS")
        step()  # the memory step
        if cuda:
            peak, method = torch.cuda.max_memory_allocated(device) - base, "cuda.max_memory_allocated"
        else:
            peak = (proc_status("VmHWM") or 0) - (base or 0)
            method = "VmHWM - VmRSS" if exact else "VmHWM - VmRSS (high-water mark not resettable: upper bound)"
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        capped = cpu_memory_limit is not None and not cuda and isinstance(exc, RuntimeError)
        if not (_is_oom(exc) or capped):  # under a cap, allocator failures surface as assorted RuntimeErrors
            raise
        limit = (f" (this run caps the step's address space, RLIMIT_AS, at {cpu_memory_limit / 2**30:.1f} GiB above "
                 "the process's size before it; the refused request came on top of what the step already held)"
                 if cpu_memory_limit and not cuda else "")
        # torch's allocator message without its C++ assertion prefix ("[enforce fail at alloc_cpu.cpp:N] err == 0.")
        text = re.sub(r"^\[enforce fail at [^\]]*\]\s*(err == 0\.\s*)?", "", str(exc).splitlines()[0])
        return {"status": "oom", "error": text[:300] + limit}
    finally:
        cap.__exit__(None, None, None)
        opt.state.clear()
        if not cuda:
            relax_malloc()
        model.zero_grad(set_to_none=True)
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {"status": "ok", "time_s": sorted(times)[len(times) // 2], "peak_bytes": max(0, peak), "method": method}


def env_summary() -> str:
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__} ({dev}), {os.cpu_count()} CPUs"

