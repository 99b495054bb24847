"""How far float32 causal FAVOR+ strays from float64, next to how far FAVOR+ itself is from softmax.

Why: the causal stabilisers are separable (a per-feature chunk reference, a per-position in-chunk bound, a
per-query row maximum; ``docs/DESIGN.md``, "Stabilisers"), so with feature logits spread over hundreds of nats a
causal row's largest term can fall out of float32's range. Layers after the statistics step meet this first:
their importance weights spread the logits further. This benchmark asks whether that limit matters next to the
estimator's own error, in two parts:

1. **Synthetic heads** (``FavorAttention`` alone, causal, L = 256, chunks of 64, 6 seeds per cell): q, k with
   i.i.d. N(0, scale^2) entries (softmax logits q.k/sqrt(d) of standard deviation scale^2), v ~ N(0, 1), the
   statistics step fitted on the same q, k ("calibrated") or not. Per cell: the float32 output against the float64
   op on the same module ("float32 error": max, mean, and the share of entries off by more than 1e-3), and the
   float64 op against exact causal softmax ("estimator error": mean absolute). Head sizes d / m: 8 / 16 (the
   session-18 fuzz that found the limit), 16 / 32, 32 / 128, 64 / 256 (GPT-2's head size, the default m).
2. **Trained models**, converted with the statistics step on ``python-docs`` (the CLI's default), run on held-out
   text in float32 and float64: the float32 logits against float64's, and the float64 converted logits against the
   unconverted model's (KL of next-token distributions, max |logit difference|, top-1 agreement), with how sharp
   each model's heads are (the largest softmax weight of a query row). ``code-gpt2``: the code GPT-2 of
   ``code_gpt2.py`` on held-out standard library code (512-token windows; diffuse heads after its 1000 steps);
   ``peaked-llama``: ``tiny_llama.py``'s Llama trained without attention dropout, which memorises its text and
   whose attention is very peaked (held-out documentation prose, 256-token windows).

    python benchmarks/float32_causal.py                 # everything: ~10 min, plus training each model once
                                                        # (code GPT-2 17-45 min, peaked Llama ~5 min; both cached)
    python benchmarks/float32_causal.py --models        # synthetic heads only, ~1 minute
    python benchmarks/float32_causal.py --models peaked-llama

Output: ``benchmarks/results/float32-causal.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from results_io import save  # noqa: E402

from hf_performer import FavorAttention, PerformerConfig  # noqa: E402

HEADS = ((8, 16), (16, 32), (32, 128), (64, 256))
SCALES = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
TOLERANCE = 1e-3
SUBJECTS = ("code-gpt2", "peaked-llama")


def exact_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + causal mask) v; q, k, v [B, H, L, d] float64 (L x L: reference only)."""
    L, d = q.shape[-2], q.shape[-1]
    logits = (q @ k.transpose(-1, -2)) / d**0.5
    logits = logits.masked_fill(torch.ones(L, L, dtype=torch.bool).triu(1), float("-inf"))
    return logits.softmax(-1) @ v


def synthetic_cell(d: int, m: int, scale: float, calibrated: bool, seeds: int, length: int = 256) -> dict:
    """One (head size, input scale, statistics step or not) cell over ``seeds`` draws."""
    rows = []
    for seed in range(seeds):
        g = torch.Generator().manual_seed(1000 + seed)
        att = FavorAttention(d, PerformerConfig(nb_features=m, chunk_size=64, seed=seed), num_heads=2)
        q, k = (scale * torch.randn(1, 2, length, d, generator=g, dtype=torch.float64) for _ in range(2))
        v = torch.randn(1, 2, length, d, generator=g, dtype=torch.float64)
        if calibrated:
            att.calibrate_statistics(q.float(), k.float(), causal=True)
        with torch.no_grad():
            ref = att.double()(q, k, v, causal=True)
            out = att.float()(q.float(), k.float(), v.float(), causal=True).double()
        f32 = (out - ref).abs()
        rows.append((f32.max().item(), f32.mean().item(), (f32 > TOLERANCE).double().mean().item(),
                     (ref - exact_causal(q, k, v)).abs().mean().item()))
    n = len(rows)
    return {"d": d, "m": m, "scale": scale, "calibrated": calibrated, "seeds": n,
            "float32_max": max(r[0] for r in rows), "float32_mean": sum(r[1] for r in rows) / n,
            "float32_share_off": sum(r[2] for r in rows) / n, "estimator_mean": sum(r[3] for r in rows) / n}


