"""hf-performer convert: round trips through the CLI, refusals that leave nothing behind."""

from __future__ import annotations

import argparse
import json
import os
import re
import stat
import sys

import pytest
import torch
import transformers as tf
from huggingface_hub import ModelCard
from test_conversion_fixtures import listing, minilm_path, text_file, tiny_bert, tiny_gpt2, tokenizer

import hf_performer  # noqa: F401 - registers the Performer model types
import hf_performer.integration  # noqa: F401
from hf_performer.conversion.cli import main


def run(*argv) -> int:
    return main([str(a) for a in argv])


def test_convert_bert_round_trip(tmp_path, capsys):
    src, out, txt = tiny_bert(tmp_path / "src"), tmp_path / "out", text_file(tmp_path / "t.txt")
    rc = run("convert", src, out, "--nb-features", 16, "--seed", 3, "--chunk-size", 32, "--calibration-data", txt,
             "--statistics-batches", 2, "--max-length", 32, "--no-progress")  # --max-length shapes the statistics batches
    printed = capsys.readouterr()
    assert rc == 0, printed.err
    assert "no statistics step" not in printed.out  # (it ran)
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "conversion.json"} <= set(listing(out))
    assert listing(tmp_path) == ["out", "src", "t.txt"]  # no temporary folders left
    model = tf.AutoModelForMaskedLM.from_pretrained(out)
    assert type(model).__name__ == "PerformerBertForMaskedLM"
    assert model.config.performer["nb_features"] == 16 and model.config.performer["seed"] == 3
    assert model.config.performer["chunk_size"] == 32
    assert all(bool(f.stats_calibrated) for f in model.favor_modules())
    card = (out / "README.md").read_text()
    assert "nb_features" in card and "hf-performer convert" in card and "AutoModelForMaskedLM" in card
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]  # portable: the modeling code is in the folder
    assert auto_map["AutoModelForMaskedLM"] == "hf_performer_integration_bert.PerformerBertForMaskedLM"
    assert {v.split(".")[0] + ".py" for v in auto_map.values()} <= set(listing(out))
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["statistics"]["batches"] == 2 and summary["calibration"] is None
    ids = torch.randint(0, 100, (2, 9))
    assert torch.isfinite(model(input_ids=ids).logits).all()


def test_convert_gpt2_round_trip_with_calibration(tmp_path, capsys):
    src, out, txt = tiny_gpt2(tmp_path / "src"), tmp_path / "out", text_file(tmp_path / "t.txt")
    rc = run("convert", src, out, "--nb-features", 16, "--local-window", 2, "--calibrate", "--calibration-data", txt,
             "--calibration-steps", 2, "--batch-size", 2, "--max-length", 24, "--no-progress")
    assert rc == 0, capsys.readouterr().err
    assert "nb_features=16, local_window=2, estimator" in capsys.readouterr().out  # the settings that shape the model
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "PerformerGPT2LMHeadModel"
    assert model.config.performer["local_window"] == 2 and "Local window" in (out / "README.md").read_text()
    log = json.loads((out / "calibration_log.json").read_text())
    assert log["steps_done"] == 2 and len(log["history"]) == 2 and log["output_kind"] == "logits"
    card = ModelCard.load(out / "README.md")
    assert card.data.pipeline_tag == "text-generation" and card.data.base_model is None  # a local source, no id
    losses = card.text[card.text.index("Training losses"):card.text.index("calibration_log.json")]
    first, last = log["history"][0]["layer_rel_mse"], log["history"][-1]["layer_rel_mse"]
    assert f"`layer_rel_mse` {first:.4g} → {last:.4g}" in losses
    assert not re.search(r"\blr\b|wall_s", losses)  # the summary lists losses only
    assert "output_kl" not in losses  # off by default (output_weight 0): not presented as a loss
    assert not (tmp_path / ".out.calibration").exists()  # state removed after success
    ids = torch.randint(5, 100, (1, 4))
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert gen.shape == (1, 7)


