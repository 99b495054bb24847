"""Generic (rotary, grouped-query) families through the conversion tools: the CLI with statistics, attention-transfer
calibration (full and LoRA) and the report; no L×L tensor; portable checkpoints loaded where hf_performer is absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf
from test_conversion_fixtures import _save, text_file, tokenizer
from test_integration_linear_memory import L, ShapeRecorder

import hf_performer
import hf_performer.integration as I
from hf_performer.conversion.cli import main
from hf_performer.settings import PerformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(cls=tf.Qwen2ForCausalLM, vocab=None, positions=64, **kw):
    torch.manual_seed(0)
    tok = tokenizer()
    config_cls = cls.config_class
    cfg = config_cls(vocab_size=vocab or len(tok) + 8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=positions,
                     bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                     initializer_range=0.3, **kw)
    return cls(cfg).eval()


@pytest.mark.parametrize("train", ["attention", "lora"])
def test_cli_converts_calibrates_and_reports_a_grouped_rotary_decoder(tmp_path, capsys, train):
    if train == "lora":
        pytest.importorskip("peft")
    src = _save(tiny(), tmp_path / "src", 64)
    txt, out = text_file(tmp_path / "t.txt"), tmp_path / "out"
    rc = main([str(a) for a in ("convert", src, out, "--nb-features", 16, "--calibrate", "--train", train,
                                "--calibration-data", txt, "--calibration-steps", 2, "--batch-size", 2,
                                "--max-length", 24, "--max-position-embeddings", 128, "--no-progress")])
    assert rc == 0, capsys.readouterr().err
    model = tf.AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "PerformerQwen2ForCausalLM"
    assert all(bool(f.stats_calibrated) and f.num_heads == 2 for f in model.favor_modules())
    assert model.config.max_position_embeddings == 128  # rotary: nothing to tile, the limit grows
    card = (out / "README.md").read_text()  # and the card says so (it said the table was tiled)
    assert "Position limit raised from 64 to 128 tokens" in card and "tiling" not in card
    log = json.loads((out / "calibration_log.json").read_text())
    assert log["steps_done"] == 2 and log["output_kind"] == "logits"
    stock = tf.Qwen2ForCausalLM.from_pretrained(src)
    trained = [n for n, p in model.named_parameters() if not torch.equal(p, stock.get_parameter(n))]
    assert all(".self_attn." in n for n in trained)  # attention transfer moves attention projections only
    assert bool(trained) != bool(log.get("reverted")), log.get("reverted")  # trained, unless validation reverted it
    ids = torch.randint(5, 100, (1, 4))
    assert model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)
    if train == "attention":
        assert main(["report", str(src), str(out), "--data", str(txt), "--max-length", "24"]) == 0


def test_training_step_and_generation_allocate_no_attention_sized_tensor():
    model = I.convert_to_performer(tiny(tf.LlamaForCausalLM, vocab=64, positions=L, attention_dropout=0.0),
                                   PerformerConfig(nb_features=32, chunk_size=64))
    ids = torch.randint(3, 64, (2, L), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :100] = 0  # left padding
    model.train()
    with ShapeRecorder() as rec:
        model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    assert len(rec.shapes) > 100 and rec.quadratic() == []
    model.eval()
    with torch.no_grad(), ShapeRecorder() as rec:
        model.generate(input_ids=ids[:, :L - 4], attention_mask=mask[:, :L - 4], max_new_tokens=4, min_new_tokens=4,
                       do_sample=False, pad_token_id=0)
    assert rec.quadratic() == []
    stock = tiny(tf.LlamaForCausalLM, vocab=64, positions=L, attn_implementation="eager").train()
    with ShapeRecorder() as rec:  # the recorder does see softmax attention
        stock(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
    assert any(s[-2:] == (L, L) for _, s in rec.quadratic())


REMOTE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoPlugin(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_performer" or name.startswith("hf_performer."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, NoPlugin())
    import torch, transformers as tf
    torch.set_num_threads(1)
    work = sys.argv[1]
    ids, mask = torch.load(work + "/inputs.pt")
    info = {}
    for load in (lambda: tf.AutoModelForCausalLM.from_pretrained(work + "/model"),
                 lambda: tf.LlamaForCausalLM.from_pretrained(work + "/model")):
        try:
            load()
            info.setdefault("refused", []).append(None)
        except Exception as e:
            info.setdefault("refused", []).append(f"{type(e).__name__}: {e}")
    model = tf.AutoModelForCausalLM.from_pretrained(work + "/model", trust_remote_code=True).eval()
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                             pad_token_id=0, return_dict_in_generate=True)
    info["class"] = [type(model).__name__, type(model).__module__]
    info["state"] = [list(layer.state.S.shape) for layer in gen.cache.layers]
    info["plugin_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "hf_performer")
    torch.save({"logits": logits, "generated": gen.sequences}, work + "/outputs.pt")
    json.dump(info, open(work + "/info.json", "w"))
    """
)


