"""``--train lora``: attention transfer through LoRA adapters on the attention projections, merged before
saving (LoLCATs). The result is a plain Performer model whose projections moved by a matrix of rank <= r and
whose other weights did not move; the transfer loss falls; the CLI writes a checkpoint that reloads as such."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from test_conversion_calibrate import _Interrupt, pair, schedule
from test_conversion_fixtures import listing, text_file, tiny_gpt2

import hf_performer  # noqa: F401 - registers the Performer model types
from hf_performer.conversion.calibrate import CalibrationConfig, calibrate, output_kind, transfer_loss
from hf_performer.conversion.capture import attention_names
from hf_performer.conversion.cli import main
from hf_performer.conversion.errors import ConversionError
from hf_performer.conversion.lora import add_lora, merge_lora
from hf_performer.conversion.statistics import calibrate_model_statistics

pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

PROJECTIONS = {"bert": ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
                        "attention.output.dense.weight"),
               "gpt2": ("attn.c_attn.weight", "attn.c_proj.weight")}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_lora_calibration_moves_projections_by_low_rank_updates(kind):
    teacher, student = pair(kind)
    train, held_out = schedule(), schedule(8, 16, "eval").batch(0)
    calibrate_model_statistics(student, [train.batch(0)])
    start = copy.deepcopy(student)
    cfg = CalibrationConfig(steps=12, lr=1e-2, batch_size=4, max_length=32, warmup_steps=2, train="lora", lora_rank=2)
    assert cfg.lora_alpha == 4.0  # default 2 x rank
    names, kind_ = attention_names(student), output_kind(student)
    with torch.no_grad():
        before, _ = transfer_loss(student, teacher, held_out, names, kind_, cfg)
    log = calibrate(student, teacher, train, cfg, progress=False)
    with torch.no_grad():
        after, _ = transfer_loss(student, teacher, held_out, names, kind_, cfg)
    assert after < before and log["lora"] == {"rank": 2, "alpha": 4.0, "merged": True}

    # merged: the same parameter names as before (no adapters left), every parameter trainable again
    assert [n for n, _ in student.named_parameters()] == [n for n, _ in start.named_parameters()]
    assert not any("lora" in n for n, _ in student.named_modules()) and not hasattr(student, "peft_config")
    assert all(p.requires_grad for p in student.parameters())
    old = dict(start.named_parameters())
    moved = 0
    for name, p in student.named_parameters():
        delta = (p - old[name]).detach()
        if name.endswith(PROJECTIONS[kind]):
            assert torch.linalg.matrix_rank(delta) <= 2, name  # a rank-2 update (LoRA), not a full one
            moved += int(delta.abs().max() > 0)
        else:
            assert torch.equal(p, old[name]), name  # biases, MLPs, embeddings, norms untouched
    # every projection the per-layer loss reaches moved (BERT's attention output is captured before output.dense)
    assert moved == 2 * (3 if kind == "bert" else 2)
    n_adapter = log["trainable_parameters"]
    assert 0 < n_adapter < sum(old[n].numel() for n in old if n.endswith(PROJECTIONS[kind])) / 2


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_adapters_sit_on_every_attention_projection(kind):
    from peft.tuners.lora import LoraLayer

    _, student = pair(kind)
    tuner = add_lora(student, 2, 4.0)
    adapted = sorted(n for n, m in student.named_modules() if isinstance(m, LoraLayer))
    assert len(adapted) == 2 * len(PROJECTIONS[kind])
    assert {n.split(".")[-1] for n in adapted} == {p.split(".")[-2] for p in PROJECTIONS[kind]}
    assert all("lora_" in n for n, p in student.named_parameters() if p.requires_grad)
    merge_lora(tuner)
    assert not any(isinstance(m, LoraLayer) for m in student.modules())


def test_lora_resume_matches_uninterrupted(tmp_path):
    cfg = CalibrationConfig(steps=4, lr=1e-2, batch_size=2, max_length=32, warmup_steps=1, save_every=2, train="lora",
                            lora_rank=2)
    teacher, straight = pair("gpt2")
    fresh = copy.deepcopy(straight)
    calibrate(straight, teacher, schedule(), cfg, state_dir=tmp_path / "a", progress=False)
    sched = schedule()
    sched.__class__ = _Interrupt
    with pytest.raises(KeyboardInterrupt):
        calibrate(copy.deepcopy(fresh), teacher, sched, cfg, state_dir=tmp_path / "b", progress=False)
    resumed = copy.deepcopy(fresh)
    log = calibrate(resumed, teacher, schedule(), cfg, state_dir=tmp_path / "b", resume=True, progress=False)
    assert log["steps_done"] == 4 and log["lora"]["merged"]
    for (n, a), b in zip(straight.named_parameters(), resumed.parameters()):
        torch.testing.assert_close(b, a, msg=n)


def test_lora_options_refused_without_train_lora():
    with pytest.raises(ConversionError, match="lora_rank.*only with train='lora'"):
        CalibrationConfig(lora_rank=4)
    with pytest.raises(ConversionError, match="lora_rank"):
        CalibrationConfig(train="lora", lora_rank=0)


def test_cli_lora_calibration_writes_a_plain_performer_checkpoint(tmp_path, capsys):
    src, out, txt = tiny_gpt2(tmp_path / "src"), tmp_path / "out", text_file(tmp_path / "t.txt")
    rc = main([str(a) for a in ("convert", src, out, "--nb-features", 8, "--calibration-data", txt, "--calibrate",
                                "--train", "lora", "--lora-rank", 2, "--calibration-steps", 3, "--batch-size", 4,
                                "--max-length", 32, "--no-progress")])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "conversion.json").read_text())
    assert summary["calibration"]["config"]["train"] == "lora" and summary["calibration"]["config"]["lora_rank"] == 2
    assert summary["calibration"]["lora"]["merged"] and summary["calibration"]["steps_done"] == 3
    weights = load_file(out / "model.safetensors")
    assert not any("lora" in k for k in weights)
    stock = load_file(src / "model.safetensors")
    assert set(stock) <= set(weights)  # every stock weight under its own name
    moved = [k for k in stock if not torch.equal(weights[k], stock[k])]
    assert moved and all(k.endswith(("attn.c_attn.weight", "attn.c_proj.weight")) for k in moved), moved
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "PerformerGPT2LMHeadModel"
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.randint(0, 100, (1, 9))).logits).all()

    # --lora-rank without --train lora: one error, nothing written
    before = listing(tmp_path)
    rc = main([str(a) for a in ("convert", src, tmp_path / "other", "--calibration-data", txt, "--calibrate",
                                "--lora-rank", 2, "--no-progress")])
    assert rc == 2 and "applies only with --train 'lora'" in capsys.readouterr().err and listing(tmp_path) == before
