"""Statistics step and attention-transfer calibration on tiny models (sharpened attention so FAVOR+ errs)."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers as tf
from test_conversion_fixtures import tokenizer

from hf_performer import PerformerConfig
from hf_performer.conversion.calibrate import (
    STATE_FILE,
    CalibrationConfig,
    calibrate,
    output_kind,
    transfer_loss,
)
from hf_performer.conversion.capture import attention_names
from hf_performer.conversion.corpus import pydoc_paragraphs
from hf_performer.conversion.data import BatchSchedule, pad_id, tokenize
from hf_performer.conversion.errors import ConversionError
from hf_performer.conversion.statistics import calibrate_model_statistics
from hf_performer.integration import convert_to_performer

SETTINGS = PerformerConfig(nb_features=8, seed=0)
V = 512  # token ids of real text folded into a small vocabulary: fast LM heads


def _sharpen(model, factor=4.0):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("query.weight", "key.weight")):
                p.mul_(factor)
            if name.endswith("c_attn.weight"):
                p[:, : 2 * model.config.n_embd].mul_(factor)
    return model


def pair(kind: str):
    torch.manual_seed(0)
    if kind == "bert":
        teacher = tf.BertModel(tf.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=64))
    else:
        teacher = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                                   bos_token_id=101, eos_token_id=102, pad_token_id=0))
    teacher = _sharpen(teacher.eval())
    student = convert_to_performer(copy.deepcopy(teacher), SETTINGS).eval()
    return teacher, student


def schedule(batch_size=4, n=24, split="train"):
    tok = tokenizer()
    seqs = [[t % V for t in s] for s in tokenize(pydoc_paragraphs(split)[:n], tok, 32)]
    return BatchSchedule(seqs, batch_size, pad_id(tok), seed=0)


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_statistics_step_sets_calibrated_buffers(kind):
    teacher, student = pair(kind)
    sched = schedule()
    batch = sched.batch(0)
    with torch.no_grad():
        before = student(**batch)[0]
    assert calibrate_model_statistics(student, [sched.batch(i) for i in range(2)]) == 2
    for f in student.favor_modules():
        assert bool(f.stats_calibrated)
        assert f.key_shift.abs().sum() > 0 and torch.isfinite(f.key_shift).all()
    if kind == "gpt2":  # causal attention uses the calibrated statistics
        with torch.no_grad():
            assert not torch.allclose(student(**batch)[0], before)


@pytest.mark.parametrize("kind, teacher_forced", [("bert", False), ("gpt2", False), ("bert", True)])
def test_calibration_lowers_transfer_loss(kind, teacher_forced):
    teacher, student = pair(kind)
    train, held_out = schedule(), schedule(8, 16, "eval").batch(0)
    calibrate_model_statistics(student, [train.batch(0)])
    cfg = CalibrationConfig(steps=12, lr=1e-3, batch_size=4, max_length=32, warmup_steps=2, train="attention",
                            teacher_forced=teacher_forced)
    names, kind_ = attention_names(student), output_kind(student)
    assert kind_ == ("hidden" if kind == "bert" else "logits")
    with torch.no_grad():
        before, _ = transfer_loss(student, teacher, held_out, names, kind_, cfg)
    log = calibrate(student, teacher, train, cfg, progress=False)
    with torch.no_grad():
        after, _ = transfer_loss(student, teacher, held_out, names, kind_, cfg)
    assert log["steps_done"] == 12 and len(log["history"]) == 12
    assert after < before
    assert all(p.requires_grad for p in student.parameters())  # restored for later training


class _Interrupt(BatchSchedule):
    """Raises KeyboardInterrupt when asked for batch ``stop``."""

    stop = 3

    def batch(self, index):
        if index == self.stop:
            raise KeyboardInterrupt
        return super().batch(index)


def test_resume_matches_uninterrupted(tmp_path):
    cfg = CalibrationConfig(steps=4, lr=1e-3, batch_size=2, max_length=32, warmup_steps=1, save_every=2)
    teacher, straight = pair("gpt2")
    fresh = copy.deepcopy(straight)
    calibrate(straight, teacher, schedule(), cfg, state_dir=tmp_path / "a", progress=False)

    sched = schedule()
    sched.__class__ = _Interrupt
    interrupted = copy.deepcopy(fresh)
    with pytest.raises(KeyboardInterrupt):
        calibrate(interrupted, teacher, sched, cfg, state_dir=tmp_path / "b", progress=False)
    assert (tmp_path / "b" / STATE_FILE).is_file()
    resumed = copy.deepcopy(fresh)  # a new process would rebuild the converted model from the source
    log = calibrate(resumed, teacher, schedule(), cfg, state_dir=tmp_path / "b", resume=True, progress=False)
    assert log["steps_done"] == 4 and [h["step"] for h in log["history"]] == [1, 2, 3, 4]
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, msg=n)

    other = CalibrationConfig(**{**cfg.__dict__, "lr": 2e-3})
    with pytest.raises(ConversionError, match="other settings"):
        calibrate(copy.deepcopy(fresh), teacher, schedule(), other, state_dir=tmp_path / "b", resume=True, progress=False)
    with pytest.raises(ConversionError, match="no calibration state"):
        calibrate(copy.deepcopy(fresh), teacher, schedule(), cfg, state_dir=tmp_path / "c", resume=True, progress=False)


def test_validation_reverts_a_harmful_calibration():
    teacher, student = pair("bert")
    val = schedule(4, 8, "eval").epoch()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = CalibrationConfig(steps=3, lr=0.5, batch_size=4, max_length=32, warmup_steps=0)  # absurd lr
    log = calibrate(student, teacher, schedule(), cfg, progress=False, validation=val)
    assert log["reverted"] and log["best_step"] == 0 and log["validation_last"] > log["validation_start"]
    assert log["validation_end"] == log["validation_start"]  # the returned (starting) state's held-out loss
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]), n
    good = CalibrationConfig(steps=12, lr=1e-3, batch_size=4, max_length=32, warmup_steps=2)
    log = calibrate(student, teacher, schedule(), good, progress=False, validation=val)
    assert not log["reverted"] and log["best_step"] > 0 and log["validation_end"] < log["validation_start"]


def test_validation_reverts_a_calibration_that_diverged_to_nan():
    teacher, student = pair("bert")
    val = schedule(4, 8, "eval").epoch()
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    cfg = CalibrationConfig(steps=2, lr=1e-3, batch_size=4, max_length=32, warmup_steps=0)
    weight = student.get_parameter("encoder.layer.0.attention.self.query.weight")
    handle = weight.register_hook(lambda g: g * float("nan"))  # a divergence: the first step makes it NaN
    log = calibrate(student, teacher, schedule(), cfg, progress=False, validation=val)
    handle.remove()
    assert log["validation_last"] != log["validation_last"]  # the trained state's loss is NaN
    assert log["reverted"] and log["validation_end"] == log["validation_end"]  # the state returned is not
    for n, p in student.named_parameters():
        assert torch.equal(p, before[n]), n


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_mixed_precision_runs_the_losses_under_autocast(kind):
    """bf16 calibration trains under autocast (its losses differ from float32's; the weights stay float32). The
    losses reach the student through base_model, past the forward accelerate wraps in autocast, so bf16 once ran
    bit for bit like float32 (found in a bug hunt)."""
    logs = {}
    for precision in ("no", "bf16"):
        teacher, student = pair(kind)
        cfg = CalibrationConfig(steps=2, lr=1e-3, batch_size=4, max_length=32, warmup_steps=0,
                                mixed_precision=precision)
        logs[precision] = calibrate(student, teacher, schedule(), cfg, validation=[schedule(4, 8, "eval").batch(0)],
                                    progress=False)
        assert all(p.dtype == torch.float32 for p in student.parameters())
    bf16, fp32 = logs["bf16"], logs["no"]
    assert bf16["steps_done"] == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in bf16["history"])
    assert [h["loss"] for h in bf16["history"]] != [h["loss"] for h in fp32["history"]]
    assert bf16["validation"][0]["loss"] != fp32["validation"][0]["loss"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast needs no refusal where a GPU is present")
def test_fp16_without_a_gpu_is_refused_before_anything_runs(tmp_path):
    """accelerate runs no fp16 autocast on a CPU: the flag would silently calibrate in float32."""
    teacher, student = pair("bert")
    cfg = CalibrationConfig(steps=1, batch_size=4, max_length=32, mixed_precision="fp16")
    with pytest.raises(ConversionError, match="fp16 needs a GPU"):
        calibrate(student, teacher, schedule(), cfg, progress=False)
    from hf_performer.conversion import convert

    with pytest.raises(ConversionError, match="fp16 needs a GPU"):
        convert("no/such-model", tmp_path / "out", calibration_data="python-docs", calibrate_model=True,
                calibration={"mixed_precision": "fp16", "steps": 1})
    assert not (tmp_path / "out").exists()


def test_gpt2_qk_training_leaves_values():
    teacher, student = pair("gpt2")
    cfg = CalibrationConfig(steps=2, lr=1e-2, batch_size=4, max_length=32, warmup_steps=0, train="qk")
    c_attn = [m.attn.c_attn.weight.detach().clone() for m in student.transformer.h]
    mlp = student.transformer.h[0].mlp.c_fc.weight.detach().clone()
    calibrate(student, teacher, schedule(), cfg, progress=False)
    C = student.config.n_embd
    for m, old in zip(student.transformer.h, c_attn):
        assert not torch.equal(m.attn.c_attn.weight[:, : 2 * C], old[:, : 2 * C])
        assert torch.equal(m.attn.c_attn.weight[:, 2 * C :], old[:, 2 * C :])
    assert torch.equal(student.transformer.h[0].mlp.c_fc.weight, mlp)
    # the gradient hook is gone afterwards
    student.transformer.h[0].attn.c_attn.weight.sum().backward()
    assert student.transformer.h[0].attn.c_attn.weight.grad[:, 2 * C :].abs().sum() > 0
