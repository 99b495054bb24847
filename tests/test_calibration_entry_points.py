"""Every public statistics entry point calibrates every FAVOR+ layer of every supported model class, whatever
the caller's cache settings, or raises one clear error and changes nothing (issue 11, part 2)."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import transformers as tf
from test_integration_convert import HEADS, SETTINGS, bert_cfg, distil_cfg, gpt2_cfg, inputs_for

import hf_performer
import hf_performer.statistics as statistics
from hf_performer import PerformerConfig, calibrate_feature_statistics
from hf_performer.conversion import calibrate_model_statistics
from hf_performer.integration import convert_to_performer
from hf_performer.integration.generic import GENERIC_FAMILIES
from hf_performer.statistics import favor_layers

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = [h[0].__name__ for h in HEADS]


def converted(stock_cls, make_cfg):
    torch.manual_seed(0)
    return convert_to_performer(stock_cls(make_cfg()).eval(), SETTINGS)


def calibrated_flags(model) -> list[bool]:
    return [bool(m.stats_calibrated) for m in favor_layers(model)]


def test_every_supported_class_is_covered():
    # the generic table's classes: tests/test_generic_families.py (test_every_task_head_converts_and_calibrates)
    generic = {c.__name__ for f in GENERIC_FAMILIES.values() for c in f.classes}
    assert sorted(IDS) == sorted(set(hf_performer.supported_model_classes()) - generic)


@pytest.mark.parametrize("stock_cls,make_cfg,_", HEADS, ids=IDS)
@pytest.mark.parametrize("use_cache", ["config default", True, False])
def test_calibrate_feature_statistics_reaches_every_layer(stock_cls, make_cfg, _, use_cache):
    model = converted(stock_cls, make_cfg)
    batch = inputs_for(model)
    if use_cache != "config default":
        if not hasattr(model.config, "use_cache"):
            pytest.skip("no use_cache setting")
        model.config.use_cache = use_cache  # what the caller's config says (GPT-2 and decoders: True by default)
        batch["use_cache"] = use_cache
    before = model.config.use_cache if hasattr(model.config, "use_cache") else None
    assert not any(calibrated_flags(model))
    assert calibrate_feature_statistics(model, batch) == len(favor_layers(model)) == model.config.num_hidden_layers
    assert all(calibrated_flags(model))
    assert getattr(model.config, "use_cache", None) == before  # the caller's setting is restored


@pytest.mark.parametrize("stock_cls,make_cfg,_", HEADS, ids=IDS)
def test_calibrate_model_statistics_reaches_every_layer(stock_cls, make_cfg, _):
    model = converted(stock_cls, make_cfg)
    batch = inputs_for(model)
    halves = [{k: v[:1] for k, v in batch.items()}, {k: v[1:] for k, v in batch.items()}]
    assert calibrate_model_statistics(model, halves) == model.config.num_hidden_layers
    assert all(calibrated_flags(model))


@pytest.mark.parametrize("stock_cls,make_cfg", [(tf.GPT2LMHeadModel, gpt2_cfg),
                                                (tf.GPT2ForQuestionAnswering, gpt2_cfg)])
def test_a_prefill_step_is_calibrated_like_a_causal_forward(stock_cls, make_cfg, monkeypatch):
    """Second line of defence: if a cache were used anyway, a prefill through FavorAttention.step calibrates
    exactly as the full causal forward does."""
    reference, model = converted(stock_cls, make_cfg), converted(stock_cls, make_cfg)
    batch = inputs_for(model)
    calibrate_feature_statistics(reference, batch)
    monkeypatch.setattr(statistics, "_no_cache", lambda model: contextlib.nullcontext())
    calibrate_feature_statistics(model, batch)  # config.use_cache=True: attention runs through step()
    assert all(calibrated_flags(model))
    for a, b in zip(favor_layers(reference), favor_layers(model)):
        for (name, x), y in zip(a.named_buffers(), b.buffers()):
            torch.testing.assert_close(x, y, msg=name)


def test_a_batch_with_a_cache_or_without_real_tokens_is_refused():
    model = converted(tf.GPT2LMHeadModel, gpt2_cfg)
    batch = inputs_for(model)
    with pytest.raises(ValueError, match="full-sequence forwards"):
        calibrate_feature_statistics(model, {**batch, "past_key_values": tf.DynamicCache(config=model.config)})
    with pytest.raises(TypeError, match="mapping"):
        calibrate_feature_statistics(model, batch["input_ids"])
    with pytest.raises(ValueError, match="without any real token"):
        calibrate_feature_statistics(model, {**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])})
    assert not any(calibrated_flags(model))


def test_unreached_cross_attention_is_named_and_nothing_changes():
    torch.manual_seed(0)
    model = convert_to_performer(tf.GPT2LMHeadModel(gpt2_cfg(add_cross_attention=True)).eval(),
                                 {**SETTINGS.to_dict(), "kernel": "softmax"})
    batch = inputs_for(model)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"reached 2 of the 4 .*crossattention.*encoder_hidden_states"):
        calibrate_feature_statistics(model, batch)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # all layers or none
    encoder = torch.randn(batch["input_ids"].shape[0], 5, model.config.n_embd)
    assert calibrate_feature_statistics(model, {**batch, "encoder_hidden_states": encoder}) == 4
    assert all(calibrated_flags(model))


# ------------------------------------------------------------------ corners found in a bug hunt
def test_a_long_padded_batch_with_few_real_tokens_samples_its_real_queries_only():
    """Up to 512 query positions are sampled for the features' proposal: among all positions they could all be
    padding (3 real tokens padded to 1024: torch.multinomial raised on a zero distribution), and padded picks were
    wasted. Padded q, k are made huge here: a centre taken from them would show."""
    torch.manual_seed(0)
    favor = hf_performer.FavorAttention(8, PerformerConfig(nb_features=16, seed=1), num_heads=2)
    L, real = 1024, 3
    q, k = torch.randn(2, 2, L, 8), torch.randn(2, 2, L, 8)
    q[:, :, real:] += 1000.0
    k[:, :, real:] += 1000.0
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[:, :real] = True
    for causal in (False, True):
        favor.calibrate_statistics(q, k, key_padding_mask=mask, causal=causal)
        assert favor.proposal_centers.abs().max() < 50  # every centre is a real query + a real key
    with pytest.raises(ValueError, match="no real query of the batch sees a real key"):
        favor.calibrate_statistics(q, k, key_padding_mask=torch.zeros(2, L, dtype=torch.bool))


def test_cross_attention_calibration_takes_every_query_not_the_encoder_padding():
    """A cross-attention layer's key padding mask is the encoder's: with as many decoder queries as encoder keys it
    was read as the queries' mask too, so pair sampling kept only the queries at the encoder's real positions."""
    torch.manual_seed(0)
    cfg = PerformerConfig(nb_features=16, seed=1, center_keys=False, balance_qk=False)
    L, real = 16, 3
    q = torch.zeros(1, 1, L, 8)
    q[0, 0, :, 0] = torch.arange(L, dtype=torch.float32)  # a query's position shows in its centre's first coordinate
    k = 0.01 * torch.randn(1, 1, L, 8)
    mask = torch.zeros(1, L, dtype=torch.bool)
    mask[:, :real] = True
    firsts = {}
    for cross in (False, True):
        favor = hf_performer.FavorAttention(8, cfg, cross_attention=cross)
        favor.calibrate_statistics(q, k, key_padding_mask=mask, scale=1.0)
        firsts[cross] = favor.proposal_centers[0, :, 0].max().item()
    assert firsts[False] < real and firsts[True] > real  # self-attention: real queries only; cross: every query
    model = convert_to_performer(tf.BertLMHeadModel(bert_cfg(is_decoder=True, add_cross_attention=True)), SETTINGS)
    flags = {("crossattention" in name, m.cross_attention) for name, m in model.named_modules()
             if isinstance(m, hf_performer.FavorAttention)}
    assert flags == {(False, False), (True, True)}  # (a cross-attention site, its layer's flag)


def test_calibration_restores_each_module_mode():
    """A model in train() with a part in eval(): every module keeps its own mode (model.train(was_training) gave
    every submodule the model's, switching dropout back on where the user had turned it off)."""
    model = converted(tf.BertForSequenceClassification, bert_cfg)
    model.train()
    model.bert.encoder.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    calibrate_feature_statistics(model, inputs_for(model))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not model.bert.encoder.training and model.training


def test_a_model_without_weights_is_refused_before_any_forward():
    with torch.device("meta"):
        model = convert_to_performer(tf.BertModel(bert_cfg()), SETTINGS)
    batch = {k: v for k, v in inputs_for(model).items()}
    with pytest.raises(ValueError, match="meta device"):
        calibrate_feature_statistics(model, batch)


def test_orthogonal_and_feature_norm_shape_the_importance_sampled_features_too():
    """After the statistics step every layer runs importance-sampled features, whose noise was always drawn
    orthogonal with chi norms: ``orthogonal`` and ``feature_norm`` silently did nothing there."""
    from hf_performer.features import draw_aligned_projection

    centre = torch.zeros(1, 1, 8)  # one proposal component at 0: the rows are the noise itself
    for orthogonal in (True, False):
        for norm in ("chi", "sqrt_d"):
            w = draw_aligned_projection(centre, 16, width=1.0, seed=0, layer_id=0, draw=0, orthogonal=orthogonal,
                                        feature_norm=norm)[0][0]
            gram = w[:8] @ w[:8].T  # the first block of 8 rows
            off = (gram - torch.diag(torch.diag(gram))).abs().max()
            assert (off < 1e-9) == orthogonal
            norms = w.norm(dim=1)
            assert torch.allclose(norms, torch.full_like(norms, 8**0.5)) == (norm == "sqrt_d")
    outs = []
    for orthogonal in (True, False):
        torch.manual_seed(0)
        model = convert_to_performer(tf.BertModel(bert_cfg()).eval(), {**SETTINGS.to_dict(), "orthogonal": orthogonal})
        calibrate_feature_statistics(model, inputs_for(model))
        with torch.no_grad():
            outs.append(model(**inputs_for(model)).last_hidden_state)
    assert not torch.equal(*outs)


# ------------------------------------------------------------------ the CLI and the examples' helper, real tokenizer
def _tokenizer():
    from test_conversion_fixtures import tokenizer

    return tokenizer()


def _sized(make_cfg):
    cfg = make_cfg()
    cfg.vocab_size = _tokenizer().vocab_size
    if cfg.model_type == "gpt2":
        cfg.pad_token_id = _tokenizer().pad_token_id
    return cfg


TEXT_CLASSES = [  # causal ones (cached decoding by default) and heads without a use_cache argument
    (tf.BertLMHeadModel, lambda: bert_cfg(is_decoder=True)),
    (tf.GPT2ForSequenceClassification, gpt2_cfg),
    (tf.GPT2ForQuestionAnswering, gpt2_cfg),
    (tf.DistilBertForSequenceClassification, distil_cfg),
]


@pytest.mark.parametrize("stock_cls,make_cfg", TEXT_CLASSES, ids=[c[0].__name__ for c in TEXT_CLASSES])
def test_cli_and_examples_calibrate_every_layer(stock_cls, make_cfg, tmp_path, capsys):
    import sys
    from pathlib import Path

    from test_conversion_fixtures import text_file

    from hf_performer.conversion.cli import main
    from hf_performer.integration.registry import FAMILIES

    torch.manual_seed(0)
    stock = stock_cls(_sized(make_cfg)).eval()
    stock.save_pretrained(tmp_path / "src")
    _tokenizer().save_pretrained(tmp_path / "src")
    txt = text_file(tmp_path / "t.txt", n=8)
    rc = main(["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--nb-features", "16",
               "--calibration-data", str(txt), "--statistics-batches", "1", "--max-length", "24", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    performer_cls = FAMILIES[stock.config.model_type][1][stock_cls]
    assert all(calibrated_flags(performer_cls.from_pretrained(tmp_path / "out")))

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
    try:
        import common
    finally:
        sys.path.pop(0)
    model = convert_to_performer(stock, SETTINGS)
    texts = txt.read_text().split("\n\n")
    assert common.calibrate(model, None, _tokenizer(), texts, steps=0, max_length=24)["statistics"]
    assert all(calibrated_flags(model))
    with pytest.raises(ValueError, match="needs a tokenizer"):
        common.load_model(type(model), str(tmp_path / "out"), common.PerformerArguments(), calibration_texts=texts)
