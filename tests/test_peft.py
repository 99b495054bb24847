"""PEFT on converted models: LoRA with PEFT's default target modules (no ``target_modules``) attaches to the
attention projections of converted BERT and GPT-2, trains through ``Trainer``, merges, saves and reloads with
plain ``from_pretrained``; the reloaded model equals the merged PEFT model, and the merge equals the adapted
model it came from."""

from __future__ import annotations

import sys

import pytest
import torch
import transformers as tf

import hf_performer  # noqa: F401 - registers the Performer model types (and their PEFT defaults)
from hf_performer import PerformerConfig, convert_to_performer
from hf_performer.integration.peft_support import _AfterImport, register_peft_hook

peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

V = 64
SETTINGS = PerformerConfig(nb_features=16, seed=0)


def bert_classifier():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return convert_to_performer(tf.BertForSequenceClassification(cfg), SETTINGS)


def gpt2_lm():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    return convert_to_performer(tf.GPT2LMHeadModel(cfg), SETTINGS)


CASES = {  # build, PEFT task type, the stock model's default LoRA targets, a training row
    "bert": (bert_classifier, "SEQ_CLS", ("attention.self.query", "attention.self.value"),
             lambda ids, i: {"input_ids": ids, "labels": torch.tensor(i % 3)}),
    "gpt2": (gpt2_lm, "CAUSAL_LM", ("attn.c_attn",), lambda ids, i: {"input_ids": ids, "labels": ids}),
}


def outputs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("family", CASES)
def test_lora_with_default_targets_trains_merges_and_reloads(family, tmp_path):
    build, task, targets, row = CASES[family]
    model = build()
    assert model.config.model_type == f"performer_{family}"
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type=task, r=4, lora_alpha=8))  # no target_modules
    adapted = sorted(n for n, m in lora.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer))
    # PEFT's defaults for the stock type, on every layer's attention, and nothing else
    assert len(adapted) == 2 * len(targets) and all(n.endswith(targets) for n in adapted), adapted
    assert {n.split(".layer.")[-1].split(".h.")[-1][0] for n in adapted} == {"0", "1"}

    g = torch.Generator().manual_seed(0)
    data = [row(ids, i) for i, ids in enumerate(torch.randint(3, V, (8, 10), generator=g))]
    args = tf.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4,
                                learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                logging_strategy="no", disable_tqdm=True, seed=0)
    before = {n: p.detach().clone() for n, p in lora.named_parameters() if "lora_B" in n}
    tf.Trainer(model=lora, args=args, train_dataset=data).train()
    assert all(not torch.equal(p, before[n]) for n, p in lora.named_parameters() if "lora_B" in n)  # it trained

    lora.eval()
    ids = torch.randint(3, V, (2, 12), generator=g)
    adapted_out = outputs(lora, ids)
    merged = lora.merge_and_unload()
    assert type(merged).__name__.startswith("Performer") and not any(
        isinstance(m, peft.tuners.lora.LoraLayer) for m in merged.modules())
    torch.testing.assert_close(outputs(merged, ids), adapted_out, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path / "merged")
    auto = tf.AutoModelForSequenceClassification if family == "bert" else tf.AutoModelForCausalLM
    again = auto.from_pretrained(tmp_path / "merged")
    assert type(again) is type(merged)
    torch.testing.assert_close(outputs(again, ids), outputs(merged, ids), rtol=0, atol=0)
    # the adapters changed the model: the reload is the trained one, not the converted start
    assert not torch.allclose(outputs(again, ids), outputs(build().eval(), ids))


def test_lora_adapter_saved_alone_reloads_onto_a_converted_base(tmp_path):
    """The adapter-only route: save_pretrained of the PEFT model, PeftModel.from_pretrained onto the base."""
    model = gpt2_lm()
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    model.save_pretrained(base_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    lora.eval().save_pretrained(adapter_dir)
    ids = torch.randint(3, V, (2, 12))
    again = peft.PeftModel.from_pretrained(tf.AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
    torch.testing.assert_close(outputs(again, ids), outputs(lora, ids), rtol=0, atol=0)


def test_peft_wrapped_gpt2_generates_through_the_favor_cache():
    lora = peft.get_peft_model(gpt2_lm().eval(), peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False))
    ids = torch.randint(3, V, (2, 5), generator=torch.Generator().manual_seed(1))
    got = lora.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False,
                               pad_token_id=0)
    want = ids
    for _ in range(5):  # greedy by full forwards, no cache: the recurrent state is not involved
        with torch.no_grad():
            logits = lora(input_ids=want, use_cache=False).logits[:, -1]
        want = torch.cat([want, logits.argmax(-1, keepdim=True)], dim=1)
    assert got.tolist() == want.tolist()


def test_peft_defaults_are_copies_of_the_stock_entries():
    from peft.utils import constants

    lora = constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    assert lora["performer_bert"] == lora["bert"] and lora["performer_gpt2"] == lora["gpt2"]
    assert lora["performer_roberta"] == lora["roberta"]
    assert "performer_distilbert" not in lora  # PEFT has no LoRA default for stock DistilBERT either
    assert constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["performer_bert"] == (
        constants.TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING["bert"])
    # peft imported before hf_performer: registering again finds it in sys.modules and fills the entries in
    for key in ("performer_bert", "performer_gpt2"):
        del lora[key]
    register_peft_hook()
    assert lora["performer_bert"] == lora["bert"] and lora["performer_gpt2"] == lora["gpt2"]


