"""A model converted without the statistics step says so once, at its first forward, with how to run the step
(issue 12 item 4); calibrated models (also reloaded ones) and the statistics step itself stay silent."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers as tf
from test_integration_convert import SETTINGS, bert_cfg, gpt2_cfg, inputs_for

from hf_performer import calibrate_feature_statistics
from hf_performer.integration import convert_to_performer

pytestmark = pytest.mark.usefixtures("one_thread")

NOTICE = "no fitted statistics"
MODELS = [  # the decoders' default forward (use_cache=True) takes the cached FAVOR+ step path
    (tf.BertModel, bert_cfg),
    (tf.BertLMHeadModel, lambda: bert_cfg(is_decoder=True)),
    (tf.GPT2LMHeadModel, gpt2_cfg),
    (tf.GPT2ForSequenceClassification, gpt2_cfg),
]
IDS = [m[0].__name__ for m in MODELS]


def converted(stock_cls, make_cfg):
    torch.manual_seed(0)
    return convert_to_performer(stock_cls(make_cfg()).eval(), SETTINGS)


def notices(fn) -> list[str]:
    """Run fn under the default warning filter (one per location, which must not hide other models) -> notices."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        with torch.no_grad():
            fn()
    return [str(w.message) for w in caught if NOTICE in str(w.message)]


@pytest.mark.parametrize("stock_cls,make_cfg", MODELS, ids=IDS)
def test_uncalibrated_model_says_once_how_to_calibrate(stock_cls, make_cfg):
    model = converted(stock_cls, make_cfg)
    batch = inputs_for(model)
    with pytest.warns(UserWarning, match=NOTICE) as record:
        with torch.no_grad():
            model(**batch)
    (warning,) = [w for w in record if NOTICE in str(w.message)]
    message = str(warning.message)
    assert warning.filename == __file__  # it points at the caller's line, not at library internals
    assert "2 of the 2 FAVOR+ layers" in message
    assert 'calibrate_feature_statistics(model, tokenizer(texts, padding=True, return_tensors="pt"))' in message
    assert "hf-performer convert SOURCE OUT" in message and "--calibration-data texts.txt" in message
    assert "0.89" in message
    assert notices(lambda: model(**batch)) == []  # once per model
    assert len(notices(lambda: converted(stock_cls, make_cfg)(**batch))) == 1  # every model says it once


@pytest.mark.parametrize("stock_cls,make_cfg", MODELS, ids=IDS)
def test_calibrated_and_reloaded_models_stay_silent(stock_cls, make_cfg, tmp_path):
    model = converted(stock_cls, make_cfg)
    batch = inputs_for(model)
    assert notices(lambda: calibrate_feature_statistics(model, batch)) == []  # not during the step itself
    assert notices(lambda: model(**batch)) == []
    model.save_pretrained(tmp_path / "calibrated")
    assert notices(lambda: type(model).from_pretrained(tmp_path / "calibrated")(**batch)) == []
    plain = converted(stock_cls, make_cfg)
    plain.save_pretrained(tmp_path / "plain")
    assert len(notices(lambda: type(plain).from_pretrained(tmp_path / "plain")(**batch))) == 1


def test_generation_of_an_uncalibrated_gpt2_says_it_once():
    model = converted(tf.GPT2LMHeadModel, gpt2_cfg)
    ids = torch.randint(3, 60, (1, 4))
    assert len(notices(lambda: model.generate(ids, max_new_tokens=3, do_sample=False))) == 1


def test_notice_from_a_command_line_script():
    """`python -c` (a __main__ without a source file) gets the notice on stderr and its forward runs."""
    code = ("import torch, transformers as tf; from hf_performer import convert_to_performer as c\n"
            "m = c(tf.BertModel(tf.BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,"
            " intermediate_size=8)), dict(nb_features=4)).eval()\n"
            "print(m(input_ids=torch.tensor([[3, 4, 5]])).last_hidden_state.shape)")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "torch.Size([1, 3, 8])" in run.stdout and run.stderr.count(NOTICE) == 1


def test_notices_print_above_an_open_progress_bar(capsys, monkeypatch):
    """A forward inside a progress bar (the Trainer's first training step) prints its notices, the zero-shot one
    and the ignored dropout's, on their own lines: the bar is cleared first and redrawn after."""
    from tqdm.auto import tqdm

    from hf_performer.integration import attention_function

    monkeypatch.setattr(attention_function, "_DROPOUT_WARNED", False)  # once per process: make it due again
    printed = lambda m, c, f, n, file=None, line=None: sys.stderr.write(warnings.formatwarning(m, c, f, n, line))  # noqa: E731
    monkeypatch.setattr(warnings, "showwarning", printed)  # printed as Python does outside pytest
    model = converted(tf.BertModel, bert_cfg).train()  # attention dropout 0.1: ignored, so the notice is due
    bar = tqdm(total=2, desc="training")
    bar.update(1)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        model(**inputs_for(model))
    bar.update(1)
    bar.close()
    lines = [part for part in capsys.readouterr().err.split("\n") if "UserWarning" in part]
    assert len(lines) == 2  # both notices
    assert all("%|" not in part.split("\r")[-1] for part in lines)  # neither written after the bar's text


def test_settings_that_read_no_statistic_get_no_notice_and_their_statistics_step_says_so():
    """With center_keys, balance_qk and aligned_features off and the softmax kernel, the statistics step changes
    nothing: the notice must not ask for it, and the step itself warns that it did nothing (bug hunt)."""
    torch.manual_seed(0)
    plain = {**SETTINGS.to_dict(), "kernel": "softmax", "center_keys": False, "balance_qk": False,
             "aligned_features": False}
    model = convert_to_performer(tf.BertModel(bert_cfg()).eval(), plain)
    assert notices(lambda: model(**inputs_for(model))) == []
    with torch.no_grad():
        before = model(**inputs_for(model)).last_hidden_state
    with pytest.warns(UserWarning, match="changes nothing for this model"):
        calibrate_feature_statistics(model, inputs_for(model))
    with torch.no_grad():
        assert torch.equal(model(**inputs_for(model)).last_hidden_state, before)  # it indeed changed nothing
    one_on = convert_to_performer(tf.BertModel(bert_cfg()).eval(), {**plain, "balance_qk": True})
    assert len(notices(lambda: one_on(**inputs_for(one_on)))) == 1