def test_a_max_length_past_the_source_limit_is_cut_with_a_warning(tmp_path, capsys, caplog):
    """The source (the teacher) cannot run past its position limit (64 tokens here): convert and report cut
    --max-length to it, and now say so (they did it silently; found in a bug hunt)."""
    from hf_performer.conversion.report import report

    src, txt = tiny_bert(tmp_path / "src"), text_file(tmp_path / "t.txt")
    with caplog.at_level("WARNING"):
        assert run("convert", src, tmp_path / "out", "--nb-features", 8, "--calibration-data", txt, "--max-length",
                   128, "--max-position-embeddings", 128, "--no-progress") == 0
        assert "--max-length 128 is past the source model's position limit (64 tokens)" in caplog.text
        caplog.clear()
        r = report(src, tmp_path / "out", txt, tmp_path / "rep", max_length=128, lengths=(), progress=False)
    assert r["max_length"] == 64 and "--max-length 128 is past the source model's position limit (64" in caplog.text


def test_resume_without_a_state_is_refused_before_loading_anything(tmp_path, capsys, monkeypatch):
    """A missing --resume state was reported only after the models loaded and the statistics step ran (bug hunt)."""
    convert_module = sys.modules["hf_performer.conversion.convert"]  # (the package exports a function of that name)
    src, txt = tiny_bert(tmp_path / "src"), text_file(tmp_path / "t.txt")
    monkeypatch.setattr(convert_module, "load_model", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    before = listing(tmp_path)
    assert run("convert", src, tmp_path / "out", "--calibration-data", txt, "--calibrate", "--resume",
               "--no-progress") == 2
    assert "--resume: no calibration state at" in capsys.readouterr().err and listing(tmp_path) == before



def test_a_target_that_cannot_be_replaced_stays_as_it_was(tmp_path, monkeypatch):
    """Replacing the output moves it aside first; where that move fails (a mount point) the error is one line and no
    empty ``.out.old-*`` folder is left behind (found by a bug-hunt helper)."""
    from hf_performer.conversion import writer
    from hf_performer.conversion.errors import ConversionError

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    real = os.replace

    def busy(a, b):
        if os.fspath(a) == os.fspath(out):
            raise OSError(16, "Device or resource busy")
        return real(a, b)

    monkeypatch.setattr(writer.os, "replace", busy)
    with pytest.raises(ConversionError, match="cannot replace output folder .*busy"):
        with writer.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
    assert listing(tmp_path) == ["out"] and (out / "config.json").read_text() == "{}"

def test_refuses_overwrite(tmp_path, capsys):
    src, out = tiny_bert(tmp_path / "src"), tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run("convert", src, out, "--nb-features", 8, "--no-progress") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert listing(out) == ["keep.txt"]
    # --overwrite replaces a model folder (or an empty one) only: other files are never deleted (`convert SRC .
    # --overwrite` replaced the working folder, found by a bug-hunt helper)
    assert run("convert", src, out, "--nb-features", 8, "--zero-shot", "--overwrite", "--no-progress") == 2
    assert "holds no model (no config.json)" in capsys.readouterr().err and listing(out) == ["keep.txt"]
    (out / "config.json").write_text("{}")  # a model folder (an earlier conversion, say): replaced
    assert run("convert", src, out, "--nb-features", 8, "--zero-shot", "--overwrite", "--no-progress") == 0
    # with --zero-shot the command says, as it ends, that no statistics step ran and how to run it; every run says how
    # to load what it wrote
    printed = capsys.readouterr().out
    assert "--zero-shot, so no statistics step ran" in printed and "--calibration-data" in printed
    assert f"load it with AutoModelForMaskedLM.from_pretrained({str(out)!r}) (and AutoTokenizer" in printed
    assert "keep.txt" not in listing(out) and "model.safetensors" in listing(out)
    assert listing(tmp_path) == ["out", "src"]


def test_without_calibration_data_the_statistics_step_reads_the_builtin_text(tmp_path, capsys):
    """No --calibration-data: the statistics step reads python-docs, the English prose Python ships (offline), and
    the command says so and how to use text of the model's own kind; the same as a .txt file of those paragraphs."""
    from hf_performer.conversion.corpus import pydoc_paragraphs

    src, txt = tiny_bert(tmp_path / "src"), tmp_path / "docs.txt"
    txt.write_text("\n\n".join(pydoc_paragraphs("all")))
    assert run("convert", src, tmp_path / "default", "--nb-features", 8, "--no-progress") == 0
    printed = capsys.readouterr().out
    assert "read the built-in English text (python-docs" in printed and "--calibration-data texts.txt" in printed
    summary = json.loads((tmp_path / "default" / "conversion.json").read_text())
    assert summary["calibration_data"] == "python-docs" and summary["statistics"]["batches"] == 4
    card = (tmp_path / "default" / "README.md").read_text()
    assert "(English prose: the documentation Python ships)" in card
    assert "Zero-shot" not in card and "No attention-transfer calibration (`--calibrate`)" in card
    assert run("convert", src, tmp_path / "file", "--nb-features", 8, "--calibration-data", txt, "--no-progress") == 0
    default, file = (tf.AutoModelForMaskedLM.from_pretrained(tmp_path / d) for d in ("default", "file"))
    assert all(bool(f.stats_calibrated) for f in default.favor_modules())
    state, other = default.state_dict(), file.state_dict()
    assert state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)



