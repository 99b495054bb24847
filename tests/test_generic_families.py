"""The generic family table (``integration/generic.py``): Llama-family decoders with rotary embeddings and grouped
key/value heads converted through transformers' attention interface, checked against the unconverted models.

Every row of ``generic.ROWS`` is built from a tiny config (4 query heads sharing 2 key/value heads), converted,
saved and reloaded with plain ``AutoModelForCausalLM``, and decoded with the constant-size FAVOR+ cache.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import hf_performer
import hf_performer.integration as I
from hf_performer.integration.attention_function import favor_attention_forward
from hf_performer.integration.cache import FavorCacheLayer
from hf_performer.integration.convert import favor_modules
from hf_performer.integration.generic import GENERIC_FAMILIES, ROWS
from hf_performer.ops.naive import exact_softmax_attention
from hf_performer.settings import PerformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

V, HEADS, KV, HEAD_DIM = 96, 4, 2, 8
SETTINGS = PerformerConfig(nb_features=32, seed=3)
TYPES = [row.model_type for row in ROWS if row.causal]  # the decoders


def kv_heads(model_type: str) -> int:
    """Key/value heads of the tiny configs: 2 for the grouped-query rows, else one per query head."""
    return KV if GENERIC_FAMILIES[model_type].row.kv_heads else HEADS


def stock_config(model_type: str, **kw):
    return CONFIG_MAPPING[model_type](
        vocab_size=V, hidden_size=HEADS * HEAD_DIM, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=HEADS, num_key_value_heads=KV, head_dim=HEAD_DIM, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, initializer_range=0.3, **kw)


def stock(model_type: str, head: str = "ForCausalLM", **kw):
    torch.manual_seed(0)
    cls = next(c for c in GENERIC_FAMILIES[model_type].classes if c.__name__.endswith(head))
    return cls(stock_config(model_type, **kw)).eval()


def converted(model_type: str, head: str = "ForCausalLM", settings=SETTINGS, **kw):
    return I.convert_to_performer(stock(model_type, head, **kw), settings).eval()


def left_padded():
    g = torch.Generator().manual_seed(7)
    ids = torch.zeros((3, 7), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate([7, 4, 6]):
        ids[i, 7 - n:] = torch.randint(3, V, (n,), generator=g)
        mask[i, 7 - n:] = 1
    return ids, mask


def realigned(model):
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    return model


@pytest.mark.parametrize("model_type", TYPES)
def test_convert_keeps_every_weight_and_counts_kv_heads(model_type):
    model = stock(model_type)
    stock_name = type(model).__name__
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model = I.convert_to_performer(model, SETTINGS)
    after = model.state_dict()
    assert type(model).__name__ == f"Performer{stock_name}"
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert set(after) - set(before) == {k for k in after if ".favor." in k}
    favors = model.favor_modules()
    assert len(favors) == 2 and all(f.num_heads == kv_heads(model_type) and f.head_dim == HEAD_DIM for f in favors)
    assert model.config.model_type == f"performer_{model_type}"
    assert getattr(model.config, "sliding_window", None) is None  # every layer global (generic.py)


@pytest.mark.parametrize("model_type", TYPES)
def test_save_and_plain_auto_reload_is_bit_identical(model_type, tmp_path):
    """Converted from a model loaded from its folder, as users do: transformers saves a loaded model back in the
    checkpoint's layout (GPT-NeoX: lm_head as embed_out), which the Performer class would not read (a fresh random
    head, found by a bug-hunt helper). The conversion keeps no such renaming."""
    stock(model_type).save_pretrained(tmp_path / "stock")
    model = I.convert_to_performer(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "stock"), SETTINGS).eval()
    ids, mask = left_padded()
    hf_performer.calibrate_feature_statistics(model, {"input_ids": ids, "attention_mask": mask})
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == ["favor_attention"] * 2  # the stock config classes refuse this
    assert saved["auto_map"]["AutoModelForCausalLM"].endswith(f".{type(model).__name__}")
    again = realigned(tf.AutoModelForCausalLM.from_pretrained(tmp_path)).eval()
    assert type(again) is type(model)
    realigned(model)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        b = again(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("model_type", TYPES)
def test_cached_greedy_generation_equals_uncached_full_forwards(model_type):
    model, (ids, mask) = converted(model_type), left_padded()
    new = 6
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                             min_new_tokens=new, pad_token_id=0, return_dict_in_generate=True)
        seq, m = ids, mask  # uncached reference: one full forward over the whole sequence per token
        for _ in range(new):
            positions = (m.cumsum(-1) - 1).clamp_min(0)
            logits = model(input_ids=seq, attention_mask=m, position_ids=positions, use_cache=False).logits[:, -1]
            logits[:, 2] = -float("inf")  # min_new_tokens: generate() masks the end-of-sequence token
            nxt = logits.argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(out.sequences, seq)
    assert len(set(seq[:, ids.shape[1]:].flatten().tolist())) > 2
    for layer in out.cache.layers:  # one constant-size running state per KEY/VALUE head, no key/value storage
        assert isinstance(layer, FavorCacheLayer) and layer.keys is None
        assert layer.state.S.shape == (3, kv_heads(model_type), SETTINGS.nb_features, HEAD_DIM)


@pytest.mark.parametrize("model_type", TYPES)
def test_static_cache_generation_equals_dynamic_with_constant_size_favor_layers(model_type):
    """generate(cache_implementation="static") on every decoder row, left padded, beams included: the same tokens as
    the default cache, from FavorCacheLayers. Qwen2/Qwen3/SmolLM3 keep "full_attention" as their in-memory layer type
    (their model code picks masks by it), so the static cache was made of key/value layers sized to the whole
    generation: the prefill's mask spanned them and the layers refused to decode (found in a bug hunt)."""
    model, (ids, mask) = converted(model_type), left_padded()
    common = dict(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5, min_new_tokens=5,
                  pad_token_id=0)
    with torch.no_grad():
        for beams in (1, 2):
            dynamic = model.generate(**common, num_beams=beams)
            static = model.generate(**common, num_beams=beams, cache_implementation="static",
                                    return_dict_in_generate=True)
            assert torch.equal(static.sequences, dynamic), beams
    assert all(isinstance(layer, FavorCacheLayer) and layer.keys is None for layer in static.cache.layers)