def test_after_import_hook_runs_once_when_the_package_is_imported(tmp_path, monkeypatch):
    """hf_performer imported before peft: the hook registers right after peft's own import finishes."""
    (tmp_path / "hfp_fake_peft").mkdir()
    (tmp_path / "hfp_fake_peft" / "__init__.py").write_text("VALUE = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    hook = _AfterImport("hfp_fake_peft", lambda: seen.append(sys.modules["hfp_fake_peft"].VALUE))
    monkeypatch.setattr(sys, "meta_path", [hook, *sys.meta_path])
    import hfp_fake_peft  # noqa: F401

    assert seen == [1] and hook not in sys.meta_path
    sys.modules.pop("hfp_fake_peft", None)


def test_redrawing_a_peft_models_features_warns_that_an_adapter_alone_will_not_carry_them(monkeypatch):
    """Bug hunt: LoRA trained with the redraw schedule, saved with PeftModel.save_pretrained and reloaded onto the
    converted base, ran with the base's draw-0 features (logits off by 1e-2, silently): the redrawn features are
    buffers of the base, and PEFT saves the adapters only."""
    import hf_performer.integration.convert as conversion

    monkeypatch.setattr(conversion, "_PEFT_NOTICE", [False])
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32)
    base = convert_to_performer(tf.GPT2LMHeadModel(cfg), PerformerConfig(nb_features=16, seed=0, redraw_interval=2))
    lora = peft.get_peft_model(base, peft.LoraConfig(task_type="CAUSAL_LM", r=4))
    assert not hf_performer.maybe_redraw_features(lora, 1)  # nothing redrawn: no notice
    with pytest.warns(UserWarning, match="PeftModel.save_pretrained saves the adapters only") as caught:
        assert hf_performer.maybe_redraw_features(lora, 2)
        hf_performer.maybe_redraw_features(lora, 4)
    assert sum("adapters only" in str(w.message) for w in caught) == 1  # once per process
    assert [m.draws for m in conversion.favor_modules(lora)] == [2, 2]
    monkeypatch.setattr(conversion, "_PEFT_NOTICE", [False])
    plain = convert_to_performer(tf.GPT2LMHeadModel(cfg), PerformerConfig(nb_features=16, seed=0, redraw_interval=2))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model without PEFT: no notice
        hf_performer.maybe_redraw_features(plain, 2)


def test_prefix_tuning_is_refused_with_advice_a_peft_user_can_follow():
    torch.manual_seed(0)
    lm = peft.get_peft_model(gpt2_lm(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    with pytest.raises(TypeError, match="PEFT's prefix tuning .* use LoRA, IA3 or prompt tuning instead"):
        lm(input_ids=torch.randint(3, V, (2, 5)))


def test_an_adapter_names_the_saved_converted_model_as_its_base_never_the_stock_source(tmp_path):
    # the converted model kept the stock name_or_path, so an adapter named the stock checkpoint as its base and
    # AutoPeftModel silently reloaded it onto softmax attention
    torch.manual_seed(0)
    stock_dir, base_dir = tmp_path / "stock", tmp_path / "converted"
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        stock_dir)
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(2))
    lora_config = dict(task_type="CAUSAL_LM", r=4, init_lora_weights=False)

    never_saved = convert_to_performer(tf.AutoModelForCausalLM.from_pretrained(stock_dir), SETTINGS)
    assert never_saved.name_or_path == "" and never_saved.config.name_or_path == str(stock_dir)
    peft.get_peft_model(never_saved, peft.LoraConfig(**lora_config)).save_pretrained(tmp_path / "a1")
    assert peft.PeftConfig.from_pretrained(tmp_path / "a1").base_model_name_or_path is None  # not the stock folder

    model = convert_to_performer(tf.AutoModelForCausalLM.from_pretrained(stock_dir), SETTINGS)
    model.save_pretrained(base_dir)
    assert model.name_or_path == str(base_dir)
    lora = peft.get_peft_model(model, peft.LoraConfig(**lora_config)).eval()
    lora.save_pretrained(tmp_path / "a2")
    again = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "a2").eval()
    assert type(again.get_base_model()).__name__ == "PerformerGPT2LMHeadModel"
    torch.testing.assert_close(outputs(again, ids), outputs(lora, ids), rtol=0, atol=0)


def test_a_peft_model_converts_in_place_keeping_its_adapters(tmp_path):
    # it was refused listing the stock classes; converting its base model worked but left the adapters' configs
    # naming the stock source as their base
    torch.manual_seed(0)
    tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=32)).save_pretrained(
        tmp_path / "stock")
    lora_config = peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False)
    lora = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "stock"), lora_config)
    assert lora.peft_config["default"].base_model_name_or_path == str(tmp_path / "stock")
    assert convert_to_performer(lora, SETTINGS) is lora
    assert type(lora.get_base_model()).__name__ == "PerformerGPT2LMHeadModel"
    assert lora.peft_config["default"].base_model_name_or_path is None
    # the same as converting first and wrapping after, with the same adapter weights
    first = peft.get_peft_model(convert_to_performer(tf.AutoModelForCausalLM.from_pretrained(tmp_path / "stock"),
                                                     SETTINGS), lora_config)
    first.load_state_dict(lora.state_dict())
    ids = torch.randint(3, V, (2, 12), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(outputs(lora.eval(), ids), outputs(first.eval(), ids), rtol=0, atol=0)
