"""sentence-transformers: converting the real all-MiniLM-L6-v2 (a sentence-transformers folder) keeps its
Pooling and Normalize modules, so ``SentenceTransformer(out).encode`` equals the converted transformer +
mean pooling + L2 normalisation computed here by hand, also beyond the old limits after position extension."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from huggingface_hub import ModelCard
from test_conversion_fixtures import listing, minilm_path, tiny_bert

import hf_performer  # noqa: F401 - registers the Performer model types (needed before SentenceTransformer(out))
from hf_performer.conversion import ConversionError, convert
from hf_performer.conversion.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
st = pytest.importorskip("sentence_transformers")

TEXTS = ["Assert statements are a convenient way to insert debugging assertions.", "Hello world",
         " ".join(["the module provides functions"] * 150)]  # 600+ tokens: past 256 (ST's limit) and 512


def pooled_by_hand(folder, texts) -> torch.Tensor:
    """Mean of the converted transformer's token embeddings over real tokens, L2-normalised: [N, 384]."""
    tok, model = tf.AutoTokenizer.from_pretrained(folder), tf.AutoModel.from_pretrained(folder).eval()
    rows = []
    for text in texts:  # one text at a time, nothing truncated: an independent reference for ST's batching
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            h = model(**enc).last_hidden_state[0]  # [L, 384]
        rows.append(torch.nn.functional.normalize(h.mean(0), dim=-1))
    return torch.stack(rows)


def test_minilm_sentence_transformer_round_trip(tmp_path, capsys):
    src, out = minilm_path(), tmp_path / "st"
    rc = main(["convert", src, str(out), "--nb-features", "32", "--seed", "1", "--max-position-embeddings", "1024",
               "--no-progress"])
    assert rc == 0 and "sentence-transformers modules Transformer -> Pooling -> Normalize" in capsys.readouterr().out
    summary = json.loads((out / "conversion.json").read_text())
    assert {"modules.json", "sentence_bert_config.json", "config_sentence_transformers.json",
            "1_Pooling"} <= set(listing(out))
    source = Path(src)
    assert json.loads((out / "modules.json").read_text()) == json.loads((source / "modules.json").read_text())
    assert (out / "1_Pooling" / "config.json").read_bytes() == (source / "1_Pooling" / "config.json").read_bytes()
    assert json.loads((out / "sentence_bert_config.json").read_text())["max_seq_length"] == 1024
    assert summary["sentence_transformers"] == {"modules": ["Transformer", "Pooling", "Normalize"],
                                                "max_seq_length": {"from": 256, "to": 1024}}

    card = ModelCard.load(out / "README.md")  # the Hub's convention for sentence-transformers folders
    assert card.data.library_name == "sentence-transformers" and "sentence-transformers" in card.data.tags
    assert "SentenceTransformer(" in card.text and "`max_seq_length` raised from 256 to 1024" in card.text

    model = st.SentenceTransformer(str(out), device="cpu")
    assert type(model[0].auto_model).__name__ == "PerformerBertModel"
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Normalize"]
    assert model.max_seq_length == 1024
    got = model.encode(TEXTS, convert_to_tensor=True, batch_size=8)  # one padded batch
    assert model.tokenize(TEXTS[2:])["input_ids"].shape[1] > 600  # the long text is not cut at 256
    torch.testing.assert_close(got, pooled_by_hand(out, TEXTS), rtol=0, atol=2e-5)
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(len(TEXTS)))


