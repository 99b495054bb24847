"""The README.md model card written next to a converted checkpoint.

Its YAML header is built with ``huggingface_hub.ModelCardData`` (what the Hub parses): ``base_model`` (the source's
Hub id, or ``--base-model`` for a local source), ``library_name: transformers``, ``tags``, ``pipeline_tag`` and the
source card's ``license`` and ``language`` when it has them.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from .data import BUILTIN_TEXT

TAGS = ["hf-performer", "performer", "favor+", "linear-attention", "custom_code"]
# the transformers pipeline each Auto class serves
PIPELINES = {
    "AutoModel": "feature-extraction",
    "AutoModelForMaskedLM": "fill-mask",
    "AutoModelForCausalLM": "text-generation",
    "AutoModelForSequenceClassification": "text-classification",
    "AutoModelForTokenClassification": "token-classification",
    "AutoModelForQuestionAnswering": "question-answering",
}
# the loss terms a calibration log records (transfer_loss), what each measures, and the weight that switches it on
LOSS_TERMS = {
    "layer_rel_mse": ("attention outputs: squared error relative to the original's, mean over layers", "layer_weight"),
    "output_kl": ("next-token distributions: KL divergence to the original's, nats/token", "output_weight"),
    "output_cos_dist": ("final hidden states: 1 - cosine to the original's", "output_weight"),
}


def source_card_metadata(location: str, is_local: bool) -> dict:
    """``license`` / ``license_name`` / ``license_link`` / ``language`` / ``pipeline_tag`` of the source's model card
    (its README.md: in the folder, or from the Hub or its cache), and ``title``: its first level-1 heading when that
    is a short name (a local folder called ``model`` may hold a card titled ``all-MiniLM-L6-v2``: the converted card's
    title then names the model, not the folder). {} when there is no readable card."""
    path = Path(location) / "README.md"
    if is_local and not path.is_file():
        return {}
    try:
        card = ModelCard.load(path if is_local else location, ignore_metadata_errors=True)
    except Exception:  # a source card is optional: offline, absent or malformed all mean "unknown"
        return {}
    data = card.data.to_dict()
    keys = ("license", "license_name", "license_link", "language", "pipeline_tag")
    found = {k: data[k] for k in keys if data.get(k)}
    title = next((ln[2:].strip() for ln in card.text.splitlines() if ln.startswith("# ")), "")
    if title and len(title) <= 80 and "`" not in title and "[" not in title:
        found["title"] = title
    return found


def effective_estimator(performer: dict, statistics: bool, causal: bool) -> str:
    """One sentence saying which random features the saved model actually uses.

    After the statistics step with ``aligned_features`` (the default), a layer with a positive kernel uses
    importance-sampled softmax features whatever ``kernel`` says; without statistics, causal favor++ runs with
    A = 0 (its parameter is measured only on calibrated statistics), i.e. plain FAVOR+."""
    kernel = performer["kernel"]
    if kernel == "relu":
        return "Performer-ReLU features (a different kernel from softmax; random projections N(0, I))."
    if kernel == "trig":
        return "trigonometric (sin/cos) random features of the softmax kernel (the Performer paper's baseline)."
    if statistics and performer["aligned_features"]:
        text = ("importance-sampled positive softmax features (`aligned_features`): each layer draws its projections "
                "from a Gaussian mixture fitted to the q + k of the query/key pairs that carry its attention on the "
                "statistics text; unbiased for softmax attention.")
        if kernel != "softmax":
            text += (f" The `kernel` setting ({kernel}) no longer changes the estimator: the aligned features replace "
                     "its features.")
        return text
    if kernel == "favor++" and (statistics or not causal):
        where = "the calibrated per-head statistics" if statistics else "each input's queries and keys"
        return f"FAVOR++ optimal positive random features (Likhosherstov et al. 2022), their parameter set from {where}."
    text = "FAVOR+ positive random features (orthogonal N(0, I) projections) of the softmax kernel."
    if kernel == "favor++":
        text += " (`kernel` favor++ needs the statistics step for causal attention; without it its parameter is 0.)"
    return text


def _yaml(summary: dict) -> str:
    source = summary.get("source_card") or {}
    auto = summary.get("auto_class")
    pipeline = source.get("pipeline_tag") if summary.get("same_task_as_source") else None
    sentence = bool(summary.get("sentence_transformers"))  # the Hub's convention for sentence-transformers folders
    data = ModelCardData(
        base_model=summary.get("base_model"),
        library_name="sentence-transformers" if sentence else "transformers",
        license=source.get("license"),
        license_name=source.get("license_name"),
        license_link=source.get("license_link"),
        language=source.get("language"),
        pipeline_tag=pipeline or PIPELINES.get(auto),
        tags=list(TAGS) + (["sentence-transformers"] if sentence else []),
    )
    return data.to_yaml()


def _sentence_usage(summary: dict) -> list[str]:
    """The SentenceTransformer snippet of a converted sentence-transformers folder (empty for other folders)."""
    modules = (summary.get("sentence_transformers") or {}).get("modules")
    if not modules:
        return []
    return [
        f"A sentence-transformers model ({' -> '.join(modules)}, kept from the source):",
        "",
        "```python",
        "import hf_performer  # without hf-performer: SentenceTransformer(..., trust_remote_code=True)",
        "from sentence_transformers import SentenceTransformer",
        "",
        'model = SentenceTransformer("path/or/hub-id")',
        'embeddings = model.encode(["a sentence", "another one"])',
        "```",
        "",
    ]


def _usage(summary: dict) -> list[str]:
    auto, cls = summary.get("auto_class"), summary["model_class"]
    if auto is None:  # no Auto class serves this model class (e.g. GPT2DoubleHeadsModel): needs hf-performer
        return [
            "```python",
            f"from {summary['model_module']} import {cls}",
            "",
            f'model = {cls}.from_pretrained("path/or/hub-id")',
            "```",
        ]
    return [
        "With hf-performer installed:",
        "",
        "```python",
        "import hf_performer  # registers the Performer model types with transformers",
        f"from transformers import AutoTokenizer, {auto}",
        "",
        f'model = {auto}.from_pretrained("path/or/hub-id")',
        'tokenizer = AutoTokenizer.from_pretrained("path/or/hub-id")',
        "```",
        "",
        "Without it, the folder carries its own modeling code (the `hf_performer_*.py` files, PyTorch and "
        "transformers >= 5 only, generated from hf-performer's source when it was saved); the tokenizer and "
        "pipelines read the config, so they need the flag too:",
        "",
        "```python",
        f'model = {auto}.from_pretrained("path/or/hub-id", trust_remote_code=True)',
        'tokenizer = AutoTokenizer.from_pretrained("path/or/hub-id", trust_remote_code=True)',
        "```",
    ]


def _calibration_lines(cal: dict) -> list[str]:
    """The calibration as losses: each active loss term at the first and last step, the held-out loss."""
    first, last, cfg = cal.get("first") or {}, cal.get("final") or {}, cal["config"]
    losses = [k for k, (_, weight) in LOSS_TERMS.items() if isinstance(last.get(k), float) and cfg.get(weight, 1) > 0]
    if len(losses) > 1 and isinstance(last.get("loss"), float):
        losses.append("loss")
    lines = [
        f"- Calibrated by attention transfer (the converted model trained to reproduce the original, random features "
        f"fixed): {cal['steps_done']} steps in {cal['wall_s']:.3g} s on {cal['device']}, trainable "
        f"`{cal['config']['train']}` ({cal['trainable_parameters']} parameters), peak learning rate {cal['config']['lr']}"
        + (f"; stopped early: {cal['stopped_early']}" if cal.get("stopped_early") else "") + ".",
    ]
    kept = cal.get("best_step")
    if not cal.get("reverted") and kept is not None and kept < cal["steps_done"]:
        lines.append(f"  The saved weights are those after step {kept} of {cal['steps_done']}, where the held-out loss "
                     "was lowest.")
    if losses:
        lines.append("  Training losses, first step → last step:")
        for k in losses:
            start = f"{first[k]:.4g} → " if isinstance(first.get(k), float) else ""
            meaning = LOSS_TERMS[k][0] if k in LOSS_TERMS else (
                f"total: {cfg.get('layer_weight')} x attention term + {cfg.get('output_weight')} x output term")
            lines.append(f"  - `{k}` {start}{last[k]:.4g} ({meaning})")
    if "validation_start" in cal and "validation_end" in cal:
        verdict = (" Calibration made it worse, so the trained parameters were restored to their converted values."
                   if cal.get("reverted") else "")
        lines.append(f"  Held-out end-to-end loss (attention outputs + outputs): {cal['validation_start']:.4g} → "
                     f"{cal['validation_end']:.4g}.{verdict}")
    lines.append("  Full log: `calibration_log.json`.")
    return lines


def model_card(summary: dict) -> str:
    """README.md text (YAML header + markdown) from the ``convert`` summary (conversion.json)."""
    s = summary
    perf = s["performer"]
    base = s.get("base_model")
    name = base.rpartition("/")[2] if base else (s.get("source_card") or {}).get("title") or s["source_name"]
    origin = f"[`{base}`](https://huggingface.co/{base})" if base else f"`{s['source']}`"
    lines = ["---", _yaml(s).rstrip("\n"), "---", "", f"# {name} with Performer FAVOR+ attention", ""]
    lines += [
        f"`{s['model_class']}` converted from {origin} by "
        f"hf-performer {s['hf_performer_version']} on {s['date']}: every softmax attention "
        "layer runs FAVOR+ (softmax attention estimated with positive random features, linear in the sequence "
        "length). Every pretrained weight is kept; the FAVOR+ settings live in `config.json` (`performer`).",
        "",
        "## Use",
        "",
        *_sentence_usage(s),
        *_usage(s),
        "",
        "Attention weights (`output_attentions=True`) are not available: FAVOR+ never forms the attention matrix.",
        "",
        "## FAVOR+ settings",
        "",
        f"Estimator: {effective_estimator(perf, bool(s.get('statistics')), bool(s.get('causal')))}",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    # aligned_features is a setting until the statistics step applies it
    pending = {"aligned_features": " (takes effect at the statistics step, which has not run: see below)"}
    pending = {} if s.get("statistics") else pending
    lines += [f"| `{k}` | `{json.dumps(v)}`{pending.get(k, '') if v else ''} |" for k, v in perf.items()]
    if perf.get("local_window"):
        lines += ["", f"Local window: each query attends to its {perf['local_window']} nearest keys on each side "
                  "(causal: the previous ones) exactly, with softmax terms, and to all other keys through FAVOR+, in one "
                  "normalisation."]
    lines += ["", "## How it was made", ""]
    if s.get("command"):
        lines += ["```bash", s["command"], "```", ""]
    pos = s.get("positions")
    if pos and pos["to"] != pos["from"] and s.get("positions_tiled", True):
        lines.append(f"- Position embeddings extended from {pos['from']} to {pos['to']} tokens by tiling the pretrained "
                     "table (Longformer recipe); the first positions are unchanged.")
    elif pos and pos["to"] != pos["from"]:
        lines.append(f"- Position limit raised from {pos['from']} to {pos['to']} tokens (config and tokenizer): rotary "
                     "positions have no table to extend, and the rotary embedding is the source's.")
    sentence = s.get("sentence_transformers")
    if sentence and sentence.get("max_seq_length") and sentence["max_seq_length"]["to"] != sentence["max_seq_length"]["from"]:
        lengths = sentence["max_seq_length"]
        lines.append(f"- sentence-transformers `max_seq_length` raised from {lengths['from']} to {lengths['to']} tokens "
                     "with the positions.")
    stats = s.get("statistics")
    if stats:
        lines.append(f"- Per-head FAVOR+ statistics (key shift, balance, the proposal of the data-aligned features; causal "
                     "attention and decoding use them) measured on "
                     f"{stats['batches']} batches ({stats['tokens']} tokens) of `{s.get('calibration_data')}`"
                     + (" (English prose: the documentation Python ships)." if s.get("calibration_data") == BUILTIN_TEXT
                        else "."))
    else:
        lines.append("- Zero-shot (`--zero-shot`, no statistics step): per-head statistics are at their identity values "
                     "and the features are not data-aligned (less accurate until "
                     "`hf_performer.calibrate_feature_statistics` runs).")
    cal = s.get("calibration")
    if cal:
        lines += _calibration_lines(cal)
        if perf.get("redraw_interval", 0):
            lines.append("- Note: `redraw_interval` > 0 redraws the random features during fine-tuning; calibration fitted the "
                         "current draw, so a redraw loses part of its gain.")
    else:
        lines.append("- No attention-transfer calibration (`--calibrate`): no weight was trained. FAVOR+ is an "
                     "approximation; check fidelity with `hf-performer report`.")
    lines.append("")
    return "\n".join(lines)