def test_a_statistics_step_on_a_few_tokens_warns(tmp_path, caplog):
    """Statistics fitted on a few tokens can be worse than none (all-MiniLM-L6-v2 on one 3-token text: embedding
    cosine 0.70 against 0.77 without them; found by a bug-hunt helper): the conversion says so; enough text does not."""
    src, tiny_txt = tiny_bert(tmp_path / "src"), tmp_path / "hi.txt"
    tiny_txt.write_text("hi there\n")
    with caplog.at_level("WARNING"):
        assert run("convert", src, tmp_path / "few", "--nb-features", 8, "--calibration-data", tiny_txt,
                   "--no-progress") == 0
    assert "the statistics step read only" in caplog.text and "a few paragraphs" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert run("convert", src, tmp_path / "enough", "--nb-features", 8, "--calibration-data",
                   text_file(tmp_path / "t.txt"), "--no-progress") == 0
    assert "the statistics step read only" not in caplog.text

@pytest.mark.parametrize(
    "flags, message",
    [
        # settings errors name the flag that set them, not the Python field
        (["--nb-features", "0"], "--nb-features 0 is invalid: expected a positive integer"),
        (["--chunk-size", "-1"], "--chunk-size -1 is invalid"),
        (["--max-position-embeddings", "16"], "can only grow"),
        (["--zero-shot", "--calibrate"], "--calibrate needs text to calibrate on, and --zero-shot gives none"),
        (["--zero-shot", "--calibration-data", "{txt}"], "--zero-shot runs no statistics step"),
        (["--calibration-data", "missing.txt"], "no such file"),
        (["--calibrate", "--calibration-data", "{txt}", "--lr", "5"], "lr"),
        (["--resume"], "--calibrate"),
        (["--model-class", "GPT2Model"], "not supported"),
        (["--base-model", "not a hub id"], "--base-model"),
        # a flag that the requested steps would never read is refused, not ignored
        (["--zero-shot", "--calibration-steps", "5"], "--calibration-steps would do nothing with --zero-shot"),
        (["--zero-shot", "--statistics-batches", "2"], "--statistics-batches would do nothing with --zero-shot"),
        (["--calibration-steps", "5"], "--calibration-steps applies only to attention-transfer calibration"),
        (["--calibration-data", "{txt}", "--lr", "0.01", "--max-time", "9"], "--lr, --max-time apply only to attention"),
        (["--calibration-data", "{txt}", "--keep-calibration-state"], "--keep-calibration-state applies only"),
        (["--calibration-data", "{txt}", "--calibrate", "--calibration-steps", "0"], "would train nothing"),
        (["--calibration-data", "{txt}", "--calibrate", "--min-length", "40", "--max-length", "20"],
         "--min-length 40 is invalid: it must not exceed --max-length 20"),
        (["--calibration-data", "{txt}", "--calibrate", "--patience", "-1"], "--patience -1 is invalid"),
        (["--calibration-data", "{txt}", "--calibrate", "--eval-every", "0"], "--eval-every 0 is invalid"),
        (["--calibration-data", "{txt}", "--calibrate", "--batch-tokens", "0"], "--batch-tokens 0 is invalid"),
        (["--calibration-data", "{txt}", "--calibrate", "--max-time", "-1"], "--max-time -1.0 is invalid"),
        (["--calibration-data", "{txt}", "--calibrate", "--max-time", "inf"], "--max-time inf is invalid: expected a finite"),
        (["--calibration-data", "{txt}", "--calibrate", "--calibration-steps", "-1"], "an integer >= 0 or no flag"),
        (["--calibration-data", "{txt}", "--statistics-batches", "0"], "--statistics-batches 0: expected a positive"),
        (["--calibration-data", "{txt}", "--eval-every", "5"], "--eval-every applies only to attention"),
        # settings that read no fitted statistic: the statistics step would change nothing (bug hunt)
        (["--kernel", "softmax", "--no-center-keys", "--no-balance-qk", "--no-aligned-features"],
         "the statistics step would change nothing"),
    ],
)
def test_bad_flags_leave_nothing(tmp_path, capsys, flags, message):
    src, txt = tiny_bert(tmp_path / "src"), text_file(tmp_path / "t.txt")
    before = listing(tmp_path)
    flags = [f.replace("{txt}", str(txt)) for f in flags]
    capsys.readouterr()
    assert run("convert", src, tmp_path / "out" / "nested", *flags, "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-performer: error:") and message in err and err.count("\n") == 1
    assert "PerformerConfig." not in err and " or None" not in err  # flags, not Python fields or values
    assert listing(tmp_path) == before


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["convert", "{src}", "{out}", "--kernel", "cosine"], "argument --kernel: invalid choice: 'cosine'"),
        (["convert", "{src}", "{out}", "--nb-features", "abc"], "argument --nb-features: invalid int value: 'abc'"),
        (["convert", "{src}"], "the following arguments are required: output"),
        (["report", "{src}", "{out}", "--max-texts", "x"], "argument --max-texts: invalid int value: 'x'"),
        (["transform", "{src}"], "argument command: invalid choice: 'transform'"),
    ],
)
def test_values_argparse_rejects_print_one_line(tmp_path, capsys, argv, message):
    """Types, choices and missing arguments (argparse's own checks) fail like the command's: one line naming the
    subcommand's --help, exit status 2, nothing written."""
    src = tiny_bert(tmp_path / "src")
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run(*(a.replace("{src}", str(src)).replace("{out}", str(tmp_path / "out")) for a in argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    sub = "" if argv[0] == "transform" else f" {argv[0]}"
    assert err.startswith(f"hf-performer: error: {message}") and err.count("\n") == 1
    assert err.rstrip().endswith(f"(see `hf-performer{sub} --help`)")
    assert listing(tmp_path) == ["src"]


def test_missing_unsupported_and_offline_sources(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    t5 = tmp_path / "t5"
    tf.T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2).save_pretrained(t5)
    before = listing(tmp_path)
    capsys.readouterr()
    cases = [(tmp_path / "nope", "does not exist"), (t5, "unsupported architecture"),
             ("someone/not-cached-model", "offline")]
    for source, message in cases:
        assert run("convert", source, tmp_path / "out", "--no-progress") == 2
        assert message in capsys.readouterr().err
    assert listing(tmp_path) == before


def test_favor_seed_and_calibration_seed_are_separate_flags(tmp_path, capsys):
    """--seed is PerformerConfig.seed, --calibration-seed CalibrationConfig.seed (both fields are named seed)."""
    src, txt = tiny_bert(tmp_path / "src"), text_file(tmp_path / "t.txt", n=8)
    assert run("convert", src, tmp_path / "a", "--nb-features", 8, "--seed", 1, "--no-progress") == 0, \
        capsys.readouterr().err  # no calibration flag given: nothing refused
    assert json.loads((tmp_path / "a" / "conversion.json").read_text())["performer"]["seed"] == 1
    rc = run("convert", src, tmp_path / "b", "--nb-features", 8, "--seed", 3, "--calibration-data", txt, "--calibrate",
             "--calibration-steps", 1, "--calibration-seed", 5, "--batch-size", 4, "--max-length", 16, "--no-progress")
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "b" / "conversion.json").read_text())
    assert summary["performer"]["seed"] == 3 and summary["calibration"]["config"]["seed"] == 5


