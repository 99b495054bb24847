"""Saving and loading Performer models: config.json, safetensors buffers, loud failure without the plugin,
dtype / device_map, missing buffers, feature redraws, Trainer resume, gradient checkpointing."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import hf_performer
import hf_performer.integration as I
from hf_performer.attention import FavorAttention
from hf_performer.settings import PerformerConfig

V = 64
BUFFERS = ("projection", "draw_count", "key_shift", "log_qk_scale", "oprf_rho", "stats_calibrated")


def bert_cls(**kw):
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, initializer_range=0.2, num_labels=3)
    return I.convert_to_performer(tf.BertForSequenceClassification(cfg), PerformerConfig(nb_features=16, **kw)).eval()


def gpt2_lm(**kw):
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32, initializer_range=0.2,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return I.convert_to_performer(tf.GPT2LMHeadModel(cfg), PerformerConfig(nb_features=16, **kw))


def realigned(model):
    """Fresh (aligned) memory for every tensor: mmapped safetensors weights can change the last bits of tiny GEMMs."""
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    return model


IDS = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(0))


def favors(model) -> list[FavorAttention]:
    return [m for m in model.modules() if isinstance(m, FavorAttention)]


def test_checkpoint_carries_settings_version_and_every_favor_buffer(tmp_path):
    model = bert_cls(seed=7, redraw_interval=5, local_window=2)
    with torch.no_grad():  # calibrated statistics must survive the round trip too
        q = torch.randn(2, 2, 9, 8)
        favors(model)[1].calibrate_statistics(q, q)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "performer_bert"
    assert config["performer"] == PerformerConfig(nb_features=16, seed=7, redraw_interval=5, local_window=2).to_dict()
    assert config["hf_performer_version"] == hf_performer.__version__
    assert config["architectures"] == ["PerformerBertForSequenceClassification"]
    tensors = load_file(tmp_path / "model.safetensors")
    for layer in range(2):
        for name in BUFFERS:
            key = f"bert.encoder.layer.{layer}.attention.self.favor.{name}"
            assert key in tensors, key
    again = tf.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert all(f.config.local_window == 2 for f in favors(again))
    assert bool(favors(again)[1].stats_calibrated) and not bool(favors(again)[0].stats_calibrated)
    with torch.no_grad():
        assert torch.equal(realigned(again)(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_loading_without_the_plugin_fails_loudly(family, tmp_path):
    """A fresh interpreter that never imports hf_performer: the Auto class asks for trust_remote_code=True (the
    checkpoint carries its modeling code, tests/test_portable_checkpoints.py) and the stock class refuses the
    unknown "favor_attention" layer type: nothing loads the checkpoint as softmax attention."""
    (bert_cls() if family == "bert" else gpt2_lm()).save_pretrained(tmp_path)
    stock = "BertForSequenceClassification" if family == "bert" else "GPT2LMHeadModel"
    code = (
        "import sys, transformers\n"
        "for name in ('AutoModel', sys.argv[2]):\n"
        "    try:\n"
        "        getattr(transformers, name).from_pretrained(sys.argv[1])\n"
        "    except Exception as e:\n"
        "        print(name, 'REFUSED', type(e).__name__, ' '.join(str(e).split())[:600])\n"
        "assert 'hf_performer' not in sys.modules\n"
    )
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path), stock], capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr
    refusals = dict(re.findall(r"(\w+) REFUSED (.*)", run.stdout))  # after transformers' [y/N] prompt text
    assert "trust_remote_code=True" in refusals["AutoModel"], run.stdout
    assert "layer_type" in refusals[stock], run.stdout


def test_bfloat16_keeps_favor_buffers_in_float32(tmp_path):
    model = gpt2_lm().eval()
    model.save_pretrained(tmp_path)
    half = tf.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.transformer.h[0].attn.c_attn.weight.dtype == torch.bfloat16
    for a, b in zip(favors(half), favors(model)):
        assert a.projection.dtype == torch.float32 and torch.equal(a.projection, b.projection)
    with torch.no_grad():
        logits = half(input_ids=IDS).logits
        generated = half.generate(input_ids=IDS, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all() and generated.shape == (2, 12)
    torch.testing.assert_close(logits.float(), model(input_ids=IDS).logits, rtol=0.1, atol=0.1)


def test_device_map_cpu(tmp_path):
    model = gpt2_lm().eval()
    model.save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path, device_map="cpu")
    with torch.no_grad():
        assert torch.equal(realigned(again)(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_missing_projection_is_rederived_from_seed_layer_and_draw_count(tmp_path):
    model = gpt2_lm(seed=4).eval()
    I.redraw_features(model)  # draw 1: the re-derivation must use the loaded draw count
    model.save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(path)
    del tensors["transformer.h.1.attn.favor.projection"]
    save_file(tensors, path, metadata={"format": "pt"})
    again, info = tf.AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == {"transformer.h.1.attn.favor.projection"}
    for a, b in zip(favors(again), favors(model)):
        assert torch.equal(a.projection, b.projection)
    with torch.no_grad():
        assert torch.equal(realigned(again)(input_ids=IDS).logits, model(input_ids=IDS).logits)


def test_redraw_is_deterministic_per_layer_and_round_trips(tmp_path):
    a, b = gpt2_lm(seed=2), gpt2_lm(seed=2)  # e.g. two data-parallel ranks
    before = [f.projection.clone() for f in favors(a)]
    assert I.redraw_features(a) == 2 and I.redraw_features(b) == 2
    after = [f.projection for f in favors(a)]
    assert all(not torch.equal(x, y) for x, y in zip(before, after))
    assert not torch.equal(after[0], after[1])  # layers draw different features
    assert all(torch.equal(x.projection, y.projection) and int(x.draw_count) == 1 for x, y in zip(favors(a), favors(b)))
    a.eval().save_pretrained(tmp_path)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert [int(f.draw_count) for f in favors(again)] == [1, 1]
    with torch.no_grad():
        assert torch.equal(realigned(again)(input_ids=IDS).logits, a(input_ids=IDS).logits)


def test_redraw_schedule_counts_optimizer_steps_and_is_idempotent():
    model = gpt2_lm(redraw_interval=3)
    draws = lambda: [int(f.draw_count) for f in favors(model)]  # noqa: E731
    assert not I.maybe_redraw_features(model, 2) and draws() == [0, 0]
    assert I.maybe_redraw_features(model, 3) and draws() == [1, 1]
    assert not I.maybe_redraw_features(model, 3) and draws() == [1, 1]  # same step again (accumulation, resume)
    assert I.maybe_redraw_features(model, 7) and draws() == [2, 2]
    reference = gpt2_lm(redraw_interval=3)
    for _ in range(2):
        I.redraw_features(reference)
    assert all(torch.equal(x.projection, y.projection) for x, y in zip(favors(model), favors(reference)))
    never = gpt2_lm()  # redraw_interval=0: following its schedule would never redraw: refused, nothing changed
    with pytest.raises(ValueError, match="redraw_interval=0"):
        I.maybe_redraw_features(never, 100)
    assert [int(f.draw_count) for f in favors(never)] == [0, 0]
    with pytest.raises(ValueError, match="no FavorAttention"):
        I.redraw_features(torch.nn.Linear(2, 2))


class RedrawEveryStep(tf.TrainerCallback):
    """The redraw schedule hooked the way issue 5's callback does: after each optimizer step."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        I.maybe_redraw_features(model, state.global_step)


