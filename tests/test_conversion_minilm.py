"""The real all-MiniLM-L6-v2 (sentence-transformers folder layout, real tokenizer): convert with position
extension, reload with plain AutoModel, first positions unchanged, longer inputs run."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from test_conversion_fixtures import listing, minilm_path, text_file

import hf_performer.integration  # noqa: F401 - registers the Performer model types
from hf_performer.conversion import convert


@pytest.mark.slow
def test_minilm_extended_conversion_round_trip(tmp_path):
    src, txt = minilm_path(), text_file(tmp_path / "t.txt", n=8)
    settings = {"nb_features": 64, "seed": 1}
    # the source's 512 positions: nothing to tile, but sentence-transformers' max_seq_length (256) becomes 512 (it
    # stayed 256, found by a bug-hunt helper)
    plain = convert(src, tmp_path / "plain", settings, calibration_data=txt, statistics_batches=1,
                    max_position_embeddings=512, progress=False)
    assert plain["positions"] == {"from": 512, "to": 512}
    assert plain["sentence_transformers"]["max_seq_length"] == {"from": 256, "to": 512}
    summary = convert(src, tmp_path / "long", settings, calibration_data=txt, statistics_batches=1,
                      max_position_embeddings=1024, progress=False)
    assert summary["positions"] == {"from": 512, "to": 1024}
    assert "positions" in json.loads((tmp_path / "long" / "conversion.json").read_text())
    assert {"model.safetensors", "tokenizer.json", "README.md"} <= set(listing(tmp_path / "long"))

    plain, long = (tf.AutoModel.from_pretrained(tmp_path / name).eval() for name in ("plain", "long"))
    tok = tf.AutoTokenizer.from_pretrained(tmp_path / "long")
    assert type(long).__name__ == "PerformerBertModel"
    assert long.config.max_position_embeddings == 1024 and tok.model_max_length == 1024
    assert long.embeddings.position_ids.shape[-1] == 1024
    enc = tok(["Assert statements are a convenient way to insert debugging assertions.", "Hello world"],
              padding=True, return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(long(**enc).last_hidden_state, plain(**enc).last_hidden_state, rtol=0, atol=0)
        out = long(input_ids=torch.randint(1000, 20000, (1, 700))).last_hidden_state
    assert out.shape == (1, 700, 384) and torch.isfinite(out).all()
