"""hf-performer report: JSON, markdown and PNG with sane values, for an encoder and a causal LM."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from test_conversion_fixtures import text_file, tiny_bert, tiny_gpt2

from hf_performer.conversion.cli import main
from hf_performer.conversion.report import default_lengths, report


def _convert(src, out, txt):
    assert main(["convert", str(src), str(out), "--nb-features", "16", "--calibration-data", str(txt),
                 "--statistics-batches", "1", "--no-progress"]) == 0


def test_report_encoder_via_cli(tmp_path, capsys, monkeypatch):
    src, out = tiny_bert(tmp_path / "src"), tmp_path / "out"
    _convert(src, out, text_file(tmp_path / "train.txt"))
    held_out = text_file(tmp_path / "eval.txt", n=12, split="eval")
    import matplotlib.axes

    titles = []
    set_title = matplotlib.axes.Axes.set_title
    monkeypatch.setattr(matplotlib.axes.Axes, "set_title",
                        lambda ax, text, *a, **k: (titles.append(text), set_title(ax, text, *a, **k))[1])
    rc = main(["report", str(src), str(out), "--data", str(held_out), "--max-length", "32", "--lengths", "16", "64",
               "--repeats", "1", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    folder = out / "fidelity_report"
    r = json.loads((folder / "report.json").read_text())
    assert r["output_kind"] == "hidden" and r["texts"] == 12
    e = r["layer_errors"]
    assert len(e["names"]) == 2 == len(e["teacher_forced"]) == len(e["in_model"])
    assert all(0 <= x < 10 and math.isfinite(x) for x in e["teacher_forced"] + e["in_model"])
    assert e["teacher_forced"][0] == e["in_model"][0]  # the first layer sees the same inputs either way
    end = r["end_to_end"]
    assert -1 <= end["embedding_cosine_mean"] <= 1 and -1 <= end["pairwise_spearman"] <= 1
    assert end["embedding_cosine_min"] <= end["embedding_cosine_mean"]
    rows = {row["length"]: row for row in r["timing"]}
    assert rows[16]["original"]["time_ms"] > 0 and rows[16]["converted"]["time_ms"] > 0
    assert rows[64]["original"]["time_ms"] > 0  # the tiny source has 64 positions
    md = (folder / "report.md").read_text()
    assert "embedding_cosine_mean" in md and "layer_errors.png" in md
    png = (folder / "layer_errors.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000
    [title] = titles  # the plot names the model and its settings
    assert "PerformerBertForMaskedLM" in title and "out vs src" in title and "m=16" in title
    assert "aligned-softmax" in title and "not calibrated" in title
    # how to read it: what is good, and what to try that this conversion does not use yet
    assert "## How to read this and what to do" in md
    assert "--local-window 4" in md and "--calibrate" in md and "--nb-features 1024" in md
    assert "--max-position-embeddings" in md


def test_report_causal_lm(tmp_path):
    src, out = tiny_gpt2(tmp_path / "src"), tmp_path / "out"
    _convert(src, out, text_file(tmp_path / "train.txt"))
    r = report(src, out, text_file(tmp_path / "eval.txt", n=8, split="eval"), tmp_path / "rep", max_length=32,
               lengths=(), progress=False)
    end = r["end_to_end"]
    assert r["output_kind"] == "logits" and r["timing"] == []
    assert end["perplexity_teacher"] > 1 and end["perplexity_student"] > 1 and end["kl_to_teacher"] >= 0
    assert math.isclose(end["perplexity_ratio"], end["perplexity_student"] / end["perplexity_teacher"], rel_tol=1e-6)
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.json", "report.md", "layer_errors.png"}


def test_report_without_matplotlib_skips_the_plot_with_a_note(tmp_path, capsys, monkeypatch):
    src, out = tiny_bert(tmp_path / "src"), tmp_path / "out"
    _convert(src, out, text_file(tmp_path / "train.txt"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    capsys.readouterr()
    rc = main(["report", str(src), str(out), "--data", str(text_file(tmp_path / "eval.txt", n=6, split="eval")),
               "--out", str(tmp_path / "rep"), "--max-length", "32", "--repeats", "1", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    warnings = [line for line in captured.err.splitlines() if "matplotlib" in line]
    assert warnings == ["hf-performer: warning: matplotlib is not installed: layer_errors.png skipped "
                        "(pip install matplotlib to get it)."]
    assert {p.name for p in (tmp_path / "rep").iterdir()} == {"report.json", "report.md"}  # no temporary files
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "layer_errors.png)" not in md and "matplotlib is not installed" in md
    r = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert r["plot"] is None
    # default lengths come from the position limit: the tiny models take 64 tokens, so both are timed at 64
    assert [row["length"] for row in r["timing"]] == [64]
    assert r["timing"][0]["original"]["time_ms"] > 0 and r["timing"][0]["converted"]["time_ms"] > 0


def test_report_lengths_empty_string_means_none(tmp_path, capsys):
    src, out = tiny_gpt2(tmp_path / "src"), tmp_path / "out"
    _convert(src, out, text_file(tmp_path / "train.txt"))
    rc = main(["report", str(src), str(out), "--data", str(text_file(tmp_path / "eval.txt", n=6, split="eval")),
               "--max-length", "32", "--lengths", "", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    r = json.loads((out / "fidelity_report" / "report.json").read_text())
    assert r["timing"] == [] and "Forward time" not in (out / "fidelity_report" / "report.md").read_text()
    with pytest.raises(SystemExit):
        main(["report", str(src), str(out), "--data", "x.txt", "--lengths", "0"])


def test_bad_report_arguments_are_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """One line naming the flag, before the fidelity computation (found in a bug hunt: --repeats 0 and an --out that
    is a file raised tracebacks at the very end; a source of another family named --model-class, which report has
    not; --max-length named the Python field)."""
    rep = sys.modules["hf_performer.conversion.report"]  # (the package's ``report`` is the function)
    src, out = tiny_bert(tmp_path / "src"), tmp_path / "out"
    _convert(src, out, text_file(tmp_path / "train.txt"))
    other = tiny_gpt2(tmp_path / "gpt2")
    (tmp_path / "afile").write_text("x")
    data = str(text_file(tmp_path / "eval.txt", n=6, split="eval"))
    monkeypatch.setattr(rep, "layer_errors", lambda *a, **k: pytest.fail("computed before refusing"))
    cases = [
        ([src, out, "--repeats", "0"], "--repeats 0: expected a positive integer"),
        ([src, out, "--out", tmp_path / "afile"], "exists and is not a folder"),
        ([src, out, "--max-length", "2"], "--max-length 2: need at least 4 tokens"),
        ([src, out, "--batch-size", "0"], "--batch-size 0: need at least 1 sequence"),
        ([other, out], "was made from a BertForMaskedLM, but source"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["report", *map(str, args), "--data", data, "--lengths", "", "--no-progress"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("hf-performer: error:") and message in err and err.count("\n") == 1, err
        assert "--model-class" not in err and "max_length" not in err
    assert not (out / "fidelity_report").exists()


def test_default_lengths_stop_at_the_position_limit():
    assert default_lengths(512) == (128, 512)
    assert default_lengths(4096) == (128, 512, 2048, 4096)
    assert default_lengths(1024) == (128, 512, 1024)
    assert default_lengths(64) == (64,)


def test_a_reverted_calibration_is_named_as_such_and_still_suggested():
    """A calibration undone by its held-out check (the starting weights kept) was reported as "calibrated N steps",
    and the advice then left out --calibrate (bug hunt)."""
    from hf_performer.conversion.cli import _calibration_words
    from hf_performer.conversion.report import guidance, settings_line

    r = {"performer": {"nb_features": 16, "local_window": 0}, "estimator": {"effective": "aligned-softmax"},
         "statistics_calibrated": True, "output_kind": "hidden", "end_to_end": {}, "layer_errors": {}}
    done = settings_line({**r, "calibration_steps": 40, "calibration_reverted": False})
    undone = settings_line({**r, "calibration_steps": 40, "calibration_reverted": True})
    assert "calibrated 40 steps" in done and "calibration reverted" in undone and "calibrated 40" not in undone
    advice = lambda reverted: "\n".join(guidance({**r, "calibration_steps": 40, "calibration_reverted": reverted}))
    assert "`--calibrate`" not in advice(False) and "`--calibrate`" in advice(True)
    assert _calibration_words({"steps_done": 40}) == ", calibrated 40 steps"
    assert "reverted to the starting weights after 40 steps" in _calibration_words({"steps_done": 40, "reverted": True})


def test_a_source_it_was_not_converted_from_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    """Bug hunt: a source of other sizes raised a raw shape error deep in the layer comparison, and one of the same
    sizes with other weights gave numbers (cosine 0.21 against 0.98) without a word."""
    import transformers as tf

    rep = sys.modules["hf_performer.conversion.report"]
    src, out = tiny_bert(tmp_path / "src"), tmp_path / "out"
    _convert(src, out, text_file(tmp_path / "train.txt"))
    wider = tmp_path / "wider"
    cfg = tf.BertConfig.from_pretrained(src, hidden_size=48, intermediate_size=96)
    tf.BertForMaskedLM(cfg).save_pretrained(wider)
    other = tmp_path / "other"  # the same sizes, other weights
    torch.manual_seed(1)
    tf.BertForMaskedLM(tf.BertConfig.from_pretrained(src)).save_pretrained(other)
    data = str(text_file(tmp_path / "eval.txt", n=6, split="eval"))
    monkeypatch.setattr(rep, "layer_errors", lambda *a, **k: pytest.fail("computed before refusing"))
    for source, message in ((wider, "its hidden_size is 32, the source's 48"), (other, "token embeddings differ")):
        capsys.readouterr()
        assert main(["report", str(source), str(out), "--data", data, "--lengths", "", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hf-performer: error:") and "was not converted from" in err and message in err, err
    assert not (out / "fidelity_report").exists()


def test_timing_flags_that_would_do_nothing_are_refused(tmp_path, capsys):
    """Bug hunt: --repeats with no lengths to time, and a length past both models' position limits (a row of n/a),
    ran without a word."""
    src, out = tiny_gpt2(tmp_path / "src"), tmp_path / "out"
    _convert(src, out, text_file(tmp_path / "train.txt"))
    data = str(text_file(tmp_path / "eval.txt", n=6, split="eval"))
    for flags, message in ((["--lengths", "", "--repeats", "5"], "--repeats 5: there are no lengths to time"),
                           (["--lengths", "32", "100000"], "--lengths 100000: past both models' position limits "
                                                           "(64 and 64 tokens)")):
        capsys.readouterr()
        assert main(["report", str(src), str(out), "--data", data, *flags, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("hf-performer: error:") and message in err, err
    assert not (out / "fidelity_report").exists()
    r = report(src, out, data, tmp_path / "rep", max_length=16, lengths=(16,), repeats=2, progress=False)
    assert r["repeats"] == 2 and [row["length"] for row in r["timing"]] == [16]


def test_a_rerun_without_matplotlib_removes_the_earlier_plot_and_calibration_text_is_named(tmp_path, monkeypatch,
                                                                                          caplog):
    """Bug hunt: a rerun into the same folder without matplotlib kept the earlier run's PNG beside a report saying
    "no plot"; and a report on the calibration text itself read like a held-out one."""
    src, out = tiny_bert(tmp_path / "src"), tmp_path / "out"
    train = text_file(tmp_path / "train.txt")
    _convert(src, out, train)
    held_out = text_file(tmp_path / "eval.txt", n=6, split="eval")
    r = report(src, out, held_out, tmp_path / "rep", max_length=16, lengths=(), progress=False)
    assert r["plot"] and (tmp_path / "rep" / "layer_errors.png").is_file() and not r["on_calibration_text"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level("WARNING"):
        r = report(src, out, train, tmp_path / "rep", max_length=16, lengths=(), progress=False)
    assert r["plot"] is None and not (tmp_path / "rep" / "layer_errors.png").exists()
    assert r["on_calibration_text"] and "the numbers are not held-out" in caplog.text
    assert "**Not held-out:**" in (tmp_path / "rep" / "report.md").read_text()


def test_the_verdict_reads_both_numbers():
    """Bug hunt: a perplexity ratio of 0.97 with a KL of 2.9 nats/token, or a cosine of 0.86 with a Spearman of 0.10,
    read as "a good start for fine-tuning"."""
    from hf_performer.conversion.report import _verdict

    lm = lambda ratio, kl: _verdict({"output_kind": "logits", "end_to_end": {"perplexity_ratio": ratio,
                                                                              "kl_to_teacher": kl}})
    enc = lambda cos, rho: _verdict({"output_kind": "hidden", "end_to_end": {"embedding_cosine_mean": cos,
                                                                              "pairwise_spearman": rho}})
    assert "close to the original" in lm(1.01, 0.01) and "a good start" in lm(1.05, 0.05)
    assert "far from the original" in lm(0.97, 2.885) and "far from the original" in lm(1.2, 0.05)
    assert "close to the original" in enc(0.98, 0.96) and "a good start" in enc(0.9, 0.9)
    assert "far from the original" in enc(0.86, 0.10) and "far from the original" in enc(0.7, 0.9)
    assert enc(0.9, None) == ""


def test_spearman_gives_tied_values_their_average_rank():
    """Bug hunt: ties were ranked in argsort order (0.8374 against scipy's 0.8552 for repeated texts), and a
    constant side gave 1.0 where the coefficient is undefined."""
    scipy_stats = pytest.importorskip("scipy.stats")
    from hf_performer.conversion.metrics import spearman

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        a = torch.randint(0, 5, (30,), generator=g).double()
        b = a + torch.randint(0, 3, (30,), generator=g).double()
        assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic, abs=1e-12)
    assert spearman(torch.ones(6), torch.arange(6.0)) is None


def test_an_earlier_kept_calibration_step_is_named():
    """Bug hunt: with the held-out check keeping step 2 of 6, the closing line, the model card and the report said
    "calibrated 6 steps" and nothing else said which weights were saved."""
    from hf_performer.conversion.cli import _calibration_words
    from hf_performer.conversion.model_card import _calibration_lines
    from hf_performer.conversion.report import _calibration, settings_line

    cal = {"steps_done": 6, "best_step": 2, "reverted": False, "wall_s": 3.4, "device": "cpu",
           "trainable_parameters": 10, "config": {"train": "attention", "lr": 2e-3}, "first": {}, "final": {}}
    assert _calibration_words(cal) == ", calibrated 6 steps (kept step 2: the lowest held-out loss)"
    assert _calibration_words({**cal, "best_step": 6}) == ", calibrated 6 steps"
    card = "\n".join(_calibration_lines(cal))
    assert "The saved weights are those after step 2 of 6" in card
    assert "saved weights" not in "\n".join(_calibration_lines({**cal, "best_step": 6}))
    r = {"performer": {"nb_features": 16, "local_window": 0}, "estimator": {"effective": "aligned-softmax"},
         "statistics_calibrated": True, **_calibration({"calibration": cal})}
    assert "calibrated 6 steps, kept step 2" in settings_line(r)
