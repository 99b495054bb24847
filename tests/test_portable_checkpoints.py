"""Portable checkpoints: a saved Performer folder loads with ``trust_remote_code=True`` where hf_performer cannot be
imported, with bit-identical outputs, and generates with the recurrent FAVOR+ cache; without the flag transformers
refuses and names it. The remote code is generated from the package's source at save time.

One subprocess (cwd outside the repository, HF_HUB_OFFLINE=1, its own HF_MODULES_CACHE, a meta-path finder that
refuses every ``hf_performer`` import) does all the remote loading; the tests compare what it wrote with the
models of this process. Outputs must be bit-identical: both sides run the same code text on the same weights with
one thread (tensors re-allocated after loading, as in the save/load tests, so memory alignment cannot change the
last bits of tiny GEMMs).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers as tf
from test_conversion_fixtures import minilm_path

import hf_performer
import hf_performer.integration as I
from hf_performer.attention import FavorAttention
from hf_performer.integration.portable import PortableCodeError, flatten_module
from hf_performer.settings import PerformerConfig

pytestmark = pytest.mark.usefixtures("one_thread")

V = 64
IDS = torch.randint(3, V, (2, 9), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[1, 6:] = 0  # the second sequence is padded
NEW = 6


def realigned(model):
    for t in [*model.parameters(), *model.buffers()]:
        t.data = t.data.clone()
    return model


def calibrated(model):
    """Statistics fitted on a batch: the importance-sampled (aligned) features are exercised too."""
    hf_performer.calibrate_feature_statistics(model, {"input_ids": IDS, "attention_mask": MASK})
    return model.eval()


def tiny_bert():
    torch.manual_seed(0)
    cfg = tf.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                        max_position_embeddings=32, initializer_range=0.2, num_labels=3)
    model = I.convert_to_performer(tf.BertForSequenceClassification(cfg), PerformerConfig(nb_features=16, kernel="favor++"))
    return calibrated(model)


def tiny_gpt2():
    torch.manual_seed(0)
    cfg = tf.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=32, initializer_range=0.3,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = I.convert_to_performer(tf.GPT2LMHeadModel(cfg), PerformerConfig(nb_features=16, local_window=2))
    return calibrated(model)


def tiny_roberta():
    torch.manual_seed(0)
    cfg = tf.RobertaConfig(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=32, max_position_embeddings=40, initializer_range=0.2)
    return calibrated(I.convert_to_performer(tf.RobertaForMaskedLM(cfg), PerformerConfig(nb_features=16)))


def tiny_distilbert():
    torch.manual_seed(0)
    cfg = tf.DistilBertConfig(vocab_size=V, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32,
                              initializer_range=0.2)
    model = tf.DistilBertForSequenceClassification(cfg)
    return calibrated(I.convert_to_performer(model, PerformerConfig(nb_features=16, local_window=1)))


def tiny_llama_classifier():
    """A head transformers builds from GenericForSequenceClassification: its body comes from AutoModel.from_config."""
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.2, num_labels=3,
                         pad_token_id=0)
    model = tf.LlamaForSequenceClassification(cfg)
    return calibrated(I.convert_to_performer(model, PerformerConfig(nb_features=16)))


OTHER_FAMILIES = {"roberta": "AutoModelForMaskedLM", "distilbert": "AutoModelForSequenceClassification",
                  "llama": "AutoModelForSequenceClassification"}

REMOTE = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoPlugin(importlib.abc.MetaPathFinder):  # hf_performer is not installed here
        def find_spec(self, name, path=None, target=None):
            if name == "hf_performer" or name.startswith("hf_performer."):
                raise ModuleNotFoundError(f"No module named {name!r} (blocked)")

    sys.meta_path.insert(0, NoPlugin())
    import torch, transformers as tf
    torch.set_num_threads(1)
    work = sys.argv[1]
    ids, mask = torch.load(work + "/inputs.pt")
    out, info = {}, {}

    def realigned(model):
        for t in [*model.parameters(), *model.buffers()]:
            t.data = t.data.clone()
        return model.eval()

    for auto in ("AutoModelForSequenceClassification", "AutoConfig"):  # without trust_remote_code
        try:
            getattr(tf, auto).from_pretrained(work + "/bert")
            info[auto + " refused"] = None
        except Exception as e:
            info[auto + " refused"] = f"{type(e).__name__}: {e}"

    try:  # the tokenizer reads config.json (AutoConfig) too
        tf.AutoTokenizer.from_pretrained(work + "/bert")
        info["AutoTokenizer refused"] = None
    except Exception as e:
        info["AutoTokenizer refused"] = f"{type(e).__name__}: {e}"
    tokenizer = tf.AutoTokenizer.from_pretrained(work + "/bert", trust_remote_code=True)
    info["tokens"] = tokenizer("hello world")["input_ids"]
    bert = realigned(tf.AutoModelForSequenceClassification.from_pretrained(work + "/bert", trust_remote_code=True))
    base = realigned(tf.AutoModel.from_pretrained(work + "/bert", trust_remote_code=True))
    gpt = realigned(tf.AutoModelForCausalLM.from_pretrained(work + "/gpt2", trust_remote_code=True))
    with torch.no_grad():
        out["bert"] = bert(input_ids=ids, attention_mask=mask).logits
        out["bert_base"] = base(input_ids=ids, attention_mask=mask).last_hidden_state
        out["gpt2"] = gpt(input_ids=ids, attention_mask=mask).logits
        gen = gpt.generate(input_ids=ids[:, :5], max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           pad_token_id=0, return_dict_in_generate=True)
        for family, auto in (("roberta", "AutoModelForMaskedLM"), ("distilbert", "AutoModelForSequenceClassification"),
                             ("llama", "AutoModelForSequenceClassification")):
            model = realigned(getattr(tf, auto).from_pretrained(work + "/" + family, trust_remote_code=True))
            out[family] = model(input_ids=ids, attention_mask=mask).logits
    out["gpt2_generated"] = gen.sequences
    info["cache_layers"] = [[type(layer).__name__, bool(layer.recurrent), layer.state is not None]
                            for layer in gen.past_key_values.layers]
    info["classes"] = {k: [type(m).__name__, type(m).__module__] for k, m in (("bert", bert), ("gpt2", gpt))}
    bert.save_pretrained(work + "/bert_resaved")  # saved again from the remote code itself
    # Trainer's label smoothing shifts a causal LM's labels only for the class names transformers lists as causal LMs
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from transformers.trainer_pt_utils import LabelSmoother

    args = tf.TrainingArguments(output_dir=work + "/trainer", label_smoothing_factor=0.1, use_cpu=True,
                                report_to="none")
    with torch.no_grad():
        smoothed = tf.Trainer(model=gpt, args=args).compute_loss(gpt, {"input_ids": ids, "labels": ids})
        logits = gpt(input_ids=ids)
        info["label_smoothing"] = [float(smoothed), float(LabelSmoother(0.1)(logits, ids, shift_labels=True)),
                                   float(LabelSmoother(0.1)(logits, ids))]
    info["causal_lm_names"] = sorted(n for n in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() if "Performer" in n)
    info["plugin_modules"] = sorted(m for m in sys.modules if m.split(".")[0] == "hf_performer")
    # then the plugin arrives in the same process (its own cache layer class is registered): still generates
    sys.meta_path.remove(next(f for f in sys.meta_path if isinstance(f, NoPlugin)))
    sys.path.insert(0, sys.argv[2])
    import hf_performer
    with torch.no_grad():
        out["gpt2_generated_after_import"] = gpt.generate(input_ids=ids[:, :5], max_new_tokens=6, min_new_tokens=6,
                                                          do_sample=False, pad_token_id=0)
    info["plugin_file"] = hf_performer.__file__
    # the plugin's functions take a model whose layers are the folder's copies (they refused it: no FavorAttention)
    api = {}
    for name, call in (("run_start_draws", lambda: hf_performer.run_start_draws(gpt, 0)),
                       ("calibrate", lambda: hf_performer.calibrate_feature_statistics(
                           gpt, {"input_ids": ids, "attention_mask": mask})),
                       ("redraw", lambda: hf_performer.redraw_features(gpt)),
                       ("convert", lambda: hf_performer.convert_to_performer(gpt))):
        try:
            api[name] = repr(call())
        except Exception as e:
            api[name] = f"{type(e).__name__}: {e}"
    info["plugin_api_on_remote_model"] = api
    info["remote_layers_after"] = [[int(m.draw_count), bool(m.stats_calibrated)] for m in gpt.modules()
                                   if type(m).__name__ == "FavorAttention"]
    torch.save(out, work + "/outputs.pt")
    with open(work + "/info.json", "w") as f:
        json.dump(info, f)
    """
)