@pytest.mark.parametrize("mode", ["beam", "sample", "beam_sample"])
def test_llama_generate_with_cache_equals_without(mode):
    model, (ids, mask) = converted("llama"), left_padded()
    kw = {"beam": dict(do_sample=False, num_beams=3, num_return_sequences=2),
          "sample": dict(do_sample=True, top_k=0), "beam_sample": dict(do_sample=True, num_beams=2)}[mode]
    outs = []
    for use_cache in (True, False):
        torch.manual_seed(11)
        with torch.no_grad():
            outs.append(model.generate(input_ids=ids, attention_mask=mask, use_cache=use_cache, max_new_tokens=6,
                                       min_new_tokens=6, pad_token_id=0, **kw))
    assert torch.equal(outs[0], outs[1])


def test_step_by_step_cache_equals_full_forward_and_stays_constant_size():
    model = converted("qwen2")
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
        cache = I.FavorCache()
        steps = [model(input_ids=ids[:, :4], cache=cache, use_cache=True).logits]
        size = cache.layers[0].state.nbytes
        for t in range(4, 9):
            steps.append(model(input_ids=ids[:, t:t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 9 and cache.layers[0].state.nbytes == size


def test_grouped_cached_steps_under_autograd_backpropagate_like_the_full_forward():
    """Grouped key/value heads (one running state per key/value head, folded and unfolded around each step): the
    gradient of cached steps' logits reaches every token's embeddings as the full forward's does, the prompt's too
    (its prefill state was once built without autograd). Float64."""
    model = converted("llama").double()
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(9))
    embeds = model.model.embed_tokens(ids).detach().requires_grad_()
    full = model(inputs_embeds=embeds, use_cache=False).logits[:, 4:]
    (ref,) = torch.autograd.grad(full.square().sum(), embeds)
    cache = I.FavorCache()
    model(inputs_embeds=embeds[:, :4], cache=cache, use_cache=True)
    steps = [model(inputs_embeds=embeds[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(4, 7)]
    (got,) = torch.autograd.grad(torch.cat(steps, 1).square().sum(), embeds)
    assert ref[:, :4].abs().sum() > 0
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_grouped_heads_match_exact_softmax_with_repeated_kv_when_features_are_many():
    """The fold is the GQA mapping of transformers (query head h uses key/value head h // G): with many features
    FAVOR+ approaches the exact softmax of the repeated keys, head by head (a wrong mapping would not)."""
    model = converted("llama", settings=PerformerConfig(nb_features=4096, seed=0))
    attn = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q, k, v = (0.3 * torch.randn(2, n, 10, HEAD_DIM, generator=g) for n in (HEADS, KV, KV))
    out, _ = favor_attention_forward(attn, q, k, v, None, scaling=HEAD_DIM**-0.5)  # [B, L, H, d]
    rep = HEADS // KV
    exact = exact_softmax_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), causal=True)
    wrong = exact_softmax_attention(q, k.repeat(1, rep, 1, 1), v.repeat(1, rep, 1, 1), causal=True)
    err = (out.transpose(1, 2) - exact).abs().max()
    assert err < 0.05 < (wrong - exact).abs().max()


def test_calibration_fits_per_kv_head_statistics_and_changes_causal_outputs():
    model = converted("mistral")
    ids, mask = left_padded()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert hf_performer.calibrate_feature_statistics(model, {"input_ids": ids, "attention_mask": mask}) == 2
    for f in model.favor_modules():
        assert bool(f.stats_calibrated) and f.key_shift.shape == (KV, HEAD_DIM) and f.key_shift.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, before)


def test_sliding_window_configs_become_global_and_a_window_kwarg_is_refused():
    model = converted("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    assert model.config.sliding_window is None and model.config.use_sliding_window is False
    assert model.config.layer_types == ["full_attention"] * 2  # in memory; config.json says favor_attention
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, HEADS, 5, HEAD_DIM)
    k = torch.randn(1, KV, 5, HEAD_DIM)
    with pytest.raises(NotImplementedError, match="sliding attention window"):
        favor_attention_forward(attn, q, k, k, None, scaling=1.0, sliding_window=4)
    with pytest.raises(NotImplementedError, match="soft-capping"):
        favor_attention_forward(attn, q, k, k, None, scaling=1.0, softcap=30.0)


SLIDING = {  # configs with sliding-window layers, which the conversion makes global FAVOR+ layers
    "qwen2": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    "qwen3": {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
    "smollm3": {"use_sliding_window": True, "sliding_window": 4, "no_rope_layers": [1, 0]},
    "mistral": {"sliding_window": 4},
    "phi3": {"sliding_window": 4},
}


LOADING = ("name_or_path", "_use_kernels", "_is_hf_initialized")  # what from_pretrained itself sets on the model


def _plain_attributes(module) -> dict:
    return {k: v for k, v in vars(module).items()
            if k not in LOADING and (v is None or isinstance(v, (bool, int, float, str, tuple)))}


@pytest.mark.parametrize("model_type", SLIDING)
def test_sliding_window_model_converted_in_place_runs_like_its_reload(model_type, tmp_path):
    """A model converted in place has every plain attribute of every module as its saved-and-reloaded self (built
    from the converted config), and the same logits. Qwen2/Qwen3 cache whether a layer slides (has_sliding_layers,
    each attention's layer_type and sliding_window) when they are built: converted in place, every forward raised
    (found in a bug hunt); only a reload ran."""
    stock_model = stock(model_type, **SLIDING[model_type])
    assert "sliding_attention" in (getattr(stock_model.config, "layer_types", None) or ()) or stock_model.config.sliding_window
    model = I.convert_to_performer(stock_model, SETTINGS).eval()
    model.save_pretrained(tmp_path)
    again = realigned(tf.AutoModelForCausalLM.from_pretrained(tmp_path)).eval()
    loaded = dict(again.named_modules())
    for name, module in model.named_modules():
        assert _plain_attributes(module) == _plain_attributes(loaded[name]), name
    ids, mask = left_padded()
    realigned(model)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        b = again(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("model_type", TYPES)
def test_every_task_head_converts_and_calibrates(model_type):
    ids, mask = left_padded()
    for stock_cls in GENERIC_FAMILIES[model_type].classes:
        torch.manual_seed(0)
        model = I.convert_to_performer(stock_cls(stock_config(model_type, num_labels=2)).eval(), SETTINGS)
        assert hf_performer.calibrate_feature_statistics(model, {"input_ids": ids, "attention_mask": mask}) == 2
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=False)
        assert torch.isfinite(out[0] if not hasattr(out, "start_logits") else out.start_logits).all()


def test_every_generic_class_is_exercised():
    tested = [*TYPES, *ENCODERS, "modernbert"]  # the ModernBERT tests below take every class too
    heads = {c for t in tested for c in GENERIC_FAMILIES[t].classes}
    assert heads == {c for f in GENERIC_FAMILIES.values() for c in f.classes}


@pytest.mark.parametrize("model_type", [row.model_type for row in ROWS])
def test_position_extension_keeps_the_first_positions_and_runs_longer_inputs(model_type):
    """``extend_positions`` (``hf-performer convert --max-position-embeddings``) on every row of the generic table:
    outputs up to the old limit unchanged bit for bit, and an input past it runs. OPT's learned table was refused
    with a message listing opt as supported; ALBERT's row said rotary, so only its config grew and a longer input
    crashed (both found in a bug hunt)."""
    from hf_performer.conversion.positions import extend_positions, max_tokens

    torch.manual_seed(0)
    if model_type == "modernbert":
        model = tf.ModernBertModel(modernbert_config())
    elif model_type in TYPES:
        model = stock(model_type)
    else:
        model = next(c for c in GENERIC_FAMILIES[model_type].classes if c.__name__.endswith("Model"))(
            encoder_config(model_type))
    model = I.convert_to_performer(model.eval(), SETTINGS).eval()
    old = max_tokens(model.config)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, old), generator=g)
    mask = torch.ones_like(ids)
    mask[1, old - 5:] = 0
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask)[0]
        assert extend_positions(model, 2 * old + 3) == {"from": old, "to": 2 * old + 3}
        assert max_tokens(model.config) == 2 * old + 3
        assert torch.equal(model(input_ids=ids, attention_mask=mask)[0], before)
        longer = model(input_ids=torch.randint(3, V, (1, 2 * old + 3), generator=g))[0]
    assert longer.shape[1] == 2 * old + 3 and torch.isfinite(longer).all()


