"""Side-by-side CPU timing of FavorAttention: this working tree against an earlier commit, and both against SDPA.

Absolute times on a shared CPU drift by 10-40% between processes (unchanged code moved by up to 1.4x between two
processes here), so every cell is measured inside one process, the implementations interleaved: the earlier
commit's ``hf_performer`` is exported (``git archive``) into a temporary folder as the package ``hfp_base`` (the
ops, features and attention import each other relatively, so the copy runs its own code), and for each length,
mode and window a fresh process builds FAVOR+ of both trees (and, with a window, this tree's pure FAVOR+) and
SDPA, then calls them in turn, round after round (``--calls`` rounds after a warm-up), keeping each one's best.
``--repeats`` such processes per cell; the table is their median. Forward (no grad) and forward + backward,
bidirectional and causal, with and without the local window; causal also "step": ms per one-token decoding step
after an L-token context (``FavorAttention.step`` from the context's state, with the one-column padding mask
``generate`` passes; SDPA: the token against a key/value cache of the context).

``--malloc retain`` runs the workers with glibc's heap kept between calls (``RETAIN_TUNABLES``): by default glibc
hands freed blocks above its trim threshold back to the kernel and every call faults the pages of its [L, m]
temporaries in again (8-27k page faults per causal forward at 2k tokens here, 10-40% of its time; SDPA's fused
kernel allocates next to nothing). PyTorch's own CPU launcher (``python -m torch.backends.xeon.run_cpu``) preloads
tcmalloc or jemalloc configured to keep memory; these tunables are the same for glibc.

Shapes: batch 1 (``--batch``), 8 heads, head_dim 64, nb_features 256, statistics fitted on the first 512 tokens,
float32; ``--padding F`` makes a fraction F of the batch's tokens right padding (a key padding mask; SDPA gets it as
its boolean attn_mask). Output: benchmarks/results/side-by-side.json and .md (median of --repeats, milliseconds),
written atomically.

    python benchmarks/bench_side_by_side.py --base 4f27964 --lengths 1024 2048 4096 8192
    python benchmarks/bench_side_by_side.py --batch 4 --padding 0.25 --lengths 1024 --name side-by-side-padded
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
L, window, causal, calls, base_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4]), sys.argv[5]
batch, padding = int(sys.argv[6]), float(sys.argv[7])
sys.path.insert(0, base_dir)
import hfp_base
import hf_performer
torch.manual_seed(0)
q, k, v = (torch.randn(batch, 8, L, 64) for _ in range(3))
# right padding: row i keeps L (1 - 2 padding i / (batch - 1)) tokens, so that a fraction `padding` of all is padding
lengths = [max(1, round(L * (1 - 2 * padding * i / max(batch - 1, 1)))) for i in range(batch)]
mask = (torch.arange(L)[None] < torch.tensor(lengths)[:, None]) if padding else None
sdpa_mask = None if mask is None else mask[:, None, None, :] & (torch.ones(L, L, dtype=torch.bool).tril() if causal else True)


def layer(pkg, w):
    att = pkg.FavorAttention(64, pkg.PerformerConfig(nb_features=256, local_window=w), num_heads=8)
    att.calibrate_statistics(q[:1, :, :512], k[:1, :, :512], causal=causal)
    return att


def favor(pkg, w):
    att = layer(pkg, w)
    return lambda a, b, c: att(a, b, c, causal=causal, key_padding_mask=mask)


STEPS = 16  # one-token decoding steps per call of the "step" pass
q1, k1, v1 = (t[:, :, -1:].clone() for t in (q, k, v))  # the token after the L-token context
m1 = torch.ones(batch, 1, dtype=torch.bool)  # its padding mask, as generate passes one


def favor_steps(pkg, w):  # STEPS single tokens, each from the state after the L-token context (as generate's steps)
    att = layer(pkg, w)
    with torch.no_grad():
        _, state = att.step(q, k, v, key_padding_mask=mask)

    def call():
        for _ in range(STEPS):
            att.step(q1, k1, v1, state, key_padding_mask=m1)
    return call


def sdpa_steps():  # the same tokens attending to a key/value cache of the context and themselves
    kc, vc = torch.cat([k, k1], 2), torch.cat([v, v1], 2)
    keep = None if mask is None else torch.cat([mask, m1], 1)[:, None, None, :]
    for _ in range(STEPS):
        F.scaled_dot_product_attention(q1, kc, vc, attn_mask=keep)


def sdpa(a, b, c):
    if sdpa_mask is None:
        return F.scaled_dot_product_attention(a, b, c, is_causal=causal)
    return F.scaled_dot_product_attention(a, b, c, attn_mask=sdpa_mask)


impls = {"sdpa": sdpa, "base": favor(hfp_base, window), "now": favor(hf_performer, window)}
if window:
    impls["pure"] = favor(hf_performer, 0)
out = {}
for name, bwd in (("fwd", False), ("fwd+bwd", True)) + ((("step", None),) if causal else ()):
    x = [t.clone().requires_grad_(bool(bwd)) for t in (q, k, v)]
    if bwd is None:  # ms per decoding step
        impls = {"sdpa": sdpa_steps, "base": favor_steps(hfp_base, window), "now": favor_steps(hf_performer, window)}
        if window:
            impls["pure"] = favor_steps(hf_performer, 0)
    best = {}
    for round_ in range(calls + 1):  # round 0 warms up; each round calls every implementation once, in turn
        order = list(impls.items())
        order = order[round_ % len(order):] + order[: round_ % len(order)]
        for key, fn in order:
            t0 = time.perf_counter()
            if bwd:
                o = fn(*x)
                o.backward(torch.ones_like(o))
            elif bwd is None:
                with torch.no_grad():
                    fn()
            else:
                with torch.no_grad():
                    fn(*x)
            if round_:
                per = (time.perf_counter() - t0) * 1000 / (STEPS if bwd is None else 1)
                best[key] = min(best.get(key, float("inf")), per)
    out[name] = best
print(json.dumps(out))
"""