@pytest.fixture(scope="module")
def remote(tmp_path_factory):
    """Save the tiny converted models, load them in a process that cannot import hf_performer."""
    work = tmp_path_factory.mktemp("portable")
    models = {"bert": tiny_bert(), "gpt2": tiny_gpt2(), "roberta": tiny_roberta(), "distilbert": tiny_distilbert(),
              "llama": tiny_llama_classifier()}
    for name, model in models.items():
        model.save_pretrained(work / name)
    tf.AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(work / "bert")
    torch.save((IDS, MASK), work / "inputs.pt")
    (work / "remote.py").write_text(REMOTE)
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(work / "modules"), OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(work / "remote.py"), str(work), str(repo)], cwd=work, env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not str(work).startswith(str(repo))
    return work, models, torch.load(work / "outputs.pt"), json.loads((work / "info.json").read_text())


def test_the_remote_process_never_imported_the_plugin(remote):
    _, _, _, info = remote
    assert info["plugin_modules"] == []
    for name, (cls, module) in info["classes"].items():
        assert cls.startswith("Performer") and module.startswith("transformers_modules."), (name, cls, module)


def test_bert_loads_without_the_plugin_with_identical_outputs(remote):
    work, models, out, _ = remote
    local = realigned(tf.AutoModelForSequenceClassification.from_pretrained(work / "bert"))
    with torch.no_grad():
        logits = local(input_ids=IDS, attention_mask=MASK).logits
        hidden = local.bert(input_ids=IDS, attention_mask=MASK).last_hidden_state
        original = models["bert"](input_ids=IDS, attention_mask=MASK).logits
    assert torch.equal(out["bert"], logits)
    assert torch.equal(out["bert_base"], hidden)  # AutoModel on a task checkpoint: the encoder, as for stock BERT
    torch.testing.assert_close(out["bert"], original, rtol=1e-6, atol=1e-6)  # the in-memory model before saving