def test_plain_trainer_resumes_a_bert_checkpoint_with_the_same_features(tmp_path):
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, V, (8, 9), generator=g)
    data = [{"input_ids": row, "labels": torch.tensor(i % 3)} for i, row in enumerate(rows)]

    def train(resume=None):
        model = bert_cls(redraw_interval=2)
        args = tf.TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                                    use_cpu=True, report_to=[], logging_strategy="no", seed=0, disable_tqdm=True)
        trainer = tf.Trainer(model=model, args=args, train_dataset=data, callbacks=[RedrawEveryStep()])
        trainer.train(resume_from_checkpoint=resume)
        return model

    first = train()
    assert [int(f.draw_count) for f in favors(first)] == [2, 2]  # redrawn after optimizer steps 2 and 4
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")  # the checkpoint holds the features
    assert int(saved["bert.encoder.layer.0.attention.self.favor.draw_count"]) == 1
    assert torch.equal(saved["bert.encoder.layer.0.attention.self.favor.projection"], favors(first)[0]._draw(1).float())
    resumed = train(resume=str(tmp_path / "checkpoint-2"))  # a plain Trainer reads the Performer config.json
    for a, b in zip(favors(resumed), favors(first)):
        assert int(a.draw_count) == int(b.draw_count) and torch.equal(a.projection, b.projection)
    for (name, a), b in zip(resumed.named_parameters(), first.parameters()):  # steps 3-4 replayed identically
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("build", [bert_cls, gpt2_lm], ids=["bert", "gpt2"])
def test_gradient_checkpointing_gives_the_same_gradients(build):
    grads = []
    for checkpointing in (False, True):
        model = build()
        for m in model.modules():  # compare like with like: no dropout randomness
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers 5 (gradient_checkpointing_enable: deprecated)
            assert model.is_activation_checkpointing
        labels = IDS if "GPT2" in type(model).__name__ else torch.tensor([0, 2])
        model(input_ids=IDS, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-5, atol=1e-6)