# glibc's mmap threshold at its maximum (32 MiB: larger blocks would still be mapped afresh) and a trim threshold of
# 256 MiB: freed [L, m] temporaries stay in the heap for the next call instead of going back to the kernel
RETAIN_TUNABLES = "glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=268435456"


def run_worker(base_dir: Path, L: int, window: int, causal: bool, calls: int, malloc: str = "glibc", batch: int = 1,
               padding: float = 0.0) -> dict:
    """{pass: {implementation: best ms}} from one worker process, or {"error": ...}. ``malloc``: "glibc" (the
    defaults) or "retain" (``RETAIN_TUNABLES``); ``batch`` rows, a fraction ``padding`` of their tokens padding
    (right padding, a key padding mask; SDPA gets it as its boolean attn_mask)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    if malloc == "retain":
        env["GLIBC_TUNABLES"] = RETAIN_TUNABLES
    args = [sys.executable, "-c", WORKER, str(L), str(window), "1" if causal else "0", str(calls), str(base_dir),
            str(batch), str(padding)]
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def export_package(base: str, folder: Path) -> Path:
    """The package ``hf_performer`` of commit ``base`` as ``folder/hf_performer`` (git archive: no worktree, no
    checkout). Returns folder."""
    archive = subprocess.run(["git", "archive", base, "hf_performer"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive, check=True)
    return folder


def export_base(base: str, folder: Path) -> Path:
    """The earlier commit's package as ``folder/hfp_base`` (``export_package``, renamed: one process imports both)."""
    (export_package(base, folder) / "hf_performer").rename(folder / "hfp_base")
    return folder


