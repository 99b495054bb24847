"""hf-performer report: JSON, markdown and PNG with sane values, for an encoder and a causal LM."""

from __future__ import annotations

import json
import math

from test_conversion_fixtures import text_file, tiny_bert, tiny_gpt2

from hf_performer.conversion.cli import main
from hf_performer.conversion.report import report


def _convert(src, out, txt):
    assert main(["convert", str(src), str(out), "--nb-features", "16", "--calibration-data", str(txt),
                 "--statistics-batches", "1", "--no-progress"]) == 0


def test_report_encoder_via_cli(tmp_path, capsys):
    src, out = tiny_bert(tmp_path / "src"), tmp_path / "out"
    _convert(src, out, text_file(tmp_path / "train.txt"))
    held_out = text_file(tmp_path / "eval.txt", n=12, split="eval")
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