def peaked_llama(progress: bool) -> Path:
    """The tiny Llama of ``tiny_llama.py`` trained without attention dropout: it memorises its training text and its
    attention becomes very peaked (that module's docstring), the sharp heads this benchmark is about. Trained once
    (1000 steps, a few minutes) and cached next to the code GPT-2."""
    import json

    import code_gpt2
    import tiny_llama
    import transformers as tf

    folder = code_gpt2.cache_root() / "peaked-llama-1000"
    if (folder / "training.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".peaked-llama.", dir=folder.parent))
    train, tok = tiny_llama.train_lm, tiny_llama.compact_tokenizer()
    windows = tiny_llama.packed_windows(tiny_llama.train_documents(), tok, 128)
    config = tf.LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                            tie_word_embeddings=True, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
                            pad_token_id=tok.pad_token_id, attention_dropout=0.0)
    info = train(tf.LlamaForCausalLM, config, tok, windows, tmp, steps=1000, batch_size=8, lr=3e-3, seed=0,
                 progress=progress, desc="train peaked Llama")
    (tmp / "training.json").write_text(json.dumps({k: v for k, v in info.items() if k != "loss_curve"}, indent=1))
    tmp.replace(folder)
    return folder


def subject(name: str, progress: bool) -> tuple[Path, list[str], int]:
    """(model folder, held-out texts, window length) of a trained model: ``code-gpt2`` (``code_gpt2.py``, held-out
    standard library files, 512 tokens) or ``peaked-llama`` (``peaked_llama``, held-out documentation prose, 256)."""
    if name == "code-gpt2":
        import code_gpt2

        return code_gpt2.load_or_train(progress=progress)[0], code_gpt2.code_documents("eval"), 512
    from hf_performer.conversion.corpus import pydoc_paragraphs

    return peaked_llama(progress), ["\n".join(pydoc_paragraphs("eval"))], 256