def _no_tokenizer_source(path):
    """A BERT folder with weights and config only (no tokenizer files)."""
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=tokenizer().vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    tf.BertForMaskedLM(cfg).save_pretrained(path)
    return path


TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"}


def test_source_without_tokenizer_writes_none_and_says_so(tmp_path, capsys):
    src, out = _no_tokenizer_source(tmp_path / "src"), tmp_path / "out"
    capsys.readouterr()
    # the default statistics step needs a tokenizer to read its text: one error naming both ways out
    assert run("convert", src, out, "--nb-features", 8, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "no usable tokenizer" in err and "--tokenizer" in err and "--zero-shot" in err and not out.exists()
    assert run("convert", src, out, "--nb-features", 8, "--zero-shot", "--no-progress") == 0
    err = capsys.readouterr().err
    assert "hf-performer: warning:" in err and "no tokenizer" in err and "--tokenizer" in err
    assert not TOKENIZER_FILES & set(listing(out))  # never an empty tokenizer
    assert json.loads((out / "conversion.json").read_text())["tokenizer"] is None


def test_calibration_data_without_tokenizer_names_the_fix(tmp_path, capsys):
    src, txt = _no_tokenizer_source(tmp_path / "src"), text_file(tmp_path / "t.txt")
    before = listing(tmp_path)
    capsys.readouterr()
    assert run("convert", src, tmp_path / "out", "--calibration-data", txt, "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-performer: error:") and "no usable tokenizer" in err and "--tokenizer" in err
    assert "empty" not in err  # the text is not blamed
    assert listing(tmp_path) == before


def test_tokenizer_option_reads_the_text_and_is_written(tmp_path, capsys):
    src, out, txt = _no_tokenizer_source(tmp_path / "src"), tmp_path / "out", text_file(tmp_path / "t.txt")
    rc = run("convert", src, out, "--nb-features", 8, "--calibration-data", txt, "--statistics-batches", 1,
             "--tokenizer", minilm_path(), "--no-progress")
    assert rc == 0, capsys.readouterr().err
    written = tf.AutoTokenizer.from_pretrained(out)
    assert written("hello world")["input_ids"] == tokenizer()("hello world")["input_ids"]
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["tokenizer"] == minilm_path() and summary["statistics"]["tokens"] > 0
    # the report finds the written tokenizer; a folder without any needs --tokenizer
    bare = tmp_path / "bare"
    tf.AutoModelForMaskedLM.from_pretrained(out).save_pretrained(bare)
    capsys.readouterr()
    assert main(["report", str(src), str(bare), "--data", str(txt), "--lengths", "", "--no-progress"]) == 2
    assert "--tokenizer" in capsys.readouterr().err
    assert main(["report", str(src), str(bare), "--data", str(txt), "--lengths", "", "--max-texts", "4",
                 "--tokenizer", minilm_path(), "--no-progress"]) == 0


@pytest.mark.parametrize("which, message", [("empty", "not a usable tokenizer"), ("too_big", "embedding table")])
def test_unusable_tokenizer_option_is_refused(tmp_path, capsys, which, message):
    src = _no_tokenizer_source(tmp_path / "src")
    if which == "too_big":  # the tokenizer has more tokens than the model's embedding rows
        cfg = json.loads((src / "config.json").read_text())
        cfg["vocab_size"] = 1000
        (src / "config.json").write_text(json.dumps(cfg))
        spec = minilm_path()
    else:
        spec = _no_tokenizer_source(tmp_path / "other")
    capsys.readouterr()
    assert run("convert", src, tmp_path / "out", "--tokenizer", spec, "--no-progress") == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("target", ["src", ".", "link"])
def test_an_output_that_would_replace_the_source_is_refused(tmp_path, capsys, target):
    """``convert SRC SRC --overwrite`` replaced the source checkpoint with the converted one (found in a bug hunt); an
    output that is the source (through a symbolic link too) or a folder holding it is refused before anything is
    written."""
    src = tiny_bert(tmp_path / "src")
    (tmp_path / "link").symlink_to(src)
    before = {p: p.read_bytes() for p in src.iterdir()}
    capsys.readouterr()
    assert run("convert", src, tmp_path / target if target != "." else tmp_path, "--zero-shot", "--overwrite",
               "--no-progress") == 2
    err = capsys.readouterr().err
    assert err.startswith("hf-performer: error: output") and "would replace the source checkpoint" in err
    assert {p: p.read_bytes() for p in src.iterdir()} == before and sorted(listing(tmp_path)) == ["link", "src"]


def test_a_tokenizer_folder_that_does_not_exist_is_named(tmp_path, capsys):
    src = tiny_bert(tmp_path / "src")
    capsys.readouterr()
    assert run("convert", src, tmp_path / "out", "--tokenizer", tmp_path / "no" / "such", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "--tokenizer" in err and "no such folder" in err and "Repo id" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folder_has_save_pretrained_permissions(tmp_path, capsys, umask):
    src = tiny_bert(tmp_path / "src")
    old = os.umask(umask)
    try:
        assert run("convert", src, tmp_path / "out", "--nb-features", 8, "--no-progress") == 0
        tf.BertModel(tf.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                                   vocab_size=10)).save_pretrained(tmp_path / "reference")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "out").stat().st_mode)
    assert mode == 0o777 & ~umask
    assert mode == stat.S_IMODE((tmp_path / "reference").stat().st_mode)