def test_performer_overrides_update_the_saved_settings_and_are_checked(tmp_path):
    """``performer={...}`` passed to from_pretrained / AutoConfig (transformers sets it after the config's own checks)
    or assigned to a config: the fields given replace theirs, the others keep the saved values, and a bad value is
    refused at once. Overrides were stored as given: a partial dict silently reset local_window to 0, and a bad one
    was saved and failed only at the next load (found in a bug hunt)."""
    gpt2_lm(local_window=2).save_pretrained(tmp_path)
    config = tf.AutoConfig.from_pretrained(tmp_path, performer={"chunk_size": 2})
    assert config.performer["chunk_size"] == 2 and config.performer["local_window"] == 2
    assert config.performer == PerformerConfig.from_dict(config.performer).to_dict()  # complete
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path, performer={"chunk_size": 2})
    assert {(f.config.chunk_size, f.config.local_window) for f in favors(model)} == {(2, 2)}
    for bad, field in (({"chunk_size": -5}, "chunk_size"), ({"kernel": "nope"}, "kernel")):
        with pytest.raises(ValueError, match=f"PerformerConfig.{field}="):
            tf.AutoConfig.from_pretrained(tmp_path, performer=bad)
        with pytest.raises(ValueError, match=f"PerformerConfig.{field}="):
            config.performer = bad
    assert config.performer["chunk_size"] == 2  # a refused assignment leaves the settings as they were


def test_saving_after_config_performer_changed_on_a_built_model_is_refused(tmp_path):
    """``model.config.performer = {...}`` on a built model changes no layer, and the saved folder then described
    other layers than it held (other buffer shapes, or other settings than trained): refused before writing."""
    import transformers as tf

    from hf_performer import PerformerConfig, convert_to_performer

    cfg = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=1, n_head=2, n_positions=32, add_cross_attention=True)
    model = convert_to_performer(tf.GPT2LMHeadModel(cfg), PerformerConfig(nb_features=16, seed=0))
    model.config.performer = {"nb_features": 32}
    with pytest.raises(ValueError, match=r"config.performer says nb_features=32, but the FAVOR\+ layers were built "
                                         r"with nb_features=16"):
        model.save_pretrained(tmp_path / "m")
    assert not (tmp_path / "m").exists()
    model.config.performer = {"nb_features": 16}  # back as built: saves (the cross-attention layers' own settings
    model.save_pretrained(tmp_path / "m")  # differ from the model's by design and are not a mismatch)
    assert (tmp_path / "m" / "config.json").is_file()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_load_keeps_the_integer_and_boolean_buffers(tmp_path, dtype):
    """Bug hunt: from_pretrained(..., dtype=bfloat16/float16) loaded draw_count (int64) and stats_calibrated (bool)
    as float32, and a save wrote them back so: transformers' keep-in-float32 list named the whole favor module."""
    import transformers as tf
    from safetensors import safe_open

    from hf_performer import PerformerConfig, convert_to_performer

    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2)
    convert_to_performer(tf.LlamaForCausalLM(cfg), PerformerConfig(nb_features=16)).save_pretrained(tmp_path / "a")
    model = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=dtype)
    favor = model.model.layers[0].self_attn.favor
    kinds = {name: b.dtype for name, b in favor.named_buffers()}
    assert kinds.pop("draw_count") == torch.int64 and kinds.pop("stats_calibrated") == torch.bool
    assert set(kinds.values()) == {torch.float32}  # the float buffers stay float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == dtype
    model.save_pretrained(tmp_path / "b")
    with safe_open(str(tmp_path / "b" / "model.safetensors"), "pt") as f:
        saved = {k: f.get_slice(k).get_dtype() for k in f.keys() if ".favor." in k}
    assert saved["model.layers.0.self_attn.favor.draw_count"] == "I64"
    assert saved["model.layers.0.self_attn.favor.stats_calibrated"] == "BOOL"


