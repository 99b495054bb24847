"""Padding, masks and refused inputs of the "favor" attention implementation."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf

import hf_performer.integration as I
from hf_performer.integration import attention_function as af
from hf_performer.settings import PerformerConfig

SETTINGS = PerformerConfig(nb_features=32, seed=1)
V = 64


def bert(cls=tf.BertModel, **kw):
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, initializer_range=0.2, **kw)
    return I.convert_to_performer(cls(cfg), SETTINGS).eval()


def roberta(**kw):
    torch.manual_seed(0)
    cfg = tf.RobertaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, pad_token_id=1, initializer_range=0.2)
    return I.convert_to_performer(tf.RobertaModel(cfg), SETTINGS).eval()


def distilbert(**kw):
    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(vocab_size=V, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32,
                              initializer_range=0.2)
    return I.convert_to_performer(tf.DistilBertModel(cfg), SETTINGS).eval()


def gpt2(cls=tf.GPT2LMHeadModel, **kw):
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32, initializer_range=0.2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, **kw)
    return I.convert_to_performer(cls(cfg), SETTINGS).eval()


LENGTHS = [9, 5, 7]


def sequences():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(3, V, (n,), generator=g) for n in LENGTHS]


@pytest.mark.parametrize("build", [bert, roberta, distilbert], ids=["bert", "roberta", "distilbert"])
def test_right_padding_matches_unpadded_examples(build):
    model, seqs = build(), sequences()
    pad = model.config.pad_token_id
    Lmax = max(LENGTHS)
    ids = torch.full((len(seqs), Lmax), pad)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, Lmax, C]
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None]).last_hidden_state[0]  # [len, C]
            torch.testing.assert_close(batched[i, : len(s)], alone, rtol=1e-5, atol=1e-5)


def test_gpt2_left_padding_matches_unpadded_examples():
    model, seqs = gpt2(), sequences()
    Lmax = max(LENGTHS)
    ids = torch.zeros((len(seqs), Lmax), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, Lmax - len(s):], mask[i, Lmax - len(s):] = s, 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)  # what generate() passes for left padding
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        for i, s in enumerate(seqs):
            alone = model(input_ids=s[None], use_cache=False).logits[0]
            torch.testing.assert_close(batched[i, Lmax - len(s):], alone, rtol=1e-5, atol=1e-5)


def test_padding_changes_nothing_but_is_not_ignored():
    """The mask matters: without it the padded positions would be attended (guards against a silently dropped mask)."""
    model = bert()
    ids = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.no_grad():
        masked = model(input_ids=ids, attention_mask=mask).last_hidden_state[0, :5]
        unmasked = model(input_ids=ids).last_hidden_state[0, :5]
        short = model(input_ids=ids[:, :5]).last_hidden_state[0]
    torch.testing.assert_close(masked, short, rtol=1e-5, atol=1e-5)
    assert (unmasked - short).abs().max() > 1e-3


def test_mask_function_returns_2d_padding_mask_or_none():
    full = torch.ones(2, 6, dtype=torch.bool)
    assert torch.equal(af.favor_mask(2, 6, 6, attention_mask=full), full)  # passed on: no host sync to check it
    assert af.favor_mask(2, 6, 6, attention_mask=None) is None
    padded = full.clone()
    padded[0, :2] = False
    out = af.favor_mask(2, 1, 6, mask_function=af.causal_mask_function, attention_mask=padded)
    assert out.shape == (2, 6) and out.dtype == torch.bool and torch.equal(out, padded)
    with pytest.raises(NotImplementedError, match="mask pattern"):
        af.favor_mask(2, 6, 6, mask_function=lambda b, h, q, kv: True, attention_mask=padded)


@pytest.mark.parametrize("build", [bert, gpt2], ids=["bert", "gpt2"])
def test_4d_mask_is_refused(build):
    model = build()
    ids = torch.randint(3, V, (2, 6))
    with pytest.raises(ValueError, match="2D padding mask"):
        model(input_ids=ids, attention_mask=torch.ones(2, 1, 6, 6))


@pytest.mark.parametrize("build", [bert, gpt2], ids=["bert", "gpt2"])
def test_output_attentions_is_refused(build):
    model = build()
    with pytest.raises(ValueError, match="output_attentions"):
        model(input_ids=torch.randint(3, V, (1, 5)), output_attentions=True)


def test_output_attentions_in_config_is_refused():
    model = bert()
    with pytest.raises(ValueError, match="output_attentions"):
        model.config.output_attentions = True


def test_packed_sequences_are_refused():
    model = gpt2()
    packed = torch.tensor([[0, 1, 2, 0, 1, 2]])
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(input_ids=torch.randint(3, V, (1, 6)), position_ids=packed, use_cache=False)


def test_softmax_implementations_are_refused(tmp_path):
    model = gpt2()
    with pytest.raises(ValueError, match="FAVOR\\+ attention only"):
        model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == I.ATTN_IMPLEMENTATION
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="FAVOR\\+ attention only"):
        tf.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")


@pytest.mark.parametrize("build", [bert, gpt2], ids=["bert", "gpt2"])
def test_attention_dropout_is_ignored_with_one_warning(build, monkeypatch):
    monkeypatch.setattr(af, "_DROPOUT_WARNED", False)
    model = build().train()
    ids = torch.randint(3, V, (2, 6))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids)
        model(input_ids=ids)
    messages = [w for w in caught if "attention-probability dropout" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].filename == __file__  # the caller's line, not transformers' attention module


def test_caller_stacklevel_skips_every_library_frame(tmp_path, monkeypatch):
    """However many library frames lie between (here two functions in a 'library' folder), the warning is
    attributed to the first frame outside it."""
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "fake_library.py").write_text(
        "import warnings\n"
        "from hf_performer.integration.caller import caller_stacklevel\n"
        "def inner(prefixes):\n"
        "    warnings.warn('from the library', UserWarning, stacklevel=caller_stacklevel(prefixes))\n"
        "def outer(prefixes):\n"
        "    return inner(prefixes)\n")
    monkeypatch.syspath_prepend(str(lib))
    import fake_library

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fake_library.outer((str(lib) + "/",))
        fake_library.outer(("/nowhere/",))
    assert caught[0].filename == __file__
    assert caught[1].filename == fake_library.__file__  # nothing skipped: the warning's own line


def test_cross_attention_honours_encoder_padding():
    model = bert(tf.BertModel, is_decoder=True, add_cross_attention=True)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, V, (1, 5), generator=g)
    enc = torch.randn(1, 7, 16, generator=g)
    enc_mask = torch.ones(1, 7, dtype=torch.long)
    enc_mask[0, 4:] = 0
    with torch.no_grad():
        masked = model(input_ids=ids, encoder_hidden_states=enc, encoder_attention_mask=enc_mask, use_cache=False)
        short = model(input_ids=ids, encoder_hidden_states=enc[:, :4], use_cache=False)
    torch.testing.assert_close(masked.last_hidden_state, short.last_hidden_state, rtol=1e-5, atol=1e-5)


def test_gpt2_scaling_options_are_honoured():
    """scale_attn_by_inverse_layer_idx / scale_attn_weights reach FAVOR as `scale`; reorder_and_upcast_attn runs."""
    plain, by_layer = gpt2(), gpt2(scale_attn_by_inverse_layer_idx=True)
    assert by_layer.transformer.h[1].attn.scaling == pytest.approx(plain.transformer.h[1].attn.scaling / 2)
    ids = torch.randint(3, V, (1, 6))
    with torch.no_grad():
        assert not torch.allclose(plain(input_ids=ids).logits, by_layer(input_ids=ids).logits)
        upcast = gpt2(reorder_and_upcast_attn=True)
        torch.testing.assert_close(upcast(input_ids=ids).logits, plain(input_ids=ids).logits)
        unscaled = gpt2(scale_attn_weights=False)
        assert unscaled.transformer.h[0].attn.scaling == 1.0
        assert not torch.allclose(unscaled(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_hidden_states_are_still_returned():
    model = gpt2()
    out = model(input_ids=torch.randint(3, V, (1, 5)), output_hidden_states=True, use_cache=False)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1


def test_a_compiled_forward_without_attention_mask_names_the_fix():
    """Under torch.compile transformers cannot check position_ids for packed sequences, so a batch without an
    attention_mask always gets a packed-sequence mask, which FAVOR+ refuses: the error says to pass an attention_mask
    (found in a bug hunt: Trainer's torch_compile=True with a collator that returns none), and with one the compiled
    forward equals the eager one."""
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, attn_pdrop=0.0,
                        resid_pdrop=0.0, embd_pdrop=0.0)
    model = I.convert_to_performer(tf.GPT2LMHeadModel(cfg), PerformerConfig(nb_features=16)).train()
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        with pytest.raises(NotImplementedError, match="also assumes under torch.compile.*pass an attention_mask"):
            compiled(input_ids=ids, use_cache=False)
        mask = torch.ones_like(ids)
        torch.testing.assert_close(compiled(input_ids=ids, attention_mask=mask, use_cache=False).logits,
                                   model(input_ids=ids, use_cache=False).logits)
