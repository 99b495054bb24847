"""The conversion benchmark's offline text sources and its cached code GPT-2 (no benchmark numbers asserted)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
from test_conversion_fixtures import tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
code_gpt2 = importlib.import_module("code_gpt2")
text_sources = importlib.import_module("text_sources")

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sources_are_offline_distinct_and_disjoint():
    loaded = {name: text_sources.load(name) for name in text_sources.DOMAINS}
    assert all(len(docs) >= 20 for docs in loaded.values()), {k: len(v) for k, v in loaded.items()}
    assert len({text_sources.fingerprint(v) for v in loaded.values()}) == len(loaded)
    assert not set(loaded["pydoc-train"]) & set(loaded["pydoc-eval"])
    assert not set(code_gpt2.code_documents("train")) & set(loaded["code"])  # the code GPT-2 never sees eval files
    legal = " ".join(loaded["licenses"]).lower()
    assert "warranty" in legal and "permission" in legal and "def " not in legal
    assert "def " in loaded["code"][0] or "import " in loaded["code"][0]


def test_eval_sequences_have_one_length_and_spread_over_the_source():
    docs = text_sources.load("pydoc-eval")
    everything = text_sources.sequences(docs, tokenizer(), 64, None)
    some = text_sources.sequences(docs, tokenizer(), 64, 10)
    assert len(everything) > 100 and all(len(s) == 64 for s in everything)
    assert len(some) == 10 and some[0] == everything[0] and some[-1] in everything[-len(everything) // 10 - 1:]


def test_a_missing_source_stops_the_benchmark_first(monkeypatch, capsys):
    monkeypatch.setattr(text_sources.metadata, "distributions", lambda: [])
    with pytest.raises(text_sources.SourceMissing, match="pip install"):
        text_sources.load("licenses")
    bench = importlib.import_module("bench_conversion")
    monkeypatch.setattr(bench, "run_model", lambda *a, **k: pytest.fail("ran without its text"))
    assert bench.main(["--only", "minilm", "--output-name", "never-written"]) == 2
    assert "bench_conversion: error: only 0 license files" in capsys.readouterr().err
    assert not (bench.RESULTS / "never-written.json").exists()
    with pytest.raises(KeyError, match="unknown text source"):
        text_sources.load("novels")


@pytest.mark.slow
def test_code_gpt2_is_trained_once_then_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_PERFORMER_BENCH_CACHE", str(tmp_path))
    small = dict(steps=2, n_layer=1, n_embd=32, n_head=2, vocab_size=300, length=64, n_positions=64)
    folder, info = code_gpt2.load_or_train(progress=False, **small)
    assert not info["cached"] and (folder / "model.safetensors").is_file() and info["train_tokens"] > 100_000
    monkeypatch.setattr(code_gpt2, "train", lambda *a, **k: pytest.fail("retrained a cached model"))
    again, info2 = code_gpt2.load_or_train(progress=False, **small)
    assert again == folder and info2["cached"] and info2["final_train_loss"] == info["final_train_loss"]
    assert code_gpt2.cache_key({**code_gpt2.DEFAULTS, **small}) != code_gpt2.cache_key(code_gpt2.DEFAULTS)
    with pytest.raises(ValueError, match="unknown settings"):
        code_gpt2.load_or_train(progress=False, layers=3)


def test_no_model_is_evaluated_on_its_calibration_text():
    bench = importlib.import_module("bench_conversion")
    for model, calibration in bench.CALIBRATION_SOURCES.items():
        assert calibration not in bench.EVAL_SOURCES[model], model
    assert bench.CALIBRATION_SOURCES["llama"] != "pydoc-train"  # the small Llama trains on it: calibrate on another domain