def test_portable_llama_checkpoint_loads_and_decodes_without_the_plugin(tmp_path):
    model = I.convert_to_performer(tiny(tf.LlamaForCausalLM, vocab=64), PerformerConfig(nb_features=16, seed=2))
    ids = torch.randint(3, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    hf_performer.calibrate_feature_statistics(model, {"input_ids": ids, "attention_mask": mask})
    model.save_pretrained(tmp_path / "model")
    torch.save((ids, mask), tmp_path / "inputs.pt")
    (tmp_path / "remote.py").write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(tmp_path / "remote.py"), str(tmp_path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    info, out = json.loads((tmp_path / "info.json").read_text()), torch.load(tmp_path / "outputs.pt")
    assert info["plugin_modules"] == [] and info["class"][0] == "PerformerLlamaForCausalLM"
    assert info["class"][1].startswith("transformers_modules.")
    assert "trust_remote_code=True" in info["refused"][0]
    assert info["refused"][1] is not None and "favor_attention" in info["refused"][1]  # the stock class refuses
    assert info["state"] == [[2, 2, 16, 8]] * 2  # one running state per key/value head
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    with torch.no_grad():
        assert torch.equal(out["logits"], model(input_ids=ids, attention_mask=mask, use_cache=False).logits)
        assert torch.equal(out["generated"], model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5,
                                                            min_new_tokens=5, do_sample=False, pad_token_id=0))
    assert Path(tmp_path / "model" / "hf_performer_integration_generic.py").is_file()


def test_cli_converts_calibrates_and_reports_albert_per_layer_of_its_shared_attention(tmp_path, capsys):
    """ALBERT's one attention module serves all 3 layers: the statistics step fits it once, attention transfer and the
    report compare each of the 3 calls on its own (teacher) inputs (``capture.call_key``)."""
    tok = tokenizer()
    torch.manual_seed(0)
    cfg = tf.AlbertConfig(vocab_size=len(tok), embedding_size=16, hidden_size=32, num_hidden_layers=3,
                          num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                          pad_token_id=tok.pad_token_id, initializer_range=0.3)
    src = _save(tf.AlbertForMaskedLM(cfg).eval(), tmp_path / "src", 64)
    txt, out = text_file(tmp_path / "t.txt"), tmp_path / "out"
    rc = main([str(a) for a in ("convert", src, out, "--nb-features", 16, "--calibrate", "--train", "attention",
                                "--calibration-data", txt, "--calibration-steps", 2, "--batch-size", 2,
                                "--max-length", 24, "--no-progress")])
    assert rc == 0, capsys.readouterr().err
    model = tf.AutoModelForMaskedLM.from_pretrained(out)
    assert type(model).__name__ == "PerformerAlbertForMaskedLM"
    (favor,) = model.favor_modules()
    assert bool(favor.stats_calibrated)
    log = json.loads((out / "calibration_log.json").read_text())
    assert log["steps_done"] == 2
    stock = tf.AlbertForMaskedLM.from_pretrained(src)
    trained = [n for n, p in model.named_parameters() if not torch.equal(p, stock.get_parameter(n))]
    assert all(".attention." in n for n in trained)  # attention transfer moves attention projections only
    assert bool(trained) != bool(log.get("reverted")), log.get("reverted")
    assert main(["report", str(src), str(out), "--data", str(txt), "--max-length", "24", "--out",
                 str(tmp_path / "report")]) == 0
    errors = json.loads((tmp_path / "report" / "report.json").read_text())["layer_errors"]
    name = "albert.encoder.albert_layer_groups.0.albert_layers.0.attention"
    assert errors["names"] == [name, f"{name}#1", f"{name}#2"]
    assert len(set(errors["teacher_forced"])) == 3 and all(0 < e < 10 for e in errors["teacher_forced"])
