"""Position extension (tiling): the first positions' outputs are unchanged; config, buffers, tokenizer follow."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf

from hf_performer import PerformerConfig
from hf_performer.conversion.errors import ConversionError
from hf_performer.conversion.positions import extend_positions, max_tokens
from hf_performer.integration import convert_to_performer

V = 50


def bert():
    return tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=24))


def roberta():
    return tf.RobertaModel(tf.RobertaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                            intermediate_size=32, max_position_embeddings=26, pad_token_id=1))


def distilbert():
    return tf.DistilBertModel(tf.DistilBertConfig(vocab_size=V, dim=16, n_layers=2, n_heads=2, hidden_dim=32,
                                                  max_position_embeddings=24))


def gpt2():
    return tf.GPT2Model(tf.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=24))


class _Tok:
    model_max_length = 24


@pytest.mark.parametrize("build", [bert, roberta, distilbert, gpt2])
def test_extension_keeps_first_positions(build):
    torch.manual_seed(0)
    model = convert_to_performer(build().eval(), PerformerConfig(nb_features=16, seed=1))
    ids = torch.randint(3, V, (2, 24))
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    if model.config.model_type == "performer_gpt2":  # causal: calibrated statistics, as a converted model has
        with torch.no_grad():
            for f in model.favor_modules():
                f.calibrate_statistics(torch.randn(2, 2, 24, 8), torch.randn(2, 2, 24, 8))
    extended, tok = copy.deepcopy(model), _Tok()
    info = extend_positions(extended, 100, tok)
    assert info == {"from": 24, "to": 100}
    assert max_tokens(extended.config) == 100 and tok.model_max_length == 100
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).last_hidden_state
        after = extended(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    with torch.no_grad():  # and the longer inputs now run
        long = extended(input_ids=torch.randint(3, V, (1, 100))).last_hidden_state
    assert long.shape == (1, 100, 16) and torch.isfinite(long).all()


@pytest.mark.parametrize("build", [bert, roberta])
def test_tiling_layout_and_buffers(build):
    model = build().eval()
    old = model.embeddings.position_embeddings.weight.detach().clone()
    offset = 2 if model.config.model_type == "roberta" else 0
    n = old.shape[0] - offset
    extend_positions(model, 3 * n + 5)
    new = model.embeddings.position_embeddings.weight
    assert new.shape[0] == 3 * n + 5 + offset == model.config.max_position_embeddings
    torch.testing.assert_close(new[: offset + n], old)
    torch.testing.assert_close(new[offset + n : offset + 2 * n], old[offset:])  # tiled
    torch.testing.assert_close(new[offset + 3 * n :], old[offset : offset + 5])
    assert model.embeddings.position_ids.shape == (1, new.shape[0])
    assert model.embeddings.token_type_ids.shape == (1, new.shape[0])
    assert torch.equal(model.embeddings.position_ids[0], torch.arange(new.shape[0]))


def test_gpt2_config_and_shrink_refused():
    model = gpt2()
    extend_positions(model, 64)
    assert model.config.n_positions == 64 == model.config.max_position_embeddings
    assert model.wpe.weight.shape == (64, 16)
    with pytest.raises(ConversionError, match="can only grow"):
        extend_positions(model, 32)