def _snapshot(model):
    return type(model), {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(model.config.to_dict())


@pytest.mark.parametrize("build, reason", [
    (lambda: tf.DebertaV2Model(tf.DebertaV2Config(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=32)), "relative-position"),
    (lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=16, n_layer=1, n_head=2)), "ALiBi"),
    (lambda: tf.GptOssForCausalLM(tf.GptOssConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                                  intermediate_size=16, num_local_experts=2)), "attention sinks"),
])
def test_unconvertible_models_are_refused_unchanged_naming_the_reason(build, reason):
    model = build()
    cls, state, cfg = _snapshot(model)
    with pytest.raises(ValueError, match=reason):
        I.convert_to_performer(model, SETTINGS)
    assert type(model) is cls and model.config.to_dict() == cfg
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not any(hasattr(m, "favor") for m in model.modules())


def test_cli_refuses_an_unconvertible_source(tmp_path, capsys):
    from hf_performer.conversion.cli import main

    tf.BloomForCausalLM(tf.BloomConfig(vocab_size=V, hidden_size=16, n_layer=1, n_head=2)).save_pretrained(tmp_path / "s")
    assert main(["convert", str(tmp_path / "s"), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err
    assert "ALiBi" in err and "bloom" in err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- BERT-style encoders
ENCODERS = [row.model_type for row in ROWS if row.causal is None or row.shared]  # + ALBERT (not a decoder)


def encoder_config(model_type: str, **kw):
    return CONFIG_MAPPING[model_type](vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32, max_position_embeddings=40, initializer_range=0.2,
                                      num_labels=2, pad_token_id=1, bos_token_id=0, eos_token_id=2, **kw)


@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_every_head_converts_keeps_weights_and_reloads_bit_identically(model_type, tmp_path):
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    for stock_cls in GENERIC_FAMILIES[model_type].classes:
        torch.manual_seed(0)
        model = stock_cls(encoder_config(model_type, is_decoder=stock_cls.__name__.endswith("ForCausalLM"))).eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model = I.convert_to_performer(model, SETTINGS)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), stock_cls.__name__
        auto = hf_performer.integration.portable.auto_class_name(type(model))
        if auto is None:  # a class no Auto class maps (none today)
            continue
        batch = {"input_ids": ids, "attention_mask": mask}
        if stock_cls.__name__.endswith("MultipleChoice"):
            batch = {k: v[:, None].repeat(1, 2, 1) for k, v in batch.items()}
        hf_performer.calibrate_feature_statistics(model, batch)
        model.save_pretrained(tmp_path / stock_cls.__name__)
        again = realigned(getattr(tf, auto).from_pretrained(tmp_path / stock_cls.__name__)).eval()
        assert type(again) is type(model)
        realigned(model)
        with torch.no_grad():
            a, b = model(**batch), again(**batch)
        assert torch.equal(a[0], b[0]), stock_cls.__name__


@pytest.mark.parametrize("model_type", ENCODERS)
def test_encoder_right_padding_does_not_change_the_real_tokens(model_type):
    torch.manual_seed(0)
    model = I.convert_to_performer(GENERIC_FAMILIES[model_type].classes and
                                   next(c for c in GENERIC_FAMILIES[model_type].classes
                                        if c.__name__.endswith("Model"))(encoder_config(model_type)), SETTINGS).eval()
    ids = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.ones(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=ids).last_hidden_state
        with_pad = model(input_ids=padded, attention_mask=mask).last_hidden_state[:, :6]
    torch.testing.assert_close(with_pad, alone, rtol=1e-5, atol=1e-5)


def test_bert_style_decoder_generation_cached_equals_uncached():
    torch.manual_seed(0)
    model = I.convert_to_performer(tf.XLMRobertaForCausalLM(encoder_config("xlm-roberta", is_decoder=True)), SETTINGS)
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(4))
    outs = []
    for use_cache in (True, False):
        with torch.no_grad():
            outs.append(model.eval().generate(input_ids=ids, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                              pad_token_id=1, use_cache=use_cache))
    assert torch.equal(outs[0], outs[1])