def test_gpt2_generates_without_the_plugin_with_the_recurrent_cache(remote):
    work, models, out, info = remote
    local = realigned(tf.AutoModelForCausalLM.from_pretrained(work / "gpt2"))
    with torch.no_grad():
        assert torch.equal(out["gpt2"], local(input_ids=IDS, attention_mask=MASK).logits)
        generated = local.generate(input_ids=IDS[:, :5], max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                   pad_token_id=0)
    assert torch.equal(out["gpt2_generated"], generated)
    assert len(set(generated[:, 5:].flatten().tolist())) > 1
    assert info["cache_layers"] == [["FavorCacheLayer", True, True]] * 2  # constant-size FAVOR+ state per layer
    # the same remote-code model after `import hf_performer` in its process (the package's cache layers)
    assert info["plugin_file"].startswith(str(Path(__file__).resolve().parents[1]))
    assert torch.equal(out["gpt2_generated_after_import"], generated)


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_load_without_the_plugin_too(remote, family):
    work, _, out, _ = remote
    local = realigned(getattr(tf, OTHER_FAMILIES[family]).from_pretrained(work / family))
    with torch.no_grad():
        assert torch.equal(out[family], local(input_ids=IDS, attention_mask=MASK).logits)


def test_trainer_label_smoothing_shifts_the_remote_causal_lms_labels(remote):
    """A causal LM loaded through its folder's code is smoothed against the next token, as with the plugin: the
    folder's code lists its Performer causal LMs among transformers' causal-LM names (Trainer reads them; before,
    it smoothed against the current token, found by a bug-hunt helper)."""
    *_, info = remote
    trainer, shifted, unshifted = info["label_smoothing"]
    assert abs(shifted - unshifted) > 1e-3  # the check can tell them apart
    assert trainer == pytest.approx(shifted, rel=1e-6)
    assert {"PerformerGPT2LMHeadModel", "PerformerLlamaForCausalLM"} <= set(info["causal_lm_names"])


