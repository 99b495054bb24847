"""Packaging checks: setup.cfg metadata, the torch range, the console script, README and CI entry,
and the benchmark's flop formulas and markdown (no measurement runs here)."""

from __future__ import annotations

import configparser
import importlib.util
import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    assert cfg.read(ROOT / "setup.cfg"), "setup.cfg is missing"
    return cfg


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.strip().splitlines() if line.strip()]


def test_metadata():
    cfg = _setup_cfg()
    assert cfg["metadata"]["name"] == "hf-performer"
    assert cfg["metadata"]["license"] == "Apache-2.0"
    assert cfg["options"]["python_requires"] == ">=3.10"
    include = _lines(cfg["options.packages.find"]["include"])
    assert set(include) == {"hf_performer", "hf_performer.*"}  # no generic top-level names in site-packages


def test_torch_is_a_range_not_a_pin():
    requires = _lines(_setup_cfg()["options"]["install_requires"])
    torch = [r for r in requires if re.match(r"torch\b", r)]
    assert torch == ["torch>=2.4,<3"], torch
    assert not any("==" in r for r in requires), requires
    assert not any(r.startswith("performer") for r in requires), "performer-pytorch is a peer, not a dependency"


def test_extras_and_console_script():
    cfg = _setup_cfg()
    extras = cfg["options.extras_require"]
    assert "pytest" in _lines(extras["test"]) and "ruff" in _lines(extras["test"])
    assert "bench" in extras
    scripts = _lines(cfg["options.entry_points"]["console_scripts"])
    assert "hf-performer = hf_performer.conversion.cli:main" in scripts


def test_readme_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert lines[0].startswith("# ")
    body = [line for line in lines[1:] if line.strip()]
    assert body[0].startswith("```")
    assert body[1].split("#")[0].strip() == "make demo"
    assert body[2].split("#")[0].strip() == "make test"
    assert body[3].startswith("```")


def test_ci_runs_make_test():
    run = ROOT / ".ci" / "run"
    assert os.access(run, os.X_OK)
    text = run.read_text()
    assert "set -euo pipefail" in text
    assert [line for line in text.splitlines() if line.strip() and not line.startswith("#")][-1] == "make test"


def test_bench_flops_and_markdown(load_benchmark):
    bench = load_benchmark("bench_attention")
    L, m, d, C = 1024, 256, 64, 128
    bidir = bench.favor_flops(L, m, d, d, causal=False, chunk=C)
    assert bidir == 4 * L * m * d + 4 * L * m * (d + 1)
    assert bench.favor_flops(L, m, d, d, causal=True, chunk=C) == bidir + (L // C) * 2 * C * C * (m + d + 1)
    assert bench.exact_flops(L, d, causal=True) * 2 == bench.exact_flops(L, d, causal=False)

    args = bench.parse_args(["--quick"])
    assert args.lengths and args.name == "attention-quick"
    settings = {k: v for k, v in vars(args).items() if k != "worker"}
    ok = {"status": "ok", "median_s": 0.01, "peak_bytes": 2**20}
    results = [
        {"impl": i, "mode": mode, "pass": p, "L": L, "time": ok, "memory": ok,
         "flops": bench.model_flops(i, L, mode == "causal", p, args)}
        for i in ("exact", "favor") for mode in bench.MODES for p in bench.PASSES for L in args.lengths
    ]
    doc = {"meta": {"date": "today", "machine": {"cpu": "x", "threads": 2},
                    "matmul": {"status": "ok", "gflops": 100.0}, "loadavg_at_start": 0.1},
           "settings": settings, "results": results, "notes": []}
    md = bench.render_markdown(doc)
    assert md.count("| L |") == 4 and "FAVOR+ ms" in md and "10.0" in md


def test_bench_atomic_write(tmp_path, load_benchmark):
    bench = load_benchmark("bench_attention")
    target = tmp_path / "out.json"
    bench.atomic_write(target, "{}\n")
    assert target.read_text() == "{}\n"
    assert not list(tmp_path.glob("*.tmp"))


def test_conversion_scripts_run_the_cli(tmp_path):
    """conversion/*.py are thin scripts over hf_performer.conversion (no importable top-level `conversion`)."""
    import subprocess
    import sys

    for script, command in (("convert_checkpoint.py", "convert"), ("report_checkpoint.py", "report")):
        run = subprocess.run([sys.executable, str(ROOT / "conversion" / script), "--help"], capture_output=True,
                             text=True, cwd=tmp_path, timeout=120)
        assert run.returncode == 0, run.stderr
        assert run.stdout.startswith(f"usage: hf-performer {command}")
    assert importlib.util.find_spec("hf_performer.conversion.cli") is not None
    assert not (ROOT / "conversion" / "__init__.py").exists()
