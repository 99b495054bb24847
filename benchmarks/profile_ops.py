"""Where the time of one FavorAttention forward + backward goes: torch.profiler's top kernels (or CPU ops).

Batch 1, 8 heads, d = 64, m = 256, statistics calibrated; bidirectional and causal; one warm-up call, then one
profiled call. Writes benchmarks/results/profile-<device>.json and .md (top --top ops by device time).

    python benchmarks/profile_ops.py --device cuda --length 16384 --dtype bfloat16
    python benchmarks/profile_ops.py --device cpu --length 2048 --dtype float32      # smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import atomic_write  # noqa: E402

from hf_performer import FavorAttention, PerformerConfig  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def profile_case(device, dtype, L: int, causal: bool, top: int) -> dict:
    g = torch.Generator().manual_seed(0)
    q, k, v, go = (0.5 * torch.randn(1, 8, L, 64, generator=g) for _ in range(4))
    att = FavorAttention(64, PerformerConfig(nb_features=256), num_heads=8)
    att.calibrate_statistics(q[:, :, :1024], k[:, :, :1024], causal=causal)
    att = att.to(device)
    q, k, v, go = (t.to(device, dtype) for t in (q, k, v, go))
    x = [t.clone().requires_grad_(True) for t in (q, k, v)]

    def call():
        att(*x, causal=causal).backward(go)

    call()  # warm-up
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        call()
        if cuda:
            torch.cuda.synchronize()
    key = "device_time_total" if cuda else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, key, 0) > 0]
    events.sort(key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) / 1000 if cuda else sum(e.self_cpu_time_total for e in events) / 1000
    rows = [{"name": e.key[:90], "calls": e.count, "ms": getattr(e, key) / 1000} for e in events[:top]]
    if cuda:  # device kernels only (the aten rows repeat their kernels' time)
        kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        per = {}
        for e in kernels:
            s = per.setdefault(e.name[:90], [0, 0.0])
            s[0] += 1
            s[1] += e.device_time_total / 1000 if hasattr(e, "device_time_total") else e.cuda_time_total / 1000
        rows = [{"name": n, "calls": c, "ms": t} for n, (c, t) in sorted(per.items(), key=lambda kv: -kv[1][1])[:top]]
        total = sum(t for _, t in per.values())
        launches = sum(c for c, _ in per.values())
    else:
        launches = None
    return {"mode": "causal" if causal else "bidirectional", "L": L, "dtype": str(dtype).removeprefix("torch."),
            "total_ms": total, "kernel_launches": launches, "top": rows}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--length", type=int, default=16384)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cases = [profile_case(device, dtype, args.length, causal, args.top) for causal in (False, True)]
    doc = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "cases": cases}
    lines = [f"# Profile of FavorAttention forward + backward ({doc['device']}, torch {doc['torch']})", ""]
    for c in cases:
        lines += [f"## {c['mode']}, L = {c['L']}, {c['dtype']}: {c['total_ms']:.2f} ms of device time"
                  + (f", {c['kernel_launches']} kernel launches" if c["kernel_launches"] else ""), "",
                  "| op / kernel | calls | ms |", "|---|---:|---:|"]
        lines += [f"| `{r['name']}` | {r['calls']} | {r['ms']:.3f} |" for r in c["top"]] + [""]
    stem = f"profile-{device.type}"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out_dir / f"{stem}.json", json.dumps(doc, indent=1) + "\n")
    atomic_write(args.out_dir / f"{stem}.md", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