def test_without_trust_remote_code_loading_names_the_fix(remote):
    _, _, _, info = remote
    for auto in ("AutoModelForSequenceClassification", "AutoConfig"):
        message = info[auto + " refused"]
        assert message is not None and "trust_remote_code=True" in message, message
    # AutoTokenizer falls back to the base config class, which refuses the layer types (not the flag's message)
    assert info["AutoTokenizer refused"] is not None and "favor_attention" in info["AutoTokenizer refused"]


def test_the_tokenizer_loads_with_the_flag(remote):
    work = remote[0]
    assert remote[3]["tokens"] == tf.AutoTokenizer.from_pretrained(work / "bert")("hello world")["input_ids"]


def test_a_model_loaded_from_remote_code_saves_a_portable_folder_again(remote):
    work, _, out, _ = remote
    again = work / "bert_resaved"
    assert json.loads((again / "config.json").read_text())["auto_map"] == \
        json.loads((work / "bert" / "config.json").read_text())["auto_map"]
    for name in os.listdir(work / "bert"):
        if name.endswith(".py"):
            assert (again / name).read_text() == (work / "bert" / name).read_text(), name
    local = realigned(tf.AutoModelForSequenceClassification.from_pretrained(again))
    with torch.no_grad():
        assert torch.equal(local(input_ids=IDS, attention_mask=MASK).logits, out["bert"])


def _code_without_imports(text: str) -> str:
    tree = ast.parse(text)
    for node in ast.walk(tree):
        if hasattr(node, "body") and isinstance(node.body, list):
            node.body = [n for n in node.body if not isinstance(n, (ast.Import, ast.ImportFrom))] or [ast.Pass()]
    return ast.dump(tree)


def test_the_plugin_api_takes_a_model_loaded_through_its_folder_code(remote):
    """A model loaded with trust_remote_code before hf_performer was imported holds the folder's copy of
    FavorAttention: the plugin's functions found "no FavorAttention layers" and told the user to convert it, which
    failed too (found in a bug hunt). They accept those layers now; conversion names the model as converted."""
    _, _, _, info = remote
    api = info["plugin_api_on_remote_model"]
    assert "no FavorAttention layers" not in str(api), api
    assert "has redraw_interval=0" in api["run_start_draws"]  # the layers are found (this model never redraws)
    assert api["calibrate"] == "2" and api["redraw"] == "2", api
    assert "already runs FAVOR+ attention" in api["convert"], api
    assert info["remote_layers_after"] == [[1, True], [1, True]]


