"""Attention benchmark: FAVOR+ (hf_performer.FavorAttention) against exact attention.

Implementations
    exact              torch.nn.functional.scaled_dot_product_attention (is_causal for causal)
    favor              hf_performer.FavorAttention, nb_features m (default 256), calibrated statistics
    favor-window       the same with local_window = --local-window (default 4): exact softmax for the w
                       nearest keys, FAVOR+ for the rest (not in the default --impls)
    performer-pytorch  performer_pytorch.FastAttention at the same m, when importable (a peer, not a
                       dependency: `make bench` installs it with --no-deps). Its causal path without
                       CUDA kernels materialises an [L, m, dv] tensor per head, so its causal runs above
                       --peer-causal-max-len (default 4096) are recorded as "skipped".

Shapes: batch 1, 8 heads, head_dim 64 (= dv), bidirectional and causal, for each L in --lengths.

Passes
    fwd      one forward under torch.no_grad() (inference)
    fwd+bwd  forward with q, k, v requiring grad, then backward of a fixed random gradient

Time: median wall time of --repeats calls after --warmup calls (CUDA: synchronised), each
(impl, mode, pass, L) in a fresh process.

Peak memory: measured in another fresh process per (impl, mode, pass, L).
    CPU   the process's resident-set high-water mark growth during ONE call: after importing torch,
          building the module, allocating the inputs (and the output gradient) and one tiny warm-up
          call at L=512 (loads kernels, starts thread pools, builds the oneDNN/autograd caches for
          the chunk shapes: a one-time ~40 MiB on this CPU, not per-call memory), we read VmRSS as the baseline, reset the
          high-water mark (write "5" to /proc/self/clear_refs, Linux >= 4.0), run the call and read
          VmHWM. peak = VmHWM - baseline. The memory process runs with glibc's
          MALLOC_MMAP_THRESHOLD_=65536 (a fixed threshold): every buffer of 64 KiB or more is its own
          mapping, returned to the system when freed, so the resident set follows the live tensors
          instead of memory the allocator kept from earlier calls; values of a few MiB stay noisy.
          Without /proc/self/clear_refs it falls back to ru_maxrss growth, a lower bound (the JSON
          says which method was used).
    CUDA  torch.cuda.max_memory_allocated() - memory_allocated() before the call (after
          reset_peak_memory_stats): tensors only, not the caching allocator's reserve.

FLOPs (model flops, per batch and head; "fwd+bwd" counts 3x the forward):
    matmul peak    median time of a float32 2048x2048 @ 2048x2048 matmul, 2 * 2048^3 flops
    exact          bidirectional 4 L^2 d (QK^T and PV); causal 2 L^2 d (the unmasked half)
    FAVOR+         feature projections of q and k:     2 * 2 L m d
                   bidirectional: K'^T [V|1] and Q' (K'^T [V|1]):  2 * 2 L m (dv + 1)
                   causal: the same inter-chunk terms (query x state, state update) plus, per
                   chunk of c positions, Q'K'^T and A [V|1] on the full c x c block:
                   sum over chunks of 2 c^2 (m + dv + 1)   (~ 2 L C (m + dv + 1), C = chunk size)
                   exp, max and the other elementwise work are not counted.
    GFLOP/s are reported for exact and FAVOR+ with the fraction of the matmul rate.

Output: benchmarks/results/attention.json and attention.md (--quick: attention-quick.*), written
atomically (temporary file, then os.replace) after every measurement, so an interrupted run keeps
what it measured. --update-readme pastes the markdown between the README's bench-attention markers.

    python benchmarks/bench_attention.py                      # all lengths (long on a CPU)
    python benchmarks/bench_attention.py --lengths 1024 4096
    python benchmarks/bench_attention.py --quick              # tiny smoke run
    python benchmarks/bench_attention.py --device cuda
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- bench-attention -->", "<!-- /bench-attention -->"

IMPLS = ("exact", "favor", "favor-window", "performer-pytorch")
DEFAULT_IMPLS = ("exact", "favor", "performer-pytorch")
IMPL_NAMES = {"exact": "exact (sdpa)", "favor": "FAVOR+", "favor-window": "FAVOR+ & window",
              "performer-pytorch": "performer-pytorch"}
MODES = ("bidirectional", "causal")
PASSES = ("fwd", "fwd+bwd")
DEFAULT_LENGTHS = (512, 1024, 2048, 4096, 8192, 16384)
QUICK_LENGTHS = (256,)
WARMUP_LENGTH = 512  # >= 2 chunks: the warm-up meets every kernel and matmul shape of the chunked ops
MATMUL_N = 2048
RESULT_TAG = "BENCH-RESULT "


# ====================================================================================== flops
def favor_flops(L: int, m: int, d: int, dv: int, causal: bool, chunk: int) -> float:
    """Forward FAVOR+ flops per batch element and head (see the module docstring)."""
    flops = 2 * 2 * L * m * d + 2 * 2 * L * m * (dv + 1)
    if causal:
        for a in range(0, L, chunk):
            c = min(chunk, L - a)
            flops += 2 * c * c * (m + dv + 1)
    return float(flops)


def exact_flops(L: int, d: int, causal: bool) -> float:
    """Forward exact-attention flops per batch element and head (the useful half when causal)."""
    return float(2 * L * L * d if causal else 4 * L * L * d)


def model_flops(impl: str, L: int, causal: bool, passname: str, args) -> float | None:
    per_head = {
        "exact": lambda: exact_flops(L, args.head_dim, causal),
        "favor": lambda: favor_flops(L, args.nb_features, args.head_dim, args.head_dim, causal, args.chunk_size),
    }.get(impl)
    if per_head is None:
        return None
    return per_head() * args.batch * args.heads * (3 if passname == "fwd+bwd" else 1)


# ====================================================================================== worker side
def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _build(spec: dict, L: int):
    """Inputs and a zero-argument callable running one call of spec's (impl, mode, pass)."""
    import torch
    import torch.nn.functional as F

    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    B, H, d = spec["batch"], spec["heads"], spec["head_dim"]
    causal, backward = spec["mode"] == "causal", spec["pass"] == "fwd+bwd"
    g = torch.Generator().manual_seed(spec["seed"])
    q, k, v = (0.5 * torch.randn(B, H, L, d, generator=g) for _ in range(3))
    grad_out = torch.randn(B, H, L, d, generator=g).to(device, dtype)
    q, k, v = (t.to(device, dtype).requires_grad_(backward) for t in (q, k, v))

    impl = spec["impl"]
    if impl == "exact":
        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    elif impl in ("favor", "favor-window"):
        from hf_performer import FavorAttention, PerformerConfig

        window = spec["local_window"] if impl == "favor-window" else 0
        config = PerformerConfig(nb_features=spec["nb_features"], chunk_size=spec["chunk_size"], seed=0,
                                 local_window=window)
        attn = FavorAttention(d, config=config, num_heads=H, layer_id=0).to(device)
        attn.calibrate_statistics(q.detach(), k.detach())  # as a converted model would have
        fn = lambda: attn(q, k, v, causal=causal)  # noqa: E731
    elif impl == "performer-pytorch":
        from performer_pytorch import FastAttention

        attn = FastAttention(dim_heads=d, nb_features=spec["nb_features"], causal=causal).to(device)
        fn = lambda: attn(q, k, v)  # noqa: E731
    else:
        raise ValueError(f"unknown impl {impl!r}")

    def call():
        if backward:
            out = fn()
            out.backward(grad_out)
            for t in (q, k, v):
                t.grad = None
            del out
        else:
            with torch.no_grad():
                fn()
        _sync(device)

    return call