# ---------------------------------------------------------------------------------------------- ALBERT
def albert_config(**kw):
    return tf.AlbertConfig(**{**dict(vocab_size=V, embedding_size=8, hidden_size=16, num_hidden_layers=3,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=40,
                                     initializer_range=0.3, pad_token_id=1, num_labels=2), **kw})


def test_albert_shared_attention_gets_one_favor_layer_fitted_on_every_layer_it_serves():
    """Cross-layer sharing: one attention module runs 3 times per forward. It gets one FavorAttention, counted once,
    whose statistics are those that ``calibrate_statistics`` fits on the q, k of all 3 calls stacked (not those of
    the last call alone)."""
    from hf_performer.conversion.capture import favor_inputs

    torch.manual_seed(0)
    model = I.convert_to_performer(tf.AlbertModel(albert_config()), SETTINGS).eval()
    (favor,) = model.favor_modules()
    fresh = copy.deepcopy(favor)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with favor_inputs(model) as store:
        assert hf_performer.calibrate_feature_statistics(model, {"input_ids": ids, "attention_mask": mask}) == 1
    (calls,) = store.values()
    assert len(calls) == 3 and not torch.equal(calls[0][0], calls[2][0])  # three layers, three different inputs
    names = ("key_shift", "log_qk_scale", "oprf_rho", "proposal_centers")
    last = copy.deepcopy(fresh)
    last.calibrate_statistics(calls[2][0], calls[2][1], key_padding_mask=calls[2][2], scale=calls[2][3])
    fresh.calibrate_statistics(torch.cat([c[0] for c in calls]), torch.cat([c[1] for c in calls]),
                               key_padding_mask=torch.cat([c[2] for c in calls]), scale=calls[0][3])
    for n in names:
        assert torch.equal(getattr(favor, n), getattr(fresh, n)), n
    assert not torch.equal(favor.key_shift, last.key_shift)