@pytest.mark.parametrize("kernel", ["softmax", "favor++"])
def test_effective_estimator_is_recorded(tmp_path, capsys, kernel):
    """After the statistics step, aligned features replace both positive kernels: the two conversions are the
    same model, and conversion.json / the CLI say so; the kernel is what runs without aligned features."""
    src, txt = tiny_bert(tmp_path / "src"), text_file(tmp_path / "t.txt")
    flags = ["--nb-features", 8, "--calibration-data", txt, "--statistics-batches", 1, "--no-progress"]
    for name, extra in (("aligned", []), ("plain", ["--no-aligned-features"])):
        capsys.readouterr()
        assert run("convert", src, tmp_path / f"{kernel}-{name}", "--kernel", kernel, *flags, *extra) == 0
        out = capsys.readouterr().out
        est = json.loads((tmp_path / f"{kernel}-{name}" / "conversion.json").read_text())["estimator"]
        model = tf.AutoModelForMaskedLM.from_pretrained(tmp_path / f"{kernel}-{name}")
        assert est["kernel"] == kernel
        if name == "aligned":
            assert est["effective"] == "aligned-softmax" and "replaced" in est["note"] and "note:" in out
            assert all(f.aligned for f in model.favor_modules())  # what the attention modules actually do
        else:
            assert est["effective"] == kernel and est["note"] is None
            assert not any(f.aligned for f in model.favor_modules())
        assert f"estimator {est['effective']}" in out


