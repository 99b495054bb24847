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


ROPES = {  # RoPE variants of transformers' modeling_rope_utils (one config each; limit 16 tokens)
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8},
    "longrope": {"rope_type": "longrope", "long_factor": [2.0] * 4, "short_factor": [1.0] * 4,
                 "original_max_position_embeddings": 8},  # factor unset: derived from the limit
}


def rotary(rope: dict | None):
    rope = None if rope is None else {"rope_theta": 10000.0, **rope}
    config_class, model_class, extra = tf.LlamaConfig, tf.LlamaForCausalLM, {}
    if rope and rope["rope_type"] == "longrope":  # Phi-3 (its config's own original_max_position_embeddings wins)
        config_class, model_class = tf.Phi3Config, tf.Phi3ForCausalLM
        extra = {"original_max_position_embeddings": rope["original_max_position_embeddings"]}
    torch.manual_seed(0)
    return model_class(config_class(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=16,
                                    rope_parameters=rope, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                    **extra)).eval()


@pytest.mark.parametrize("rope", list(ROPES))
def test_rotary_extension_saves_the_same_rope(rope, tmp_path):
    """A rotary model has no table to tile; raising its limit must not change what the saved folder computes:
    longrope's attention factor (which scales cos and sin at every length) is derived from max_position_embeddings
    unless its factor is written out."""
    stock = rotary(ROPES[rope])
    if rope == "longrope":  # (the factor the limit sets: an attention factor above 1)
        assert stock.model.rotary_emb.attention_scaling > 1
    extended = copy.deepcopy(stock)
    assert extend_positions(extended, 64) == {"from": 16, "to": 64}
    extended.save_pretrained(tmp_path)
    reloaded = type(stock).from_pretrained(tmp_path).eval()
    assert reloaded.config.max_position_embeddings == 64
    for length in (12, 24):  # within the old limit, and past it (longrope's long factors, llama3/yarn scaling)
        ids = torch.randint(3, V, (1, length), generator=torch.Generator().manual_seed(length))
        with torch.no_grad():
            torch.testing.assert_close(reloaded(input_ids=ids).logits, stock(input_ids=ids).logits)


def test_rotary_extension_refused_where_the_rope_reads_the_limit():
    """Dynamic NTK scaling rescales its frequencies beyond max_position_embeddings: nothing can pin that, so the
    extension is refused before the model changes."""
    model = rotary({"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ConversionError, match="'dynamic'.*leave --max-position-embeddings out"):
        extend_positions(model, 64)
    assert model.config.max_position_embeddings == 16