def model_part(name: str, sequences: int, progress: bool) -> dict:
    """A trained model converted with the statistics step (python-docs, the CLI's default): float32 vs float64 vs
    the unconverted model, and how sharp its heads are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_performer.conversion import convert

    folder, texts, length = subject(name, progress)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    stock = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = []
    for text in texts:
        tokens = tokenizer(text, verbose=False)["input_ids"]
        ids += [tokens[i:i + length] for i in range(0, len(tokens) - length + 1, length)]
        if len(ids) >= sequences:
            break
    batch = torch.tensor(ids[:sequences])
    with torch.no_grad():  # how sharp its heads are: the largest softmax weight of each query row
        probs = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()(
            batch[:2], output_attentions=True).attentions  # per layer [2, H, L, L] (reference only)
        top = torch.stack([a.amax(-1)[:, :, 16:].mean((0, 2)) for a in probs])  # [layers, H] (past the first 16)
        share = torch.stack([(a.amax(-1)[:, :, 16:] > 0.9).double().mean() for a in probs])
    with tempfile.TemporaryDirectory() as tmp:
        convert(folder, Path(tmp) / "out", PerformerConfig(nb_features=256), calibration_data="python-docs",
                progress=progress)
        converted = AutoModelForCausalLM.from_pretrained(Path(tmp) / "out").eval()
    with torch.no_grad():
        teacher = stock.double()(batch).logits
        f64 = converted.double()(batch).logits
        f32 = converted.float()(batch).logits.double()

    def kl(p_logits, q_logits):
        return (p_logits.log_softmax(-1).exp() * (p_logits.log_softmax(-1) - q_logits.log_softmax(-1))).sum(-1)

    def stats(a, b):
        return {"kl_mean": kl(a, b).mean().item(), "kl_max": kl(a, b).max().item(),
                "logit_max_abs": (a - b).abs().max().item(),
                "top1_agreement": (a.argmax(-1) == b.argmax(-1)).double().mean().item()}

    return {"name": name, "model": str(folder.name), "sequences": len(ids[:sequences]), "length": length,
            "float32_vs_float64": stats(f64, f32), "converted_vs_stock": stats(teacher, f64),
            "head_top_weight": top.tolist(), "rows_above_0_9": share.tolist()}


def render(doc: dict) -> str:
    lines = ["# Float32 against float64 in causal FAVOR+ (`benchmarks/float32_causal.py`)", "",
             f"{doc['machine']}; {doc['date']}; commit {doc['commit']}.", "",
             "## Synthetic heads", "",
             f"Causal, L = 256, chunks of 64, mean over {doc['synthetic'][0]['seeds'] if doc['synthetic'] else 0} "
             "seeds. float32: the float32 op against the float64 op of the same module (max, mean |difference|, "
             f"share of outputs off by more than {TOLERANCE:g}); estimator: the float64 op against exact causal "
             "softmax (mean |difference|; outputs are of order 1).", "",
             "| d / m | scale | calibrated | float32 max | float32 mean | share > 1e-3 | estimator mean |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in doc["synthetic"]:
        lines.append(f"| {r['d']} / {r['m']} | {r['scale']:g} | {'yes' if r['calibrated'] else 'no'} | "
                     f"{r['float32_max']:.1e} | {r['float32_mean']:.1e} | {r['float32_share_off']:.3f} | "
                     f"{r['estimator_mean']:.2f} |")
    for model in doc.get("models") or []:
        lines += ["", f"## A trained model: {model['name']}", "",
                  f"`{model['model']}`, converted with the statistics step on python-docs (m = 256), "
                  f"{model['sequences']} held-out windows of {model['length']} tokens. Its heads, by the largest "
                  "softmax weight of a query row (mean over rows past the 16th, per head): "
                  + "; ".join(f"layer {i}: " + ", ".join(f"{x:.2f}" for x in row)
                              for i, row in enumerate(model["head_top_weight"]))
                  + "; rows with a weight above 0.9, per layer: "
                  + ", ".join(f"{x:.0%}" for x in model["rows_above_0_9"]) + ".", "",
                  "| comparison | KL mean | KL max | max abs logit difference | top-1 agreement |", "|---|---:|---:|---:|---:|"]
        for name, key in (("float32 vs float64 (same converted model)", "float32_vs_float64"),
                          ("converted (float64) vs unconverted", "converted_vs_stock")):
            s = model[key]
            lines.append(f"| {name} | {s['kl_mean']:.2e} | {s['kl_max']:.2e} | {s['logit_max_abs']:.2e} | "
                         f"{s['top1_agreement']:.4f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=6, help="draws per synthetic cell")
    p.add_argument("--sequences", type=int, default=8, help="held-out 512-token windows for the model part")
    p.add_argument("--models", nargs="*", default=list(SUBJECTS), choices=SUBJECTS,
                   help="trained models to run (default both; none: synthetic heads only)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--name", default="float32-causal", help="results file name under benchmarks/results/")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.sequences < 1:
        p.error("--seeds and --sequences must be at least 1")
    torch.set_num_threads(args.threads)
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip() or "unknown"
    doc = {"machine": f"{platform.machine()}, {args.threads} threads, torch {torch.__version__}",
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
           "synthetic": [], "models": []}
    for d, m in HEADS:
        for scale in SCALES:
            for calibrated in (False, True):
                doc["synthetic"].append(synthetic_cell(d, m, scale, calibrated, args.seeds))
                save(doc, args.name, render)
    for name in args.models:
        doc["models"].append(model_part(name, args.sequences, not args.no_progress))
        save(doc, args.name, render)
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
