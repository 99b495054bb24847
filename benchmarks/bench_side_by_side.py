"""Side-by-side CPU timing of FavorAttention: this working tree against an earlier commit, and both against SDPA.

Absolute times on a shared CPU are noisy, so every cell is measured in one run, the implementations interleaved:
for each length and repeat, a fresh process per tree times FAVOR+ (this tree, the earlier commit) and
torch.nn.functional.scaled_dot_product_attention, forward (no grad) and forward + backward, bidirectional and
causal, with and without the local window. The earlier commit is checked out into a temporary git worktree and
imported from there (PYTHONPATH), with the same Python environment.

Shapes: batch 1, 8 heads, head_dim 64, nb_features 256, statistics fitted on the first 512 tokens, float32.
Output: benchmarks/results/side-by-side.json and .md (median of --repeats, milliseconds), written atomically.

    python benchmarks/bench_side_by_side.py --base 4f27964 --lengths 1024 2048 4096 8192
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

WORKER = r"""
import json, sys, time, torch
import torch.nn.functional as F
from hf_performer import FavorAttention, PerformerConfig
L, window, causal, sdpa = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4] == "1"
calls = int(sys.argv[5])
torch.manual_seed(0)
q, k, v = (torch.randn(1, 8, L, 64) for _ in range(3))
att = FavorAttention(64, PerformerConfig(nb_features=256, local_window=window), num_heads=8)
att.calibrate_statistics(q[:, :, :512], k[:, :, :512], causal=causal)
fn = (lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=causal)) if sdpa else (
    lambda a, b, c: att(a, b, c, causal=causal))
out = {}
for name, bwd in (("fwd", False), ("fwd+bwd", True)):
    x = [t.clone().requires_grad_(bwd) for t in (q, k, v)]
    times = []
    for _ in range(calls + 1):  # the first call warms up
        t0 = time.perf_counter()
        if bwd:
            o = fn(*x)
            o.backward(torch.ones_like(o))
        else:
            with torch.no_grad():
                fn(*x)
        times.append(time.perf_counter() - t0)
    out[name] = min(times[1:]) * 1000
print(json.dumps(out))
"""


def run_worker(tree: Path, L: int, window: int, causal: bool, sdpa: bool, calls: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    args = [sys.executable, "-c", WORKER, str(L), str(window), "1" if causal else "0", "1" if sdpa else "0", str(calls)]
    done = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def render(doc: dict) -> str:
    lines = [f"# Side by side: FAVOR+ at {doc['head']} vs {doc['base']} vs SDPA (CPU)", "",
             f"{doc['machine']}; {doc['threads']} threads; load average {doc['loadavg']:.1f} at start; "
             f"median of {doc['repeats']} interleaved processes, ms (each the best of {doc.get('calls', 2)} calls after a "
             "warm-up).", ""]
    for mode in ("bidirectional", "causal"):
        for window in doc["windows"]:
            lines += [f"**{mode}, local_window={window}**", "",
                      "| L | pass | SDPA | FAVOR+ base | FAVOR+ now | now / base | SDPA / now |",
                      "|---:|---|---:|---:|---:|---:|---:|"]
            for row in doc["rows"]:
                if row["mode"] != mode or row["window"] != window:
                    continue
                s, b, n = row.get("sdpa"), row.get("base"), row.get("now")
                f = lambda x: "n/a" if x is None else f"{x:.0f}"
                r = lambda a, c: "n/a" if a is None or c is None else f"{a / c:.2f}"
                lines.append(f"| {row['L']} | {row['pass']} | {f(s)} | {f(b)} | {f(n)} | {r(n, b)} | {r(s, n)} |")
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="HEAD~1", help="the earlier commit (default HEAD~1)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--windows", type=int, nargs="+", default=[0, 4], help="local_window values")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--calls", type=int, default=5, help="timed calls per process after a warm-up (the best counts)")
    p.add_argument("--name", default="side-by-side", help="output file stem in benchmarks/results/")
    args = p.parse_args(argv)
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    # code changes only: a results file this script (or another benchmark) rewrote does not make the tree "dirty"
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    doc = {"base": base, "head": head + ("+dirty" if dirty else ""), "repeats": args.repeats, "calls": args.calls,
           "windows": args.windows,
           "machine": os.uname().machine, "threads": os.environ.get("OMP_NUM_THREADS", "2"),
           "loadavg": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    with tempfile.TemporaryDirectory(prefix="hfp-base-") as tmp:
        subprocess.run(["git", "worktree", "add", "--detach", tmp, base], cwd=ROOT, check=True, capture_output=True)
        try:
            for L in args.lengths:
                for mode in ("bidirectional", "causal"):
                    for window in args.windows:
                        cells = {"sdpa": [], "base": [], "now": []}
                        for _ in range(args.repeats):
                            for key, tree, sdpa in (("sdpa", ROOT, True), ("base", Path(tmp), False),
                                                    ("now", ROOT, False)):
                                if key == "sdpa" and window:
                                    continue
                                cells[key].append(run_worker(tree, L, window, mode == "causal", sdpa, args.calls))
                        for pass_ in ("fwd", "fwd+bwd"):
                            row = {"L": L, "mode": mode, "window": window, "pass": pass_}
                            for key, runs in cells.items():
                                vals = [r[pass_] for r in runs if pass_ in r]
                                row[key] = statistics.median(vals) if vals else None
                            doc["rows"].append(row)
                            print(json.dumps(row), flush=True)
                        # the window rows compare against the same SDPA as the pure rows
                        if window:
                            for row in doc["rows"][-2:]:
                                row["sdpa"] = next(r["sdpa"] for r in doc["rows"] if r["L"] == L and r["mode"] == mode
                                                   and r["window"] == 0 and r["pass"] == row["pass"])
                        write(doc, args.name)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", tmp], cwd=ROOT, capture_output=True)
    return 0


def write(doc: dict, name: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    for suffix, text in (("json", json.dumps(doc, indent=1) + "\n"), ("md", render(doc))):
        target = RESULTS / f"{name}.{suffix}"
        tmp = target.with_suffix(f".{suffix}.tmp")
        tmp.write_text(text)
        os.replace(tmp, target)


if __name__ == "__main__":
    sys.exit(main())
