"""The model card of a converted folder: YAML metadata huggingface_hub parses, a usage snippet that runs, the
effective estimator stated as the model computes it; what ``push_to_hub`` uploads (a fake Hub API: no network)."""

from __future__ import annotations

import json
import re
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from huggingface_hub import ModelCard
from test_conversion_fixtures import listing, text_file, tiny_bert

import hf_performer
import hf_performer.integration as I
from hf_performer.conversion.cli import main
from hf_performer.conversion.model_card import effective_estimator
from hf_performer.settings import PerformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SOURCE_CARD = """---
license: mit
language: en
pipeline_tag: fill-mask
library_name: transformers
tags:
- source-tag
---

# tiny source
"""


def test_card_metadata_parses_and_its_snippet_runs(tmp_path, capsys):
    src, out, txt = tiny_bert(tmp_path / "src"), tmp_path / "out", text_file(tmp_path / "t.txt")
    (src / "README.md").write_text(SOURCE_CARD)
    rc = main([str(a) for a in ("convert", src, out, "--nb-features", 16, "--kernel", "favor++", "--calibration-data",
                                txt, "--statistics-batches", 1, "--base-model", "someone/tiny-bert", "--no-progress")])
    assert rc == 0, capsys.readouterr().err
    card = ModelCard.load(out / "README.md")
    data = card.data
    assert data.base_model == "someone/tiny-bert" and data.library_name == "transformers"
    assert data.license == "mit" and data.language == "en" and data.pipeline_tag == "fill-mask"  # from the source card
    assert {"hf-performer", "performer", "custom_code"} <= set(data.tags) and "source-tag" not in data.tags
    assert "# tiny-bert with Performer" in card.text and "(https://huggingface.co/someone/tiny-bert)" in card.text
    # the estimator the model really uses after the statistics step (test below), not just the kernel flag
    assert "no longer changes the estimator" in card.text and "importance-sampled" in card.text
    assert "takes effect at the statistics step" not in card.text  # it ran
    # the card's first snippet loads the folder (the placeholder replaced by the path)
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1).replace("path/or/hub-id", str(out))
    assert "import hf_performer" in snippet and "AutoModelForMaskedLM" in snippet
    scope = {}
    exec(snippet, scope)
    assert type(scope["model"]).__name__ == "PerformerBertForMaskedLM" and scope["tokenizer"]("hi")["input_ids"]
    assert 'trust_remote_code=True' in card.text
    # ready for `hf upload`: nothing hidden or temporary; every auto_map module is in the folder
    assert not [n for n in listing(out) if n.startswith(".") or n.endswith(".tmp")]
    auto_map = json.loads((out / "config.json").read_text())["auto_map"]
    assert {v.split(".")[0] + ".py" for v in auto_map.values()} <= set(listing(out))


@pytest.mark.parametrize("source_card", [SOURCE_CARD, None])
def test_a_local_source_is_named_by_its_card_title_else_its_folder(tmp_path, capsys, source_card):
    src, out = tiny_bert(tmp_path / "model"), tmp_path / "out"  # a folder named like the one a package ships
    if source_card:
        (src / "README.md").write_text(source_card)
    assert main([str(a) for a in ("convert", src, out, "--nb-features", 8, "--zero-shot", "--no-progress")]) == 0, \
        capsys.readouterr()
    title = "tiny source" if source_card else "model"
    card = (out / "README.md").read_text()
    assert f"\n# {title} with Performer FAVOR+ attention\n" in card
    # no statistics step ran: the settings table says that aligned_features has not taken effect yet
    assert "| `aligned_features` | `true` (takes effect at the statistics step, which has not run" in card
    assert "- Zero-shot (`--zero-shot`, no statistics step)" in card


def _bert(kernel):
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=32, initializer_range=0.3)
    return I.convert_to_performer(tf.BertModel(cfg), PerformerConfig(nb_features=16, kernel=kernel)).eval()


def _gpt2(kernel):
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=2, n_positions=32, initializer_range=0.3)
    return I.convert_to_performer(tf.GPT2Model(cfg), PerformerConfig(nb_features=16, kernel=kernel)).eval()


IDS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def _outputs(model, statistics: bool):
    if statistics:
        hf_performer.calibrate_feature_statistics(model, {"input_ids": IDS})
    return model(input_ids=IDS).last_hidden_state


@pytest.mark.parametrize("build, causal, statistics, same", [
    (_bert, False, True, True),  # aligned features replace both kernels' features
    (_bert, False, False, False),  # favor++ with its per-input parameter is a different estimator
    (_gpt2, True, False, True),  # causal, no statistics: favor++'s parameter stays 0, i.e. FAVOR+
    (_gpt2, True, True, True),
])
def test_the_card_states_the_estimator_the_model_computes(build, causal, statistics, same):
    softmax, favorpp = _outputs(build("softmax"), statistics), _outputs(build("favor++"), statistics)
    assert torch.equal(softmax, favorpp) == same
    text = effective_estimator(PerformerConfig(kernel="favor++").to_dict(), statistics, causal)
    assert ("FAVOR++" not in text) == same, text


class FakeHub:
    """Stands in for transformers' HfApi: records the files of each commit instead of uploading them."""

    def __init__(self):
        self.uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                self.uploaded[op.path_in_repo] = f.read()
        return SimpleNamespace(commit_url="fake")


def test_push_to_hub_uploads_weights_config_and_modeling_code(tmp_path, monkeypatch):
    import transformers.utils.hub as hub

    fake = FakeHub()
    monkeypatch.setattr(hub, "_hf_api", fake)
    monkeypatch.setattr(hub, "create_and_tag_model_card",
                        lambda repo_id, tags=None, token=None: ModelCard("---\nlibrary_name: transformers\n---\n"))
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=32)
    model = I.convert_to_performer(tf.GPT2LMHeadModel(cfg), PerformerConfig(nb_features=16)).eval()
    model.push_to_hub("someone/tiny-performer")
    code = {n for n in fake.uploaded if n.endswith(".py")}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= set(fake.uploaded)
    auto_map = json.loads(fake.uploaded["config.json"])["auto_map"]
    assert auto_map["AutoModelForCausalLM"] == "hf_performer_integration_gpt2.PerformerGPT2LMHeadModel"
    assert {v.split(".")[0] + ".py" for v in auto_map.values()} <= code and "hf_performer_ops_causal.py" in code
    for name, content in fake.uploaded.items():  # the uploaded files are a complete checkpoint
        (tmp_path / name).write_bytes(content)
    again = tf.AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=1e-6, atol=1e-6)
