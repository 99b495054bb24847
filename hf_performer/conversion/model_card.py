"""The README.md model card written next to a converted checkpoint."""

from __future__ import annotations

import json


def _loader(model_class: str) -> str:
    if model_class.endswith("LMHeadModel") or model_class.endswith("ForCausalLM"):
        return "AutoModelForCausalLM"
    for suffix in ("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification", "ForQuestionAnswering",
                   "ForMultipleChoice", "ForPreTraining", "ForNextSentencePrediction"):
        if model_class.endswith(suffix):
            return "AutoModel" + suffix
    return "AutoModel"


def model_card(summary: dict) -> str:
    """Markdown with a YAML header from the ``convert`` summary (conversion.json)."""
    s = summary
    perf = s["performer"]
    base = s["source"] if not s.get("source_is_local") else None
    lines = ["---", "library_name: transformers", "tags:", "- performer", "- favor+", "- linear-attention", "- hf-performer"]
    if base:
        lines.append(f"base_model: {base}")
    lines += ["---", "", f"# {s['source_name']} with Performer FAVOR+ attention", ""]
    lines += [
        f"`{s['model_class']}` converted from `{s['source']}` by "
        f"hf-performer {s['hf_performer_version']} on {s['date']}: every softmax attention "
        "layer runs FAVOR+ (softmax attention estimated with positive random features, linear in the sequence "
        "length). Every pretrained weight is kept; the FAVOR+ settings live in `config.json` (`performer`).",
        "",
        "## FAVOR+ settings",
        "",
        "| setting | value |",
        "| --- | --- |",
    ]
    lines += [f"| `{k}` | `{json.dumps(v)}` |" for k, v in perf.items()]
    if perf.get("local_window"):
        lines += ["", f"Local window: each query attends to its {perf['local_window']} nearest keys on each side "
                  "(causal: the previous ones) exactly, with softmax terms, and to all other keys through FAVOR+, in one "
                  "normalisation."]
    lines += ["", "## How it was made", ""]
    if s.get("command"):
        lines += ["```bash", s["command"], "```", ""]
    pos = s.get("positions")
    if pos and pos["to"] != pos["from"]:
        lines.append(f"- Position embeddings extended from {pos['from']} to {pos['to']} tokens by tiling the pretrained "
                     "table (Longformer recipe); the first positions are unchanged.")
    stats = s.get("statistics")
    if stats:
        lines.append(f"- Per-head FAVOR+ statistics (key shift, balance, the proposal of the data-aligned features; causal "
                     "attention and decoding use them) measured on "
                     f"{stats['batches']} batches ({stats['tokens']} tokens) of `{s.get('calibration_data')}`.")
    else:
        lines.append("- No text was given: per-head statistics are at their identity values and the features are not "
                     "data-aligned (less accurate until `hf_performer.calibrate_feature_statistics` runs).")
    cal = s.get("calibration")
    if cal:
        last = cal["final"]
        parts = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if isinstance(v, float))
        lines.append(
            f"- Calibrated by attention transfer (student reproduces the original model, random features fixed): "
            f"{cal['steps_done']} steps, trainable: `{cal['config']['train']}` ({cal['trainable_parameters']} parameters), "
            f"lr {cal['config']['lr']}, {cal['wall_s']:.0f} s on {cal['device']}. Final losses: {parts}. "
            "Log: `calibration_log.json`."
        )
        if perf.get("redraw_interval", 0):
            lines.append("- Note: `redraw_interval` > 0 redraws the random features during fine-tuning; calibration fitted the "
                         "current draw, so a redraw loses part of its gain.")
    else:
        lines.append("- Not calibrated: zero-shot conversion. FAVOR+ is an approximation; check fidelity with "
                     "`hf-performer report`.")
    loader = _loader(s["model_class"])
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "import hf_performer.integration  # registers the Performer model types with transformers",
        f"from transformers import AutoTokenizer, {loader}",
        "",
        f'model = {loader}.from_pretrained("path/to/this/folder")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")',
        "```",
        "",
        "Attention weights (`output_attentions=True`) are not available: FAVOR+ never forms the attention matrix.",
        "",
    ]
    return "\n".join(lines)