def test_albert_layer_groups_get_one_favor_layer_each_and_calibrate():
    torch.manual_seed(0)
    model = I.convert_to_performer(tf.AlbertForSequenceClassification(
        albert_config(num_hidden_layers=4, num_hidden_groups=2)), SETTINGS).eval()
    favors = model.favor_modules()
    assert [f.layer_id for f in favors] == [0, 1] and not torch.equal(favors[0].projection, favors[1].projection)
    ids = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(0))
    assert hf_performer.calibrate_feature_statistics(model, {"input_ids": ids}) == 2
    assert all(bool(f.stats_calibrated) for f in favors)


def test_albert_training_step_allocates_no_attention_sized_tensor():
    from test_integration_linear_memory import L, ShapeRecorder

    torch.manual_seed(0)
    ids = torch.randint(3, 64, (2, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, L - 100:] = 0
    config = albert_config(vocab_size=64, max_position_embeddings=L)
    model = I.convert_to_performer(tf.AlbertForMaskedLM(config), SETTINGS).train()
    with ShapeRecorder() as rec:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert len(rec.shapes) > 100 and rec.quadratic() == []
    stock_model = tf.AlbertForMaskedLM(albert_config(vocab_size=64, max_position_embeddings=L,
                                                     attn_implementation="eager")).train()
    with ShapeRecorder() as rec:  # the recorder does see softmax attention
        stock_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert rec.quadratic()


# ---------------------------------------------------------------------------------------------- ModernBERT
def modernbert_config(vocab_size=V, **kw):
    return tf.ModernBertConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                               num_attention_heads=4, max_position_embeddings=600, global_attn_every_n_layers=3,
                               local_attention=8, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                               sep_token_id=2, num_labels=2, initializer_range=0.3, **kw)