@pytest.mark.parametrize("load", ["from_pretrained", "load_state_dict"])
def test_a_model_compiled_right_after_loading_runs_its_loaded_calibration(load, tmp_path):
    # the calibration flag is Python state under torch.compile (no host sync): loading must refresh it, or a model
    # compiled before any eager forward ran as uncalibrated layers
    model = bert_cls()
    hf_performer.calibrate_feature_statistics(model, {"input_ids": IDS})
    with torch.no_grad():
        want = model(input_ids=IDS).logits
        assert not torch.allclose(bert_cls()(input_ids=IDS).logits, want, atol=1e-4)  # calibration matters here
    if load == "from_pretrained":
        model.save_pretrained(tmp_path)
        again = realigned(tf.AutoModelForSequenceClassification.from_pretrained(tmp_path))
    else:
        again = bert_cls()
        again.load_state_dict(model.state_dict())
    compiled = torch.compile(again, backend="eager")  # no eager forward first
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_an_accelerate_dispatched_load_compiled_at_once_runs_its_calibration(tmp_path):
    """Bug hunt: accelerate's loader swaps the buffer tensors in (no load_state_dict), so the Python flags kept their
    construction values and the compiled model ran uncalibrated; its dispatch's .to() now reads swapped buffers."""
    from accelerate import init_empty_weights, load_checkpoint_and_dispatch

    model = bert_cls()
    hf_performer.calibrate_feature_statistics(model, {"input_ids": IDS})
    with torch.no_grad():
        want = model(input_ids=IDS).logits
    model.save_pretrained(tmp_path)
    with init_empty_weights():
        empty = tf.AutoModelForSequenceClassification.from_config(tf.AutoConfig.from_pretrained(tmp_path))
    loaded = load_checkpoint_and_dispatch(empty, str(tmp_path), device_map={"": "cpu"}).eval()
    assert all(bool(f.stats_calibrated) for f in favors(loaded))
    compiled = torch.compile(loaded, backend="eager")  # no eager forward first
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, want, rtol=1e-5, atol=1e-5)


def test_a_failed_statistics_step_leaves_a_compiled_model_uncalibrated():
    """Bug hunt: the step restored the buffers after an error but not the layers' Python flags, so a model compiled
    next ran every layer as calibrated with zeroed statistics."""
    model, reference = bert_cls(), bert_cls()
    with pytest.raises((ValueError, RuntimeError)):  # labels of the wrong batch size: the loss fails last
        hf_performer.calibrate_feature_statistics(model, {"input_ids": IDS, "labels": torch.tensor([0, 1, 2])})
    with torch.no_grad():  # (compiled first: an eager read of the flag would refresh it by itself)
        torch.testing.assert_close(torch.compile(model, backend="eager")(input_ids=IDS).logits,
                                   reference(input_ids=IDS).logits, rtol=0, atol=0)
    assert not any(f.calibrated for f in favors(model))


def test_the_statistics_step_takes_a_compiled_model_after_a_compiled_call():
    """Bug hunt: the cached graph skipped the step's hooks: "reached 0 of the 2 FAVOR+ layers"."""
    model = bert_cls()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        compiled(input_ids=IDS)
    assert hf_performer.calibrate_feature_statistics(compiled, {"input_ids": IDS}) == 2
    with torch.no_grad():
        torch.testing.assert_close(compiled(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    assert all(f.calibrated for f in favors(model))
