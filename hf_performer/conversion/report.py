"""``report``: fidelity of a converted checkpoint against its source, on given text.

Writes ``report.json``, ``report.md`` and ``layer_errors.png`` (relative error of attention outputs per
layer, matplotlib Agg) into ``out_dir``:

* per layer: relative error of attention outputs, teacher-forced and in-model (see ``metrics.layer_errors``);
* encoders: mean cosine of mean-pooled embeddings, Spearman of pairwise cosine similarities;
* causal LMs: perplexity of both models, KL(teacher || student) per token;
* forward time (median of ``repeats``) and peak memory at a few lengths, batch 1, both models (a length
  beyond a model's position table is skipped for that model).
"""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import torch

from hf_performer.integration.registry import FAMILIES

from .calibrate import output_kind
from .capture import forward_kwargs
from .data import BatchSchedule, pad_id, read_texts, tokenize
from .errors import ConversionError
from .memory import peak_memory
from .metrics import causal_metrics, encoder_metrics, layer_errors
from .positions import max_tokens
from .source import inspect_source, load_model

DEFAULT_LENGTHS = (128, 512, 2048)


def load_converted(path: str | os.PathLike):
    """(Performer model, its config's stock class name) from a converted folder."""
    from transformers import AutoConfig

    folder = Path(os.path.expanduser(str(path)))
    if not (folder / "config.json").is_file():
        raise ConversionError(f"converted checkpoint {str(path)!r}: no such folder with a config.json.")
    config = AutoConfig.from_pretrained(folder)
    family = config.model_type.removeprefix("performer_")
    if not config.model_type.startswith("performer_") or family not in FAMILIES:
        raise ConversionError(f"{str(path)!r} is not a Performer checkpoint (model_type {config.model_type!r}).")
    stock = {c.__name__: p for c, p in FAMILIES[family][1].items()}
    arch = (config.architectures or [None])[0] or ""
    stock_name = arch.removeprefix("Performer")
    if stock_name not in stock:
        raise ConversionError(f"{str(path)!r}: unknown architecture {arch!r}.")
    return stock[stock_name].from_pretrained(folder).eval(), stock_name


def _load_tokenizer(*locations):
    from transformers import AutoTokenizer

    for loc in locations:
        try:
            return AutoTokenizer.from_pretrained(loc)
        except (OSError, ValueError, TypeError):
            continue
    raise ConversionError("neither the converted checkpoint nor the source has a tokenizer.")


@torch.no_grad()
def time_and_memory(model, length: int, repeats: int = 3, vocab: int = 1000) -> dict:
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(length)
    ids = torch.randint(5, max(6, min(vocab, 1000)), (1, length), generator=g).to(device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    call = lambda: model(**batch, **forward_kwargs(model))
    call()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak, method = peak_memory(call, device)
    return {"length": length, "time_ms": 1000 * statistics.median(times),
            "peak_mib": None if peak is None else peak / 2**20, "memory_method": method}


def _layer_plot(errors: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(errors["names"])))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(x, errors["teacher_forced"], "o-", label="teacher-forced (own error)")
    ax.plot(x, errors["in_model"], "s--", label="in-model (accumulated)")
    ax.set_xlabel("attention layer")
    ax.set_ylabel("relative error of attention output")
    ax.set_xticks(x)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "n/a"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def render_markdown(r: dict) -> str:
    lines = [f"# Fidelity report: `{r['converted']}` vs `{r['source']}`", "",
             f"Text: `{r['data']}` — {r['texts']} texts, {r['sequences']} sequences of at most {r['max_length']} tokens. "
             f"Model: {r['model_class']} ({r['output_kind']}).", "", "## End to end", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in r["end_to_end"].items()]
    lines += ["", "## Attention output error per layer", "",
              "Relative error ||converted − original|| / ||original|| over real tokens. Teacher-forced: the converted "
              "layer runs on the original model's inputs (its own approximation error); in-model: both models run "
              "freely (errors accumulate).", "", "| layer | module | teacher-forced | in-model |", "| --- | --- | --- | --- |"]
    e = r["layer_errors"]
    lines += [f"| {i} | `{n}` | {tf:.3f} | {im:.3f} |" for i, (n, tf, im) in enumerate(zip(e["names"], e["teacher_forced"], e["in_model"]))]
    lines += ["", "![error per layer](layer_errors.png)", ""]
    if r.get("timing"):
        lines += ["## Forward time and peak memory (batch 1)", "", "| length | original ms | converted ms | original MiB | converted MiB |",
                  "| --- | --- | --- | --- | --- |"]
        for row in r["timing"]:
            o, c = row.get("original") or {}, row.get("converted") or {}
            lines.append(f"| {row['length']} | {_fmt(o.get('time_ms'), 1)} | {_fmt(c.get('time_ms'), 1)} | "
                         f"{_fmt(o.get('peak_mib'), 1)} | {_fmt(c.get('peak_mib'), 1)} |")
        methods = {m["memory_method"] for row in r["timing"] for m in (row["original"], row["converted"]) if m}
        lines += ["", f"Device: {r['device']}, {r['torch_threads']} threads; peak memory: {', '.join(sorted(methods))}. "
                  "A length beyond a model's position table is n/a.", ""]
    return "\n".join(lines)


