"""A harder causal subject for the conversion benchmark: a small GPT-2 trained on Python source code.

Why: the tiny GPT-2 of ``tiny_gpt2.py`` (4 x 128, 1000 steps on documentation prose) has easy attention (a
converted copy keeps its perplexity, ratio ~1.00 zero-shot), so it cannot tell good calibration from bad. This
one is trained on another domain than the calibration text, with its own tokenizer, meant to learn sharper
attention (indentation, brackets, copying names). Measured (``float32_causal.py``, 512-token held-out windows), its
heads stay diffuse after the default 1000 steps: a query row's largest softmax weight is 0.02-0.16 on average per
head, and no row puts more than 0.9 on one key:

* text: the ``.py`` files of the running Python's standard library (``sysconfig.get_paths()["stdlib"]``; no
  tests, no site-packages), split by a stable hash of the file's path: 10% of the files are held out
  (``code_documents("eval")``) and never trained on;
* tokenizer: its own byte-level BPE (``tokenizers``), 4096 entries, trained on the train files;
* model: GPT-2, 4 layers, width 256, 4 heads (head_dim 64), 512 positions, tied embeddings, no dropout; AdamW
  (lr 1e-3, weight decay 0.1), linear warm-up and cosine decay, batches of 4 packed 512-token windows (files
  separated by <|endoftext|>), ``steps`` steps (default 1000: about 2M tokens, 0.8 of a pass over the train files).

Training is deterministic for a given seed, torch version and thread count, and **cached**: ``load_or_train``
returns the cached folder (``$HF_PERFORMER_BENCH_CACHE`` or ``~/.cache/hf-performer-bench``, keyed by every
setting) and trains only when it is missing; the versions and device that trained it are in its
``training.json``. Cost on this machine's CPU with one thread: ~1.0-1.2 s a step alone, up to ~2.8 s while
other jobs share the two cores, so 17-45 minutes once (``training.json`` records the time it took).

    python benchmarks/code_gpt2.py                 # train (or find) the cached model, print its record
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch
import transformers as tf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_gpt2 import train_lm  # noqa: E402

EOS = "<|endoftext|>"
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3", "ensurepip",
             "turtledemo", "tkinter", "idlelib"}
DEFAULTS = {"vocab_size": 4096, "n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 512, "length": 512,
            "batch_size": 4, "lr": 1e-3, "steps": 1000, "seed": 0, "eval_fraction": 0.1}


def stdlib_files() -> list[Path]:
    """The standard library's .py files (sorted; tests and GUI/demo packages excluded). Raises FileNotFoundError
    when the standard library's sources are not installed (some distributions ship only bytecode)."""
    root = stdlib_root()
    files = sorted(p for p in root.rglob("*.py") if not SKIP_DIRS & set(p.relative_to(root).parts[:-1])
                   and not p.name.startswith("test_"))
    if len(files) < 100:
        raise FileNotFoundError(f"the Python standard library's sources are missing under {root} ({len(files)} .py "
                                "files): install the full Python (with its Lib/*.py) to build the code GPT-2.")
    return files


def stdlib_root() -> Path:
    """The running Python's standard-library folder."""
    return Path(sysconfig.get_paths()["stdlib"])


def _split(path: Path, eval_fraction: float) -> str:
    rel = path.relative_to(stdlib_root()).as_posix()
    return "eval" if int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < eval_fraction else "train"


def code_documents(split: str, eval_fraction: float = DEFAULTS["eval_fraction"]) -> list[str]:
    """The source text of each standard-library file of ``split`` ("train" or "eval"), in path order; empty files
    and repeated contents are dropped (an empty ``__init__.py`` would be in both splits)."""
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r}: expected 'train' or 'eval'.")
    out = []
    for p in stdlib_files():
        if _split(p, eval_fraction) == split:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                out.append(text)
    out = list(dict.fromkeys(out))
    if split == "eval":  # a file whose exact text is also a train file (a stub) is not held out
        train = set(code_documents("train", eval_fraction))
        out = [t for t in out if t not in train]
    return out


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on ``texts``, as a transformers fast tokenizer (EOS = BOS = PAD)."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    return tf.PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                      model_max_length=DEFAULTS["n_positions"])


def cache_root() -> Path:
    return Path(os.environ.get("HF_PERFORMER_BENCH_CACHE", Path.home() / ".cache" / "hf-performer-bench"))


def cache_key(settings: dict) -> str:
    """The cache folder's name: a hash of the settings (the versions and device that trained it are recorded in
    its training.json, not keyed: another torch gives a slightly different model of the same recipe)."""
    return "code-gpt2-" + hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def train(out_dir: Path, settings: dict, progress: bool = True, device: str = "cpu") -> dict:
    s = settings
    torch.manual_seed(s["seed"])
    t0 = time.perf_counter()
    texts = code_documents("train", s["eval_fraction"])
    tok = train_tokenizer(texts, s["vocab_size"])
    ids: list[int] = []
    for enc in tok(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        ids += enc + [tok.eos_token_id]
    n = len(ids) // s["length"]
    windows = torch.tensor(ids[: n * s["length"]]).view(n, s["length"])
    tokenizer_s = time.perf_counter() - t0
    config = tf.GPT2Config(vocab_size=len(tok), n_positions=s["n_positions"], n_embd=s["n_embd"], n_layer=s["n_layer"],
                           n_head=s["n_head"], bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    info = train_lm(tf.GPT2LMHeadModel, config, tok, windows, out_dir, steps=s["steps"], batch_size=s["batch_size"],
                    lr=s["lr"], seed=s["seed"], progress=progress, desc="train code GPT-2", warmup_div=25, device=device)
    return {"settings": s, "train_files": len(texts), "train_tokens": info["train_tokens"],
            "epochs": round(s["steps"] * s["batch_size"] / len(windows), 2),
            "parameters": info["parameters"], "tokenizer_and_data_s": round(tokenizer_s, 1),
            "train_s": round(info["wall_s"], 1), "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
            "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": tf.__version__},
            "final_train_loss": info["final_train_loss"], "loss_curve": info["loss_curve"]}


def load_or_train(progress: bool = True, device: str = "cpu", **overrides) -> tuple[Path, dict]:
    """(folder of the trained model and tokenizer, its training record), training it only when not cached."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}: expected some of {sorted(DEFAULTS)}")
    settings = {**DEFAULTS, **overrides}
    folder = cache_root() / cache_key(settings)
    record = folder / "training.json"
    if record.is_file():
        return folder, {**json.loads(record.read_text()), "cached": True}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        info = train(tmp, settings, progress, device)
        (tmp / "training.json").write_text(json.dumps(info, indent=1))
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, {**info, "cached": False}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"])
    p.add_argument("--device", default="cpu", help="where to train (the result is cached either way)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args()
    folder, info = load_or_train(progress=not args.no_progress, device=args.device, steps=args.steps)
    print(folder)
    print(json.dumps({k: v for k, v in info.items() if k != "loss_curve"}, indent=1))


if __name__ == "__main__":
    main()