def test_remote_code_is_the_package_source_with_flat_imports(remote):
    work = remote[0]
    auto_map = json.loads((work / "bert" / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "hf_performer_integration_bert.PerformerBertConfig"
    assert auto_map["AutoModelForSequenceClassification"] == \
        "hf_performer_integration_bert.PerformerBertForSequenceClassification"
    assert auto_map["AutoModelForMaskedLM"] == "hf_performer_integration_bert.PerformerBertForMaskedLM"
    files = {p.name for p in (work / "bert").glob("*.py")}
    package = Path(hf_performer.__file__).parent
    # BERT needs the attention module, features, settings and every op; nothing of the other families or tools
    assert {"hf_performer_attention.py", "hf_performer_features.py", "hf_performer_settings.py",
            "hf_performer_ops.py"} <= files
    assert {f"hf_performer_ops_{p.stem}.py" for p in (package / "ops").glob("*.py") if p.stem != "__init__"} <= files
    assert not any(("gpt2" in f or "distilbert" in f or "registry" in f or "conversion" in f or "training" in f)
                   for f in files)
    for name in files:
        text = (work / "bert" / name).read_text()
        parts = name.removesuffix(".py").split("_")[2:]  # hf_performer_ops_common -> ops, common
        candidates = [package.joinpath(*parts[:i], "_".join(parts[i:]) + ".py") for i in range(len(parts))]
        candidates.append(package.joinpath(*parts, "__init__.py"))
        source = next(p for p in candidates if p.is_file())
        assert _code_without_imports(text) == _code_without_imports(source.read_text()), name
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and f"{node.module}.py" in files, (name, node.module)
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                top = (node.module or "") if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert top.split(".")[0] != "hf_performer", name


def test_loaded_with_the_plugin_the_registered_classes_win(remote):
    work = remote[0]
    model = tf.AutoModelForSequenceClassification.from_pretrained(work / "bert", trust_remote_code=True)
    assert type(model) is I.bert.PerformerBertForSequenceClassification
    assert all(isinstance(m, FavorAttention) for m in model.favor_modules())


@pytest.mark.parametrize(
    "code, problem",
    [
        ("from . import settings\n", "from . import name"),
        ("import hf_performer.settings\n", "cannot be flattened"),
        ("from hf_performer import __version__\n", "top-level"),
        ("from .ops import naive\n", "import submodules directly"),
        ("import os; from .settings import PerformerConfig\n", "shares its line"),
    ],
)
def test_imports_that_cannot_be_flattened_are_refused(tmp_path, monkeypatch, code, problem):
    path = tmp_path / "probe.py"
    path.write_text(code.replace("from .ops", "from ..ops").replace("from .settings", "from ..settings"))
    module = type(sys)("hf_performer.integration.probe")
    module.__file__ = str(path)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    with pytest.raises(PortableCodeError, match=problem):
        flatten_module(module.__name__)


@pytest.mark.parametrize("code, problem", [
    ("import scipy\n", "scipy"),  # transformers would refuse it on a machine without scipy
    ("from .hf_performer_missing import x\n", "not flat sibling files"),
    ('"""Docs.\n\n    from .example import thing\n"""\n', "not flat sibling files"),  # transformers' regex sees it
])
def test_written_code_is_checked_with_transformers_own_import_scans(tmp_path, code, problem):
    from hf_performer.integration.portable import _check_written

    (tmp_path / "hf_performer_probe.py").write_text("import math\nimport torch\n" + code)
    with pytest.raises(PortableCodeError, match=problem):
        _check_written(tmp_path, {"hf_performer_probe.py"})


def test_a_save_that_cannot_be_made_portable_writes_nothing(tmp_path, monkeypatch):
    import hf_performer.integration.portable as portable

    monkeypatch.setattr(portable, "REMOTE_DEPENDENCIES", {"torch", "huggingface_hub"})  # as if transformers were foreign
    with pytest.raises(PortableCodeError, match="transformers"):
        tiny_gpt2().save_pretrained(tmp_path / "out")
    assert [p.name for p in (tmp_path / "out").iterdir()] == []  # no code, no staging folder, no config or weights