def test_modernbert_converts_global_layers_only_and_reloads_every_head_bit_identically(tmp_path):
    ids = torch.randint(3, V, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    for stock_cls in GENERIC_FAMILIES["modernbert"].classes:
        torch.manual_seed(0)
        model = stock_cls(modernbert_config()).eval()
        before = {k: v.clone() for k, v in model.state_dict().items()}
        model = I.convert_to_performer(model, SETTINGS)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items()), stock_cls.__name__
        converted_layers = [n for n, m in model.named_modules() if hasattr(m, "favor") and n.endswith(".attn")]
        assert [n.split(".")[-2] for n in converted_layers] == ["0"]  # layer 0 global; layers 1, 2 local (exact)
        batch = {"input_ids": ids, "attention_mask": mask}
        if stock_cls.__name__.endswith("MultipleChoice"):
            batch = {k: v[:, None].repeat(1, 2, 1) for k, v in batch.items()}
        hf_performer.calibrate_feature_statistics(model, batch)
        model.save_pretrained(tmp_path / stock_cls.__name__)
        saved = json.loads((tmp_path / stock_cls.__name__ / "config.json").read_text())
        assert saved["layer_types"] == ["favor_attention"] * 3
        auto = hf_performer.integration.portable.auto_class_name(type(model))
        again = realigned(getattr(tf, auto).from_pretrained(tmp_path / stock_cls.__name__)).eval()
        assert type(again) is type(model)
        assert again.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        realigned(model)
        with torch.no_grad():
            assert torch.equal(model(**batch)[0], again(**batch)[0]), stock_cls.__name__