def render(doc: dict) -> str:
    malloc = ("glibc's defaults." if doc.get("malloc", "glibc") == "glibc" else
              f"glibc with its heap kept between calls (GLIBC_TUNABLES={RETAIN_TUNABLES}).")
    lines = [f"# Side by side: FAVOR+ at {doc['head']} vs {doc['base']} vs SDPA (CPU)", "",
             f"{doc['machine']}; {doc['threads']} threads; load average {doc['loadavg']:.1f} at start; {doc['date']}. "
             f"Median over {doc['repeats']} processes of each implementation's best of {doc['calls']} interleaved "
             "rounds (all implementations in one process, called in turn), ms. Window rows: \"now / pure\" is this "
             f"tree's window against its own pure FAVOR+, timed in the same process. Allocator: {malloc} "
             f"Batch {doc.get('batch', 1)}"
             + (f", {doc['padding']:.0%} of the tokens right padding (a key padding mask)." if doc.get("padding") else ".")
             , ""]
    for mode in ("bidirectional", "causal"):
        for window in doc["windows"]:
            extra = " now / pure |" if window else ""
            lines += [f"**{mode}, local_window={window}**", "",
                      "| L | pass | SDPA | FAVOR+ base | FAVOR+ now | now / base | SDPA / now |" + extra,
                      "|---:|---|---:|---:|---:|---:|---:|" + ("---:|" if window else "")]
            for row in doc["rows"]:
                if row["mode"] != mode or row["window"] != window:
                    continue
                s, b, n, pure = row.get("sdpa"), row.get("base"), row.get("now"), row.get("pure")
                f = lambda x: "n/a" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.2f}"  # (steps: under 1 ms)
                r = lambda a, c: "n/a" if a is None or c is None else f"{a / c:.2f}"
                lines.append(f"| {row['L']} | {row['pass']} | {f(s)} | {f(b)} | {f(n)} | {r(n, b)} | {r(s, n)} |"
                             + (f" {r(n, pure)} |" if window else ""))
            lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="HEAD~1", help="the earlier commit (default HEAD~1)")
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192], help="sequence lengths L")
    p.add_argument("--windows", type=int, nargs="+", default=[0, 4], help="local_window values")
    p.add_argument("--repeats", type=int, default=3, help="worker processes per cell (the table is their median)")
    p.add_argument("--calls", type=int, default=5, help="interleaved rounds per process after a warm-up (the best counts)")
    p.add_argument("--name", default="side-by-side", help="output file stem in benchmarks/results/")
    p.add_argument("--batch", type=int, default=1, help="batch rows (default 1)")
    p.add_argument("--padding", type=float, default=0.0,
                   help="fraction of the batch's tokens that are padding, 0 <= F < 0.5 with --batch > 1 (default 0)")
    p.add_argument("--malloc", choices=["glibc", "retain"], default="glibc",
                   help="glibc: its defaults; retain: keep freed memory in the heap between calls (RETAIN_TUNABLES)")
    args = p.parse_args(argv)
    if not 0 <= args.padding < 0.5 or (args.padding and args.batch < 2):
        p.error(f"--padding {args.padding}: use 0 <= F < 0.5 with --batch 2 or more (row 0 is never padded)")
    base = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()
    # code changes only: a results file this script (or another benchmark) rewrote does not make the tree "dirty"
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                 ":(exclude)benchmarks/results"], cwd=ROOT, capture_output=True, text=True).stdout.strip())
    doc = {"base": base, "head": head + ("+dirty" if dirty else ""), "repeats": args.repeats, "calls": args.calls,
           "windows": args.windows, "malloc": args.malloc, "batch": args.batch, "padding": args.padding,
           "machine": os.uname().machine, "threads": os.environ.get("OMP_NUM_THREADS", "2"),
           "loadavg": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    with tempfile.TemporaryDirectory(prefix="hfp-base-") as tmp:
        base_dir = export_base(base, Path(tmp))
        for L in args.lengths:
            for mode in ("bidirectional", "causal"):
                for window in args.windows:
                    runs = [run_worker(base_dir, L, window, mode == "causal", args.calls, args.malloc, args.batch,
                                       args.padding) for _ in range(args.repeats)]
                    for pass_ in ("fwd", "fwd+bwd") + (("step",) if mode == "causal" else ()):
                        row = {"L": L, "mode": mode, "window": window, "pass": pass_}
                        for key in ("sdpa", "base", "now", "pure"):
                            vals = [r[pass_][key] for r in runs if key in r.get(pass_, {})]
                            row[key] = statistics.median(vals) if vals else None
                        errors = [r["error"] for r in runs if "error" in r]
                        if errors:
                            row["error"] = errors[0]
                        doc["rows"].append(row)
                        print(json.dumps(row), flush=True)
                    write(doc, args.name)
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