def test_softmax_and_favorpp_are_one_model_after_the_statistics_step(tmp_path, capsys):
    src, txt = tiny_bert(tmp_path / "src"), text_file(tmp_path / "t.txt")
    outs = []
    for kernel in ("softmax", "favor++"):
        assert run("convert", src, tmp_path / kernel, "--kernel", kernel, "--nb-features", 8, "--calibration-data", txt,
                   "--statistics-batches", 1, "--no-progress") == 0
        model = tf.AutoModelForMaskedLM.from_pretrained(tmp_path / kernel)
        with torch.no_grad():
            outs.append(model(input_ids=torch.arange(5, 20)[None]).logits)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


def test_causal_favorpp_without_statistics_is_recorded_as_softmax(tmp_path, capsys):
    """Without the statistics step, causal favor++ has no measured parameter and runs softmax features: the
    record says so, and the outputs equal the softmax kernel's."""
    src = tiny_gpt2(tmp_path / "src")
    logits = {}
    for kernel in ("softmax", "favor++"):
        assert run("convert", src, tmp_path / kernel, "--kernel", kernel, "--nb-features", 8, "--zero-shot",
                   "--no-progress") == 0
        est = json.loads((tmp_path / kernel / "conversion.json").read_text())["estimator"]
        assert est == {"kernel": kernel, "effective": "softmax", "note": None}
        with torch.no_grad():
            logits[kernel] = tf.AutoModelForCausalLM.from_pretrained(tmp_path / kernel)(torch.arange(5, 17)[None]).logits
    torch.testing.assert_close(logits["softmax"], logits["favor++"], rtol=0, atol=0)