def test_layout_saved_by_sentence_transformers_with_dense_weights(tmp_path):
    """A folder written by today's sentence-transformers (Transformer -> Pooling -> Dense -> Normalize, module
    weights in 2_Dense/, the length limit in the tokenizer): the Dense weights travel, encodings match."""
    from sentence_transformers.base.modules import Dense, Normalize, Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling

    hf = tiny_bert(tmp_path / "hf", cls=tf.BertModel)  # 64 positions
    dense = Dense(32, 8)
    source = st.SentenceTransformer(modules=[Transformer(str(hf), max_seq_length=48), Pooling(32, "mean"), dense,
                                             Normalize()], device="cpu")
    source.save(str(tmp_path / "src"))
    summary = convert(tmp_path / "src", tmp_path / "out", {"nb_features": 16}, max_position_embeddings=128,
                      progress=False)
    assert summary["sentence_transformers"] == {"modules": ["Transformer", "Pooling", "Dense", "Normalize"],
                                                "max_seq_length": None}
    model = st.SentenceTransformer(str(tmp_path / "out"), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    assert model.max_seq_length == 128  # the tokenizer's limit follows the extension
    texts = ["Hello world", " ".join(["many words"] * 50)]  # ~100 tokens: past 64 positions and the old 48
    got = model.encode(texts, convert_to_tensor=True)
    tok, performer = tf.AutoTokenizer.from_pretrained(tmp_path / "out"), tf.AutoModel.from_pretrained(tmp_path / "out")
    rows = []
    for text in texts:
        with torch.no_grad():
            pooled = performer(**tok(text, return_tensors="pt")).last_hidden_state[0].mean(0)
            rows.append(torch.nn.functional.normalize(torch.tanh(dense.linear(pooled)), dim=-1))  # Dense: tanh
    torch.testing.assert_close(got, torch.stack(rows), rtol=0, atol=2e-5)


def test_plain_source_writes_no_sentence_modules(tmp_path):
    summary = convert(tiny_bert(tmp_path / "src"), tmp_path / "out", {"nb_features": 8}, progress=False)
    assert summary["sentence_transformers"] is None
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.library_name == "transformers" and "SentenceTransformer" not in card.text
    assert not any(name.startswith(("modules", "sentence_", "config_sentence")) for name in listing(tmp_path / "out"))


@pytest.mark.parametrize("modules, message", [
    ([{"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}],
     "subfolder '0_Transformer'"),
    ([{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
      {"idx": 1, "name": "1", "path": "../up", "type": "sentence_transformers.models.Pooling"}], "not a relative path"),
    ({"not": "a list"}, "expected a list of modules"),
])
def test_unsupported_sentence_layouts_refused_before_writing(tmp_path, modules, message):
    src = tiny_bert(tmp_path / "src")
    (src / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ConversionError, match=message):
        convert(src, tmp_path / "out", {"nb_features": 8}, progress=False)
    assert listing(tmp_path) == ["src"]


REMOTE = """
import importlib.abc, sys, torch

class NoPlugin(importlib.abc.MetaPathFinder):  # hf_performer is not installed here
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_performer":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

sys.meta_path.insert(0, NoPlugin())
torch.set_num_threads(1)
from sentence_transformers import SentenceTransformer
out, texts = sys.argv[1], sys.argv[2:]
try:
    SentenceTransformer(out, device="cpu")
    print("REFUSED: no")
except Exception as e:
    print("REFUSED:", repr(f"{type(e).__name__}: {e}"))
model = SentenceTransformer(out, device="cpu", trust_remote_code=True)
torch.save(model.encode(texts, convert_to_tensor=True), out + "/remote.pt")
print("CLASS:", type(model[0].auto_model).__name__, sorted(m for m in sys.modules if m.startswith("hf_performer")))
"""


@pytest.mark.slow
def test_sentence_transformer_without_the_plugin(tmp_path):
    """Where hf_performer is not installed, SentenceTransformer(out) refuses and names trust_remote_code (never a
    silent softmax model); with trust_remote_code=True the modeling code saved in the folder runs, same encodings."""
    out = tmp_path / "st"
    convert(minilm_path(), out, {"nb_features": 16}, progress=False)
    texts = TEXTS[:2]
    want = st.SentenceTransformer(str(out), device="cpu").encode(texts, convert_to_tensor=True)
    (tmp_path / "remote.py").write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(out), *texts], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    refused = next(line for line in done.stdout.splitlines() if line.startswith("REFUSED:"))
    assert refused != "REFUSED: no" and "trust_remote_code" in refused, refused
    assert "CLASS: PerformerBertModel []" in done.stdout, done.stdout
    torch.testing.assert_close(torch.load(out / "remote.pt"), want, rtol=0, atol=1e-6)