def test_modernbert_local_layers_stay_exact_and_padding_changes_nothing():
    from hf_performer.conversion.capture import attention_inputs, attention_outputs, replaced_attention_inputs

    torch.manual_seed(0)
    stock_model = tf.ModernBertModel(modernbert_config(attn_implementation="sdpa")).eval()
    model = I.convert_to_performer(copy.deepcopy(stock_model), SETTINGS).eval()
    ids = torch.randint(3, V, (2, 30), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 21:] = 0
    names = [f"layers.{i}.attn" for i in range(3)]
    with torch.no_grad(), attention_inputs(stock_model, names) as inputs, attention_outputs(stock_model, names) as ref:
        stock_model(input_ids=ids, attention_mask=mask)
    inputs, ref = dict(inputs), dict(ref)
    with torch.no_grad(), replaced_attention_inputs(model, inputs), attention_outputs(model, names) as out:
        model(input_ids=ids, attention_mask=mask)
    for name in names[1:]:  # the local layers: the stock SDPA result, on real tokens
        torch.testing.assert_close(out[name][0], ref[name][0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[name][1, :21], ref[name][1, :21], rtol=1e-5, atol=1e-5)
    assert (out[names[0]] - ref[names[0]]).abs().max() > 1e-4  # the global layer is FAVOR+ (an estimate)
    padded = torch.cat([ids[:1, :21], torch.zeros(1, 5, dtype=torch.long)], 1)
    pmask = torch.cat([torch.ones(1, 21, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=ids[:1, :21]).last_hidden_state
        with_pad = model(input_ids=padded, attention_mask=pmask).last_hidden_state[:, :21]
    torch.testing.assert_close(with_pad, alone, rtol=1e-5, atol=1e-5)


def test_modernbert_training_step_allocates_no_attention_sized_tensor():
    from test_integration_linear_memory import L, ShapeRecorder

    torch.manual_seed(0)
    model = I.convert_to_performer(tf.ModernBertForMaskedLM(modernbert_config(vocab_size=64)), SETTINGS).train()
    ids = torch.randint(3, 64, (2, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, L - 100:] = 0
    with ShapeRecorder() as rec:
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert len(rec.shapes) > 100 and rec.quadratic() == []
    stock_model = tf.ModernBertForMaskedLM(modernbert_config(vocab_size=64, attn_implementation="sdpa")).train()
    with ShapeRecorder() as rec:  # stock: the local layers' band is an L×L mask
        stock_model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    assert rec.quadratic()


@pytest.mark.parametrize("model_type", TYPES)
def test_favor_gets_the_unscaled_query_and_the_whole_scale(model_type):
    """FAVOR+ splits the softmax scale evenly between q and k (d^-1/4 each). OPT multiplies q by its scaling inside
    the module and calls the attention with scaling=1.0, so FAVOR+ got q' = q·d^-1/2, k' = k: the same logits with a
    variance exp(|q' + k'|^2) several times larger (zero-shot OPT's error fell 1.7x per 16x features instead of
    4x; bug hunt). Every family now hands FAVOR+ the whole scale, and OPT (no rotary) the projection's own q."""
    model = converted(model_type)
    favor = favor_modules(model)[0]
    attn = next(m for m in model.modules() if getattr(m, "favor", None) is favor)
    seen = {}

    def keep_query(module, args, kwargs):
        seen["q"], seen["scale"] = args[0], kwargs["scale"]

    def keep_input(module, args, kwargs):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    hooks = [favor.register_forward_pre_hook(keep_query, with_kwargs=True),
             attn.register_forward_pre_hook(keep_input, with_kwargs=True)]
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    assert seen["scale"] == pytest.approx(HEAD_DIM**-0.5)
    if model_type == "opt":
        expected = attn.q_proj(seen["x"]).view(2, 7, HEADS, HEAD_DIM).transpose(1, 2)
        torch.testing.assert_close(seen["q"], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("model_type", TYPES)
@pytest.mark.parametrize("use_cache", [False, True])
def test_left_padding_without_position_ids_does_not_change_the_real_tokens(model_type, use_cache, tmp_path):
    """Bug hunt: without position_ids (Trainer with a left-padding collator, the statistics step, a plain forward)
    a converted rotary model counted the padding into the positions, and FAVOR+'s features are not invariant to a
    joint rotation: a row's logits moved with the batch's padding (up to 4.9 on a calibrated tiny Llama), and batch
    4 against batch 2 x gradient accumulation 2 gave updates differing by the size of the update. Rotary families now
    take the positions from the mask, as generate does; the others (learned tables) are unaffected either way.
    Reloaded models too, and a cached forward given the whole mask continues the positions."""
    model = converted(model_type)
    model.save_pretrained(tmp_path / "m")
    model = type(model).from_pretrained(tmp_path / "m").eval()
    hf_performer.calibrate_feature_statistics(model, {"input_ids": left_padded()[0]})
    ids = torch.randint(3, V, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    with torch.no_grad():
        alone = model(input_ids=ids, use_cache=False).logits
        with_pad = model(input_ids=padded, attention_mask=mask, use_cache=use_cache).logits[:, 3:]
        torch.testing.assert_close(with_pad, alone, rtol=1e-5, atol=1e-5)
        explicit = model(input_ids=padded, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0),
                         use_cache=use_cache).logits[:, 3:]  # position ids given: used as they are (the same here)
        torch.testing.assert_close(explicit, alone, rtol=1e-5, atol=1e-5)
        if use_cache:  # the first 5 tokens, then the last 4 with the whole mask: positions continue from the cache
            first = model(input_ids=padded[:, :5], attention_mask=mask[:, :5], use_cache=True)
            rest = model(input_ids=padded[:, 5:], attention_mask=mask, cache=first.cache, use_cache=True).logits
            torch.testing.assert_close(rest, alone[:, 2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", [row.model_type for row in ROWS if row.masks_by_layer_type])
def test_a_user_built_static_cache_decodes_in_a_manual_loop(model_type):
    """Bug hunt: StaticCache(config=model.config) built by the caller held key/value layers for the families whose
    in-memory layer types stay "full_attention" (only generate swapped them), so a manual forward with it failed on
    the mask it was given ("pass a mask over the whole sequence"), or without a mask refused the layer."""
    from transformers import StaticCache

    model = converted(model_type)
    ids = torch.randint(3, V, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        cache = StaticCache(config=model.config, max_cache_len=32)
        first = model(input_ids=ids[:, :5], attention_mask=mask[:, :5], cache=cache, use_cache=True).logits
        rest = model(input_ids=ids[:, 5:], attention_mask=mask, cache=cache, use_cache=True).logits
    assert all(isinstance(layer, FavorCacheLayer) for layer in cache.layers)
    torch.testing.assert_close(torch.cat([first, rest], 1), full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt_neox"])
@pytest.mark.parametrize("step_mask", ["past and new", "new only", "none"])
def test_manual_decoding_after_a_left_padded_prefill_continues_each_rows_positions(model_type, step_mask):
    """Review hunt: once a prefill took its positions from the mask, a later step whose mask covered only the new
    tokens (or none, or any step under torch.compile) counted from the cache length, padding included: the padded
    row's logits moved by 2.4. A step now continues each row from the real tokens its state absorbed."""
    model = converted(model_type)
    ids, mask = left_padded()
    nxt = torch.randint(3, V, (3, 2), generator=torch.Generator().manual_seed(5))
    whole = torch.cat([mask, torch.ones_like(nxt)], 1)
    with torch.no_grad():
        full = model(input_ids=torch.cat([ids, nxt], 1), attention_mask=whole, use_cache=False).logits[:, -2:]
        cache = I.FavorCache()
        model(input_ids=ids, attention_mask=mask, cache=cache, use_cache=True)
        kwargs = {"past and new": {"attention_mask": whole}, "new only": {"attention_mask": torch.ones_like(nxt)},
                  "none": {}}[step_mask]
        step = model(input_ids=nxt, cache=cache, use_cache=True, **kwargs).logits
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2", "llama"])
def test_a_quantized_cache_is_refused_naming_the_fixed_size_state(model_type):
    # Qwen2 keeps "full_attention" as its in-memory layer type, so transformers' own check passed it and then asked
    # for a quantization backend that could not help
    model = converted(model_type)
    ids = torch.randint(3, V, (1, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="nothing to quantize"):
        model.generate(input_ids=ids, max_new_tokens=2, cache_implementation="quantized")
    out = model.generate(input_ids=ids, max_new_tokens=2, do_sample=False)  # refused, not broken
    assert out.shape == (1, 7)
