"""Calibration that generalises: mixed sequence lengths, token-budget batches, held-out early stopping that
restores the best state, and the time budget (a fake clock: no timing assertions)."""

from __future__ import annotations

import copy
import importlib
import json

import pytest
import torch
from test_conversion_calibrate import _Interrupt, pair, schedule
from test_conversion_fixtures import text_file, tiny_bert, tokenizer

from hf_performer.conversion.calibrate import DEFAULT_MAX_TIME_S, CalibrationConfig, calibrate, learning_rate
from hf_performer.conversion.cli import main
from hf_performer.conversion.corpus import pydoc_paragraphs
from hf_performer.conversion.data import BatchSchedule, mixed_length_sequences, special_tokens
from hf_performer.conversion.errors import ConversionError


class FakeClock:
    """Seconds that advance by ``tick`` at every reading."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_mixed_lengths_span_the_range_and_keep_the_text():
    tok = tokenizer()
    texts = pydoc_paragraphs("train")[:60]
    seqs = mixed_length_sequences(texts, tok, max_length=96, min_length=8, seed=3)
    lengths = [len(s) for s in seqs]
    assert max(lengths) <= 96 and min(lengths[:-1]) >= 8  # (the last one takes what text is left)
    assert max(lengths) >= 80 and min(lengths) <= 16 and len(set(lengths)) > 20
    before, after = special_tokens(tok)
    assert (before, after) == ([tok.cls_token_id], [tok.sep_token_id])
    assert all(s[:1] == before and s[-1:] == after for s in seqs)
    stream = [t for s in seqs for t in s[1:-1]]  # every token of the text, in order, once
    assert stream == [t for ids in tok(texts, add_special_tokens=False)["input_ids"] for t in ids]
    assert seqs == mixed_length_sequences(texts, tok, max_length=96, min_length=8, seed=3)
    assert seqs != mixed_length_sequences(texts, tok, max_length=96, min_length=8, seed=4)
    with pytest.raises(ConversionError, match="min_length=200"):
        mixed_length_sequences(texts, tok, max_length=96, min_length=200)
    with pytest.raises(ConversionError, match="no room for text"):
        mixed_length_sequences(texts, tok, max_length=2)


def test_token_budget_batches():
    seqs = [[1] * n for n in (4, 4, 4, 4, 4, 4, 30, 30, 30, 60)]
    s = BatchSchedule(seqs, batch_size=5, pad_token_id=0, max_tokens=64)
    # ascending lengths; a batch closes at 5 sequences or when (sequences x longest) would pass 64 tokens
    assert [[len(seqs[i]) for i in g] for g in s.groups] == [[4] * 5, [4, 30], [30, 30], [60]]
    assert all(len(g) * max(len(seqs[i]) for i in g) <= 64 for g in s.groups)
    assert sorted(i for g in s.groups for i in g) == list(range(len(seqs)))
    with pytest.raises(ConversionError, match="max_tokens=0"):
        BatchSchedule(seqs, 2, 0, max_tokens=0)


def test_default_budget_is_time_based():
    assert CalibrationConfig().steps is None and CalibrationConfig().time_limit_s == DEFAULT_MAX_TIME_S
    assert CalibrationConfig(steps=50).time_limit_s is None  # steps given: they decide
    assert CalibrationConfig(steps=50, max_time_s=9).time_limit_s == 9
    cfg = CalibrationConfig(warmup_steps=0)  # the learning rate decays over the time budget
    assert learning_rate(cfg, 5, 0.0) == pytest.approx(cfg.lr)
    assert learning_rate(cfg, 5, DEFAULT_MAX_TIME_S / 2) == pytest.approx(cfg.lr / 2)
    assert learning_rate(cfg, 5, DEFAULT_MAX_TIME_S) == pytest.approx(0.0)


@pytest.mark.parametrize("field, value, message", [
    ("min_length", 64, "must not exceed max_length=32"), ("eval_every", 0, "eval_every=0"),
    ("patience", -2, "patience=-2"), ("batch_tokens", 0, "batch_tokens=0"), ("steps", -1, "steps=-1"),
    ("max_time_s", 0, "max_time_s=0")])
def test_bad_settings_are_refused(field, value, message):
    with pytest.raises(ConversionError, match=message):
        CalibrationConfig(**{"max_length": 32, field: value})


def test_time_budget_stops_training():
    teacher, student = pair("bert")
    cfg = CalibrationConfig(max_time_s=100.0, batch_size=4, max_length=32, warmup_steps=0)  # no step limit
    log = calibrate(student, teacher, schedule(), cfg, progress=False, clock=FakeClock(7.0))
    # each step reads the clock a few times (7 s a reading): the budget ends it after a handful of steps
    assert 0 < log["steps_done"] < 100 / 7 and "time budget of 100 s" in log["stopped_early"]
    assert log["wall_s"] >= 100.0 and log["time_limit_s"] == 100.0
    lrs = [h["lr"] for h in log["history"]]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.3 * cfg.lr  # cosine over the time budget


def test_early_stopping_restores_the_best_state(monkeypatch):
    teacher, start = pair("bert")
    cfg = CalibrationConfig(steps=40, lr=1e-3, batch_size=4, max_length=32, warmup_steps=1, eval_every=2, patience=2)
    # the held-out loss improves until step 4, then gets worse: stop at step 8, keep step 4's state
    scripted = iter([1.0, 0.8, 0.5, 0.7, 0.9, 1.1])
    monkeypatch.setattr(importlib.import_module("hf_performer.conversion.calibrate"), "validation_loss", lambda *a, **k: next(scripted))
    student = copy.deepcopy(start)
    log = calibrate(student, teacher, schedule(), cfg, progress=False, validation=[schedule().batch(0)])
    assert [v["step"] for v in log["validation"]] == [0, 2, 4, 6, 8]
    assert log["steps_done"] == 8 and "no held-out improvement" in log["stopped_early"]
    assert log["best_step"] == 4 and log["validation_end"] == 0.5 and log["validation_last"] == 0.9
    assert not log["reverted"]
    reference = copy.deepcopy(start)  # the same run, interrupted after 4 steps
    sched = schedule()
    sched.__class__, sched.stop = _Interrupt, 4
    with pytest.raises(KeyboardInterrupt):
        calibrate(reference, teacher, sched, cfg, progress=False)
    changed = 0
    for (n, a), b, c in zip(student.named_parameters(), reference.parameters(), start.parameters()):
        torch.testing.assert_close(a, b, msg=n)
        changed += not torch.equal(a, c)
    assert changed > 0


def test_convert_trains_on_mixed_lengths_up_to_the_position_limit(tmp_path, capsys):
    src, out = tiny_bert(tmp_path / "src", positions=64), tmp_path / "out"
    txt = text_file(tmp_path / "t.txt")
    rc = main([str(a) for a in ("convert", src, out, "--nb-features", 8, "--calibrate", "--calibration-data", txt,
                                "--calibration-steps", 12, "--min-length", 8, "--batch-tokens", 256, "--eval-every",
                                4, "--no-progress")])
    assert rc == 0, capsys.readouterr().err
    log = json.loads((out / "calibration_log.json").read_text())
    lengths = [h["length"] for h in log["history"]]
    assert max(lengths) <= 64 and max(lengths) > 32 and min(lengths) < 32  # up to the source's 64 positions
    assert all(h["tokens"] <= 256 for h in log["history"])
    assert log["config"]["max_length"] == 64 and log["time_limit_s"] is None  # steps given: no time budget
    assert [v["step"] for v in log["validation"]][:4] == [0, 4, 8, 12] and "best_step" in log


def test_warnings_print_above_the_progress_bar_not_into_it(capsys, monkeypatch):
    """A warning raised while the calibration bar is open (any library's, in a training step) gets its own line:
    the bar is cleared while it prints; closing the bar restores warnings.showwarning."""
    import sys
    import warnings

    from hf_performer.conversion.calibrate import _Progress

    printed = lambda m, c, f, n, file=None, line=None: sys.stderr.write(warnings.formatwarning(m, c, f, n, line))  # noqa: E731
    monkeypatch.setattr(warnings, "showwarning", printed)  # printed as Python does outside pytest
    before = warnings.showwarning
    bar = _Progress(CalibrationConfig(steps=3), 0, 0.0, enabled=True)
    bar.update(1, 0.1, loss="0.5")
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("this argument is deprecated", FutureWarning, stacklevel=1)
    bar.update(2, 0.2, loss="0.4")
    bar.close()
    assert warnings.showwarning is before
    line = next(part for part in capsys.readouterr().err.split("\n") if "is deprecated" in part)
    assert "%|" not in line.split("\r")[-1]  # not appended to the bar's line ("calibration:  33%|###  | 1/3")