def report(
    source: str | os.PathLike,
    converted: str | os.PathLike,
    data: str | os.PathLike,
    out_dir: str | os.PathLike | None = None,
    *,
    max_texts: int | None = None,
    max_length: int = 128,
    batch_size: int = 8,
    lengths: tuple[int, ...] | None = DEFAULT_LENGTHS,
    repeats: int = 3,
    progress: bool = True,
) -> dict:
    """Compare ``converted`` with ``source`` on ``data``; write report.json/.md/.png to ``out_dir``
    (default ``<converted>/fidelity_report``). Returns the report dict."""
    if max_texts is not None and max_texts < 2:
        raise ConversionError(f"max_texts={max_texts}: need at least 2 texts.")
    if max_length < 4 or batch_size < 1:
        raise ConversionError("max_length must be >= 4 and batch_size >= 1.")
    student, stock_name = load_converted(converted)
    src = inspect_source(source, stock_name)
    texts = read_texts(data)[:max_texts]
    teacher = load_model(src)
    tokenizer = _load_tokenizer(converted, src.location)
    length = min(max_length, max_tokens(src.config))
    schedule = BatchSchedule(tokenize(texts, tokenizer, length), batch_size, pad_id(tokenizer))
    batches = schedule.epoch()
    kind = output_kind(student)
    errors = layer_errors(student, teacher, batches, progress)
    if kind == "logits":
        end = causal_metrics(student, teacher, batches, progress)
    else:
        end = encoder_metrics(student, teacher, batches, progress)
    timing = []
    for L in lengths or ():
        row = {"length": L}
        for key, model, cfg in (("original", teacher, src.config), ("converted", student, student.config)):
            row[key] = time_and_memory(model, L, repeats, cfg.vocab_size) if L <= max_tokens(cfg) else None
        timing.append(row)
    result = {
        "source": str(source), "converted": str(converted), "data": str(data), "texts": len(texts),
        "sequences": len(schedule.sequences), "tokens": schedule.num_tokens, "max_length": length,
        "model_class": type(student).__name__, "output_kind": kind, "performer": student.config.performer,
        "end_to_end": end, "layer_errors": errors, "timing": timing,
        "device": str(next(student.parameters()).device), "torch_threads": torch.get_num_threads(),
    }
    out = Path(out_dir) if out_dir is not None else Path(os.path.expanduser(str(converted))) / "fidelity_report"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    (out / "report.md").write_text(render_markdown(result))
    _layer_plot(errors, out / "layer_errors.png")
    result["out_dir"] = str(out)
    return result
