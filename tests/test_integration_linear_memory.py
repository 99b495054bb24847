"""No L×L tensor anywhere: masks, forward and backward of converted models at L = 512.

Every op's outputs are recorded by a TorchDispatchMode; a tensor with two dimensions >= L would be an
attention-sized (quadratic) allocation. The model is tiny (hidden 16, vocab 64, 64 position rows of
width 16), so no weight has two dimensions >= L. The same recorder run on the stock softmax model must
find the L×L tensors, so the check can fail.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import hf_performer.integration as I
from hf_performer.settings import PerformerConfig

L = 512


class ShapeRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.shapes.append((str(func), tuple(t.shape)))
        return out

    def quadratic(self) -> list[tuple[str, tuple[int, ...]]]:
        return [(f, s) for f, s in self.shapes if sum(d >= L for d in s) >= 2]


def build(family: str, attn: str):
    torch.manual_seed(0)
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=32, max_position_embeddings=L, attention_probs_dropout_prob=0.0,
                            attn_implementation=attn)
        model = tf.BertForMaskedLM(cfg)
    else:
        cfg = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=L, attn_pdrop=0.0,
                            attn_implementation=attn)
        model = tf.GPT2LMHeadModel(cfg)
    return model


def batch(family: str):
    ids = torch.randint(3, 64, (2, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    if family == "bert":
        mask[1, L - 100:] = 0  # right padding
    else:
        mask[1, :100] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


def record_train_step(model, inputs) -> ShapeRecorder:
    model.train()
    with ShapeRecorder() as rec:
        model(**inputs).loss.backward()
    return rec


@pytest.mark.parametrize("local_window", [0, 3])
@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_training_step_allocates_no_attention_sized_tensor(family, local_window):
    performer = PerformerConfig(nb_features=32, chunk_size=64, local_window=local_window)
    model = I.convert_to_performer(build(family, "sdpa"), performer)
    rec = record_train_step(model, batch(family))
    assert len(rec.shapes) > 100  # the recorder saw the whole step
    assert rec.quadratic() == []
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_recorder_catches_softmax_attention(family):
    rec = record_train_step(build(family, "eager"), batch(family))
    assert any(s[-2:] == (L, L) for _, s in rec.quadratic())


@pytest.mark.parametrize("local_window", [0, 3])
def test_generation_prefill_and_decode_allocate_no_attention_sized_tensor(local_window):
    performer = PerformerConfig(nb_features=32, chunk_size=64, local_window=local_window)
    model = I.convert_to_performer(build("gpt2", "sdpa"), performer).eval()
    inputs = batch("gpt2")
    with torch.no_grad(), ShapeRecorder() as rec:
        model.generate(input_ids=inputs["input_ids"][:, : L - 4], attention_mask=inputs["attention_mask"][:, : L - 4],
                       max_new_tokens=4, min_new_tokens=4, do_sample=False, pad_token_id=0)
    assert rec.quadratic() == []