def _maxrss_bytes() -> int:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def worker_matmul(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    n = MATMUL_N
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(2):
        a @ b
    _sync(device)
    times = []
    for _ in range(spec.get("repeats", 10)):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    return {"n": n, "median_s": med, "gflops": 2 * n**3 / med / 1e9, "threads": torch.get_num_threads()}


def worker_time(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    call = _build(spec, spec["L"])
    for _ in range(spec["warmup"]):
        call()
    times, start = [], time.perf_counter()
    while len(times) < spec["repeats"]:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        # a slow configuration stops early, after at least 3 calls
        if len(times) >= 3 and time.perf_counter() - start > spec["max_seconds"]:
            break
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times,
            "threads": torch.get_num_threads()}


def worker_memory(spec: dict) -> dict:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    _build(spec, min(WARMUP_LENGTH, spec["L"]))()  # loads kernels, starts thread pools
    call = _build(spec, spec["L"])
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        call()
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_bytes": peak - base, "baseline_bytes": base, "method": "cuda.max_memory_allocated"}
    from hf_performer.conversion.memory import proc_status, reset_peak_rss

    if reset_peak_rss() and proc_status("VmHWM") is not None:
        base = proc_status("VmRSS")
        reset_peak_rss()
        call()
        peak = proc_status("VmHWM")
        method = "VmHWM-after-clear_refs" + (", MALLOC_MMAP_THRESHOLD_=" + os.environ["MALLOC_MMAP_THRESHOLD_"]
                                             if "MALLOC_MMAP_THRESHOLD_" in os.environ else "")
        return {"peak_bytes": max(0, peak - base), "baseline_bytes": base, "method": method}
    base = _maxrss_bytes()
    call()
    return {"peak_bytes": max(0, _maxrss_bytes() - base), "baseline_bytes": base,
            "method": "ru_maxrss-growth (lower bound)"}


def run_worker(spec: dict) -> None:
    kind = spec["kind"]
    fn = {"matmul": worker_matmul, "time": worker_time, "memory": worker_memory}[kind]
    try:
        result = {"status": "ok", **fn(spec)}
    except Exception as exc:  # reported to the parent, which records it
        oom = "out of memory" in str(exc).lower() or isinstance(exc, MemoryError)
        result = {"status": "oom" if oom else "error", "error": f"{type(exc).__name__}: {exc}"[:500]}
    print(RESULT_TAG + json.dumps(result), flush=True)


# ====================================================================================== parent side
# glibc: buffers >= 64 KiB are mapped and unmapped one by one (see "Peak memory" above)
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


def spawn(spec: dict, timeout: float) -> dict:
    """Run one measurement in a fresh Python process; returns its result dict."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, **(MEMORY_ENV if spec["kind"] == "memory" else {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"over {timeout:.0f} s"}
    for line in out.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    killed = rc is not None and rc < 0
    tail = (err or out).strip().splitlines()[-3:]
    status = "oom" if killed and rc == -9 else "error"
    return {"status": status, "error": f"exit code {rc}: " + " | ".join(tail)}


def peer_available() -> tuple[bool, str]:
    cmd = [sys.executable, "-c", "import performer_pytorch"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return True, ""
    return False, (proc.stderr.strip().splitlines() or ["import failed"])[-1]


def machine_info(device: str) -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "logical_cpus": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    probe = (
        "import json, torch; d = {'torch': torch.__version__, 'threads': torch.get_num_threads()}\n"
        f"if {device!r}.startswith('cuda'): d['gpu'] = torch.cuda.get_device_name({device!r})\n"
        "print(json.dumps(d))"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if proc.returncode == 0:
        info.update(json.loads(proc.stdout.strip().splitlines()[-1]))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "hf_performer"], capture_output=True,
                               text=True, cwd=ROOT).stdout.strip()
        info["git_commit"] = commit + ("+dirty" if dirty else "") if commit else None
    except OSError:
        info["git_commit"] = None
    return info


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- markdown
def _fmt_ms(r: dict | None) -> str:
    if r is None:
        return "n/a"
    if r.get("status") != "ok":
        return r.get("status", "n/a")
    return f"{1e3 * r['median_s']:.1f}"


def _fmt_mib(r: dict | None) -> str:
    if r is None:
        return "n/a"
    if r.get("status") != "ok":
        return r.get("status", "n/a")
    return f"{r['peak_bytes'] / 2**20:.0f}"


def render_markdown(doc: dict) -> str:
    meta, args = doc["meta"], doc["settings"]
    mm = meta.get("matmul") or {}
    peak = mm.get("gflops") if mm.get("status") == "ok" else None
    index = {(r["impl"], r["mode"], r["pass"], r["L"]): r for r in doc["results"]}
    impls = [i for i in IMPLS if any(r["impl"] == i for r in doc["results"])]
    machine = meta["machine"]
    threads = (mm.get("threads") if mm.get("status") == "ok" else None) or args.get("threads") or machine.get("threads")
    where = machine.get("gpu") or f"{machine.get('cpu')}, {threads} threads"
    lines = [
        f"Batch {args['batch']}, {args['heads']} heads, head_dim {args['head_dim']}, {args['dtype']}, "
        f"FAVOR+ nb_features {args['nb_features']} (chunk {args['chunk_size']}"
        + (f", local window {args.get('local_window')} for 'FAVOR+ & window'" if "favor-window" in impls else "")
        + f"); {args['device']}: {where}; "
        f"torch {machine.get('torch')}; commit {machine.get('git_commit')}; {meta['date']}"
        + (f"; load average {meta['loadavg_at_start']:.1f} at start." if meta.get("loadavg_at_start") is not None
           else "."),
        "",
        f"Time: median ms of up to {args['repeats']} calls after {args['warmup']} warm-up. "
        "Memory: peak MiB above the inputs during one call, in its own process "
        f"({'tensors allocated' if args['device'].startswith('cuda') else 'resident-set growth'}). "
        + (f"Large-matmul rate: {peak:.0f} GFLOP/s (float32 {MATMUL_N}³); "
           "FAVOR+/exact GFLOP/s count model flops (`benchmarks/bench_attention.py` gives the formulas)."
           if peak else "Large-matmul rate: not measured."),
    ]
    for mode in MODES:
        for passname in PASSES:
            head = ["L"]
            for impl in impls:
                head += [f"{IMPL_NAMES[impl]} ms", f"{IMPL_NAMES[impl]} MiB"]
                if impl == "favor":
                    head += ["FAVOR+ GFLOP/s (% matmul)", "exact / FAVOR+ time"]
            rows = []
            for L in args["lengths"]:
                row = [str(L)]
                for impl in impls:
                    r = index.get((impl, mode, passname, L))
                    row += [_fmt_ms(r and r.get("time")), _fmt_mib(r and r.get("memory"))]
                    if impl == "favor":
                        t = r and r.get("time")
                        if t and t.get("status") == "ok" and r.get("flops"):
                            gf = r["flops"] / t["median_s"] / 1e9
                            row.append(f"{gf:.1f} ({100 * gf / peak:.0f}%)" if peak else f"{gf:.1f}")
                        else:
                            row.append("n/a")
                        e = index.get(("exact", mode, passname, L))
                        et = e and e.get("time")
                        if t and et and t.get("status") == "ok" and et.get("status") == "ok":
                            row.append(f"{et['median_s'] / t['median_s']:.2f}x")
                        else:
                            row.append("n/a")
                rows.append(row)
            lines += ["", f"**{mode}, {passname}**", "", "| " + " | ".join(head) + " |",
                      "|" + "|".join("---:" for _ in head) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
    notes = doc.get("notes") or []
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def update_readme(body: str) -> bool:
    text = README.read_text()
    a, b = text.find(README_BEGIN), text.find(README_END)
    if a < 0 or b < a:
        print(f"README.md has no {README_BEGIN} ... {README_END} markers; not updated.", file=sys.stderr)
        return False
    new = text[: a + len(README_BEGIN)] + "\n" + body + text[b:]
    atomic_write(README, new)
    return True


# ---------------------------------------------------------------------------------------- main loop
def parse_args(argv=None):
    from hf_performer import PerformerConfig

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=None, help=f"default {list(DEFAULT_LENGTHS)}")
    p.add_argument("--quick", action="store_true", help=f"tiny smoke run: L {list(QUICK_LENGTHS)}, 2 repeats")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS), choices=IMPLS)
    p.add_argument("--local-window", type=int, default=4, help="local_window of the favor-window implementation")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--nb-features", type=int, default=256)
    p.add_argument("--chunk-size", type=int, default=PerformerConfig.chunk_size,
                   help="FAVOR+ chunk size (PerformerConfig.chunk_size)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop repeating (after 3 calls) once a measurement has run this long")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds before a measurement process is killed")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the workers (0 = torch's default)")
    p.add_argument("--peer-causal-max-len", type=int, default=4096,
                   help="skip performer-pytorch causal runs above this length (its CPU path is O(L m dv) memory)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default=None, help="output file stem (default attention, or attention-quick)")
    p.add_argument("--update-readme", action="store_true", help="paste the table into README.md")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.lengths = args.lengths or list(QUICK_LENGTHS)
        args.repeats, args.warmup, args.max_seconds = 2, 1, 5.0
    args.lengths = sorted(set(args.lengths or DEFAULT_LENGTHS))
    args.name = args.name or ("attention-quick" if args.quick else "attention")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(json.loads(args.worker))
        return 0

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    common = {k: settings[k] for k in ("device", "dtype", "batch", "heads", "head_dim", "nb_features",
                                       "chunk_size", "seed", "threads", "local_window")}
    json_path, md_path = args.out_dir / f"{args.name}.json", args.out_dir / f"{args.name}.md"
    print(f"writing {json_path} and {md_path}", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if load is not None and args.device == "cpu" and load > 0.5 * (os.cpu_count() or 1):
        print(f"warning: load average {load:.1f} on {os.cpu_count()} CPUs: other work skews CPU timings "
              "(FAVOR+'s many small ops suffer most from oversubscribed threads); try --threads 1",
              file=sys.stderr, flush=True)

    doc = {"meta": {"date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "machine": machine_info(args.device), "matmul": None, "loadavg_at_start": load},
           "settings": settings, "results": [], "notes": []}
    impls = list(args.impls)
    if "performer-pytorch" in impls:
        ok, why = peer_available()
        if not ok:
            impls.remove("performer-pytorch")
            doc["notes"].append(f"performer-pytorch not importable ({why}); install it with "
                                "`pip install --no-deps performer-pytorch einops local-attention "
                                "axial-positional-embedding hyper-connections`.")
            print("performer-pytorch unavailable:", why, flush=True)
    if "performer-pytorch" in impls and "causal" in args.modes and args.lengths[-1] > args.peer_causal_max_len:
        doc["notes"].append(f"performer-pytorch causal runs above L={args.peer_causal_max_len} are skipped: "
                            "without its CUDA kernel it keeps an [L, m, dv] tensor per head (GBs).")

    def save():
        atomic_write(json_path, json.dumps(doc, indent=1) + "\n")
        atomic_write(md_path, f"# Attention benchmark\n\n{render_markdown(doc)}")

    print(f"matmul {MATMUL_N}^3 ...", end=" ", flush=True)
    doc["meta"]["matmul"] = spawn({"kind": "matmul", **common}, args.timeout)
    mm = doc["meta"]["matmul"]
    print(f"{mm['gflops']:.1f} GFLOP/s" if mm.get("status") == "ok" else mm, flush=True)
    save()

    failed: set[tuple] = set()  # (impl, mode, pass) that failed at a shorter L: skip longer ones
    for L in args.lengths:
        for mode in args.modes:
            for passname in args.passes:
                for impl in impls:
                    key = (impl, mode, passname)
                    rec = {"impl": impl, "mode": mode, "pass": passname, "L": L,
                           "flops": model_flops(impl, L, mode == "causal", passname, args)}
                    label = f"L={L:<6} {mode:<13} {passname:<8} {impl:<18}"
                    skip = None
                    if impl == "performer-pytorch" and mode == "causal" and L > args.peer_causal_max_len:
                        skip = f"skipped: performer-pytorch causal above L={args.peer_causal_max_len}"
                    elif key in failed:
                        skip = "skipped: failed or over budget at a shorter length"
                    if skip:
                        rec["time"] = rec["memory"] = {"status": "skipped", "reason": skip}
                        print(f"{label} {skip}", flush=True)
                    else:
                        spec = {**common, "impl": impl, "mode": mode, "pass": passname, "L": L}
                        rec["time"] = spawn({**spec, "kind": "time", "repeats": args.repeats,
                                             "warmup": args.warmup, "max_seconds": args.max_seconds},
                                            args.timeout)
                        if args.no_memory:
                            rec["memory"] = None
                        else:
                            rec["memory"] = spawn({**spec, "kind": "memory"}, args.timeout)
                        if rec["time"].get("status") != "ok" or (rec["memory"] or {}).get("status", "ok") != "ok":
                            failed.add(key)
                        t, mem = rec["time"], rec["memory"]
                        print(f"{label} {_fmt_ms(t):>9} ms {_fmt_mib(mem):>7} MiB"
                              + (f"   ({t.get('error') or (mem or {}).get('error')})" if key in failed else ""),
                              flush=True)
                    doc["results"].append(rec)
                    save()

    body = render_markdown(doc)
    print("\n" + body)
    if args.update_readme and update_readme(body):
        print("README.md updated between the bench-attention markers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
