"""Generation benchmark: per-token decode latency and cache memory vs context length.

A GPT-2 (seeded random init, no download; --layers/--hidden/--heads) with stock SDPA attention and its
KV cache, next to the same weights converted to FAVOR+ with the recurrent FavorCache. For each context
length: prefill the context, then decode --new-tokens tokens one at a time. Reported: median ms per
decoded token, the cache's size after the prefill (tensor bytes: K/V for stock, running sums for FAVOR+),
and the peak memory growth while decoding (conversion.memory.peak_memory: resident-set high-water mark
on CPU, max_memory_allocated on CUDA).

    python benchmarks/bench_generation.py                    # contexts 256 ... 8192
    python benchmarks/bench_generation.py --contexts 256 1024 --device cuda
    python benchmarks/bench_generation.py --compile          # + both through generate(cache_implementation="static")
                                                             #   with its decoding step compiled (torch.compile)

With --compile, each model is also timed through ``generate(cache_implementation="static", compile_config=...)``,
transformers' compiled decoding (on CUDA with CUDA graphs, mode "reduce-overhead"; on a CPU inductor alone): the
median time between consecutive generated tokens, after a warm-up call that compiles.

Writes benchmarks/results/generation.json and generation.md (atomically).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

import hf_performer  # noqa: F401  (registers the Performer model types)
from hf_performer import PerformerConfig, convert_to_performer
from hf_performer.conversion.memory import peak_memory

RESULTS = Path(__file__).resolve().parent / "results"


def cache_bytes(cache) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        state = getattr(layer, "state", None)
        if state is not None:
            total += state.nbytes
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def measure(model, context: int, new_tokens: int, vocab: int, device) -> dict:
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(vocab, (1, context), generator=g).to(device)
    out = model(input_ids=ids, use_cache=True)
    cache, token = out.cache, out.logits[:, -1:].argmax(-1)
    size = cache_bytes(cache)
    times = []

    def decode():
        nonlocal cache, token
        for _ in range(new_tokens):
            start = time.perf_counter()
            step = model(input_ids=token, cache=cache, use_cache=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
            cache, token = step.cache, step.logits[:, -1:].argmax(-1)

    peak, method = peak_memory(decode, device)
    return {"context": context, "ms_per_token": 1e3 * statistics.median(times), "cache_bytes": size,
            "decode_peak_bytes": peak, "memory_method": method, "cache_type": type(cache).__name__}


def measure_compiled(model, context: int, new_tokens: int, vocab: int, device) -> dict:
    """Median ms per decoded token of ``generate`` with a static cache and its decoding step compiled (see the
    module docstring): the time between consecutive calls of a logits processor (one per generated token, run
    eagerly after each forward), after a warm-up call that compiles."""
    from transformers import CompileConfig, LogitsProcessorList

    config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else None)
    config._compile_all_devices = True  # transformers compiles only on accelerators unless asked
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(vocab, (1, context), generator=g).to(device)
    stamps = []

    def stamp(input_ids, scores):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stamps.append(time.perf_counter())
        return scores

    def run(n: int) -> None:
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, cache_implementation="static", compile_config=config,
                       logits_processor=LogitsProcessorList([stamp]))

    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    run(4)  # compiles the decoding step
    stamps.clear()
    run(new_tokens + 1)
    steps = [b - a for a, b in zip(stamps, stamps[1:])]  # one decoding forward (+ greedy selection) each
    # graphs compiled for this context (a model's graphs serve its later calls; one for every step is the aim)
    graphs = counters["stats"]["unique_graphs"] - graphs
    return {"context": context, "ms_per_token": 1e3 * statistics.median(steps), "graphs": graphs}


def table(rows: list[dict]) -> str:
    by = {(r["model"], r["context"]): r for r in rows}
    contexts = sorted({r["context"] for r in rows})
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f}"  # noqa: E731
    lines = ["| context | stock ms/token | stock KV cache MiB | stock decode peak MiB | FAVOR+ ms/token | "
             "FAVOR+ state MiB | FAVOR+ decode peak MiB |", "|---:|---:|---:|---:|---:|---:|---:|"]
    compiled = any(r["model"].endswith("compiled") for r in rows)
    if compiled:
        lines[0] += " stock compiled ms/token | FAVOR+ compiled ms/token |"
        lines[1] += "---:|---:|"
    for c in contexts:
        s, f = by.get(("stock", c)), by.get(("favor", c))
        cells = [str(c)]
        for r in (s, f):
            cells += ["n/a"] * 3 if r is None else [f"{r['ms_per_token']:.1f}", mib(r["cache_bytes"]),
                                                     mib(r["decode_peak_bytes"])]
        if compiled:
            cells += [f"{r['ms_per_token']:.1f}" if (r := by.get((name + " compiled", c))) else "n/a"
                      for name in ("stock", "favor")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Decode peak: how much the process's peak memory grew while decoding the new tokens after the prefill "
              "(the cache's growth over those tokens plus the step's temporaries; on a CPU the resident-set high-water "
              "mark, in whole pages, so small values are coarse), not the cache's size."]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192])
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--nb-features", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--compile", action="store_true",
                   help="also time both through generate() with a static cache and a compiled decoding step")
    p.add_argument("--name", default="generation", help="file name of the results (default generation)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, vocab_size=1000,
                     n_positions=max(args.contexts) + args.new_tokens + 1)
    stock = GPT2LMHeadModel(cfg).eval().to(device)
    favor = convert_to_performer(copy.deepcopy(stock), PerformerConfig(nb_features=args.nb_features)).eval()
    rows = []
    for context in args.contexts:
        for name, model in (("stock", stock), ("favor", favor)):
            row = {"model": name, **measure(model, context, args.new_tokens, cfg.vocab_size, device)}
            rows.append(row)
            print(f"{name:5s} context {context:6d}: {row['ms_per_token']:7.1f} ms/token, cache "
                  f"{row['cache_bytes'] / 2**20:7.2f} MiB ({row['cache_type']})", flush=True)
            if args.compile:
                row = {"model": name + " compiled", **measure_compiled(model, context, args.new_tokens,
                                                                       cfg.vocab_size, device)}
                rows.append(row)
                print(f"{name:5s} context {context:6d}: {row['ms_per_token']:7.1f} ms/token compiled", flush=True)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "nb_features": args.nb_features,
            "new_tokens": args.new_tokens, "device": str(device), "threads": torch.get_num_threads(),
            "compile": args.compile,
            "torch": torch.__version__}
    md = (f"# Generation benchmark\n\nGPT-2 {args.layers} layers, hidden {args.hidden}, {args.heads} heads "
          f"(seeded random init), batch 1, {args.new_tokens} decoded tokens after a prefill of `context` tokens; "
          f"FAVOR+ nb_features {args.nb_features}; {device}, {torch.get_num_threads()} threads."
          + (" Compiled: `generate(cache_implementation=\"static\")` with the decoding step compiled, median ms "
             "between generated tokens (generate's own per-token work included; the eager columns time bare forward "
             "calls)." if args.compile else "") + "\n\n"
          + table(rows) + "\n")
    for name, text in ((args.name + ".json", json.dumps({"meta": meta, "rows": rows}, indent=2)),
                       (args.name + ".md", md)):
        tmp = args.out_dir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out_dir / name)
    print(md)


if __name__ == "__main__":
    main()
