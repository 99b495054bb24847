"""benchmarks/bench_real_text.py: each tree's workers import that tree's package, and the tables are written."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_times_both_trees_on_real_text(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_real_text", ROOT / "benchmarks" / "bench_real_text.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    name = tmp_path / "real-text-quick"  # an absolute stem: the files land in tmp_path
    assert bench.main(["--base", "HEAD", "--lengths", "64", "--no-padded", "--repeats", "1", "--calls", "1",
                       "--name", str(name)]) == 0
    doc = json.loads(Path(f"{name}.json").read_text())
    (row,) = doc["rows"]
    assert row["case"] == "text-64" and row["shape"] == [1, 64] and row["padding"] == 0
    assert row["fwd_base"] > 0 and row["fwd_now"] > 0 and row["step_base"] > 0 and row["step_now"] > 0
    assert "| text-64 | 1 x 64 | 0% |" in Path(f"{name}.md").read_text()