def test_every_cli_option_has_help():
    from hf_performer.conversion.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            text = (action.help or "").strip()
            assert text and not text.startswith("(default"), f"{name} {action.option_strings or action.dest}: {text!r}"


def test_a_disk_too_small_is_refused_before_the_work(tmp_path, capsys, monkeypatch):
    """The checkpoint's size is checked against the free space before the statistics step (a full disk used to end
    the conversion, after its work, in a safetensors traceback)."""
    from hf_performer.conversion import writer

    convert_module = sys.modules["hf_performer.conversion.convert"]  # (the package exports a function of that name)
    src, txt = tiny_bert(tmp_path / "src"), text_file(tmp_path / "t.txt")
    model = tf.AutoModelForMaskedLM.from_pretrained(src)
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    real = writer.shutil.disk_usage
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: real(p)._replace(free=size // 2))
    monkeypatch.setattr(convert_module, "calibrate_model_statistics",
                        lambda *a, **k: pytest.fail("ran the statistics step before refusing"))
    before = listing(tmp_path)
    assert run("convert", src, tmp_path / "out", "--nb-features", 8, "--calibration-data", txt, "--no-progress") == 2
    err = capsys.readouterr().err
    assert "not enough disk space for the converted model" in err and "Traceback" not in err
    assert listing(tmp_path) == before
    # tied weights count once: the estimate is what save_pretrained writes, at most
    assert convert_module.checkpoint_bytes(model) <= size


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"),
                                   RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, "
                                                "message: \"No space left on device\" })")])
def test_a_disk_that_fills_up_while_writing_is_one_clear_error(tmp_path, monkeypatch, error):
    """A disk that fills up during the write (the OS error, or safetensors' wrapping of it) ends in one
    ConversionError; the partial folder is removed and an existing output stays as it was."""
    from hf_performer.conversion import writer
    from hf_performer.conversion.errors import ConversionError

    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(ConversionError, match="filled up while the converted model was written"):
        with writer.atomic_directory(out, overwrite=True) as tmp:
            (tmp / "config.json").write_text('{"new": 1}')
            raise error
    assert listing(tmp_path) == ["out"] and (out / "config.json").read_text() == "{}"
    with pytest.raises(KeyError):  # other errors pass through as they are
        with writer.atomic_directory(out, overwrite=True):
            raise KeyError("x")
