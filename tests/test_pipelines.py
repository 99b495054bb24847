"""transformers pipelines on converted folders (``hf_performer.conversion.convert`` of tiny checkpoints saved with
the real WordPiece tokenizer): feature-extraction, fill-mask, text-classification and text-generation load the
Performer classes and give what the model gives when called directly, one text at a time and in padded batches."""

from __future__ import annotations

import pytest
import torch
import transformers as tf
from test_conversion_fixtures import tiny_bert, tiny_gpt2

import hf_performer  # noqa: F401 - registers the Performer model types
from hf_performer.conversion import convert

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["Hello world.", "The module provides functions for working with dates and times in many formats.", "x"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    sources = {"base": tiny_bert(root / "base", cls=tf.BertModel), "mlm": tiny_bert(root / "mlm"),
               "cls": tiny_bert(root / "cls", cls=tf.BertForSequenceClassification), "gpt2": tiny_gpt2(root / "gpt2")}
    out = {}
    for name, src in sources.items():
        out[name] = root / f"{name}-performer"
        convert(src, out[name], {"nb_features": 16, "seed": 0}, progress=False)
    return out


def direct(folder, auto):
    return tf.AutoTokenizer.from_pretrained(folder), auto.from_pretrained(folder).eval()


def test_feature_extraction(folders):
    pipe = tf.pipeline("feature-extraction", model=str(folders["base"]))
    assert type(pipe.model).__name__ == "PerformerBertModel"
    tok, model = direct(folders["base"], tf.AutoModel)
    batched = pipe(TEXTS, batch_size=len(TEXTS))  # padded to the longest text
    for text, got in zip(TEXTS, batched):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            want = model(**enc).last_hidden_state  # [1, L, 32]
        n = want.shape[1]
        torch.testing.assert_close(torch.tensor(pipe(text)), want, rtol=0, atol=1e-5)
        torch.testing.assert_close(torch.tensor(got)[:, :n], want, rtol=0, atol=1e-5)  # padding changes nothing


def test_fill_mask(folders):
    pipe = tf.pipeline("fill-mask", model=str(folders["mlm"]))
    assert type(pipe.model).__name__ == "PerformerBertForMaskedLM"
    tok, model = direct(folders["mlm"], tf.AutoModelForMaskedLM)
    texts = ["Hello [MASK].", "The module provides [MASK] for working with dates and times."]
    for text, got in zip(texts, pipe(texts, top_k=3, batch_size=2)):
        enc = tok(text, return_tensors="pt")
        with torch.no_grad():
            logits = model(**enc).logits[0, enc["input_ids"][0].tolist().index(tok.mask_token_id)]
        probs, ids = logits.softmax(-1).topk(3)
        assert [r["token"] for r in got] == ids.tolist()
        torch.testing.assert_close(torch.tensor([r["score"] for r in got]), probs, rtol=1e-4, atol=1e-7)


def test_text_classification(folders):
    pipe = tf.pipeline("text-classification", model=str(folders["cls"]))
    assert type(pipe.model).__name__ == "PerformerBertForSequenceClassification"
    tok, model = direct(folders["cls"], tf.AutoModelForSequenceClassification)
    for text, got in zip(TEXTS, pipe(TEXTS, top_k=None, batch_size=len(TEXTS))):
        with torch.no_grad():
            probs = model(**tok(text, return_tensors="pt")).logits[0].softmax(-1)
        by_label = {r["label"]: r["score"] for r in got}
        want = {model.config.id2label[i]: p for i, p in enumerate(probs.tolist())}
        assert by_label.keys() == want.keys()
        torch.testing.assert_close(torch.tensor([by_label[k] for k in want]), torch.tensor(list(want.values())),
                                   rtol=1e-4, atol=1e-6)


def greedy_without_cache(model, ids, steps, eos):
    """Greedy decoding by full forwards (no cache: the recurrent FAVOR+ state is not involved), eos banned as
    ``min_new_tokens`` does."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits[0, -1]
        logits[eos] = -float("inf")
        ids = torch.cat([ids, logits.argmax().view(1, 1)], dim=1)
    return ids[0].tolist()


def test_text_generation(folders):
    pipe = tf.pipeline("text-generation", model=str(folders["gpt2"]))
    assert type(pipe.model).__name__ == "PerformerGPT2LMHeadModel"
    tok, model = direct(folders["gpt2"], tf.AutoModelForCausalLM)
    kwargs = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_tensors=True)
    batched = pipe(TEXTS, batch_size=len(TEXTS), **kwargs)  # left-padded batch
    for text, got in zip(TEXTS, batched):
        prompt = tok(text, return_tensors="pt")["input_ids"]
        want = greedy_without_cache(model, prompt, 6, model.generation_config.eos_token_id)
        assert pipe(text, **kwargs)[0]["generated_token_ids"] == want
        assert [t for t in got[0]["generated_token_ids"] if t != tok.pad_token_id] == want
    text = pipe(TEXTS[0], max_new_tokens=6, min_new_tokens=6, do_sample=False, return_full_text=False)[0]
    prompt = tok(TEXTS[0])["input_ids"]
    new = greedy_without_cache(model, torch.tensor([prompt]), 6, model.generation_config.eos_token_id)[len(prompt):]
    assert text["generated_text"].strip() == tok.decode(new, skip_special_tokens=True)
