"""benchmarks/bench_real_text.py: each tree's workers import that tree's package, and the tables are written."""

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HAS_GIT = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=ROOT, capture_output=True).returncode == 0


def test_worker_times_the_real_model_with_its_own_tree(load_benchmark):
    result = load_benchmark("bench_real_text").run(ROOT, ["text-64"], 64, 1)  # raises if the worker imported another package
    row = result["text-64"]
    assert row["shape"] == [1, 64] and row["tokens"] == 64 and row["padding"] == 0
    assert row["fwd"] > 0 and row["step"] > 0


@pytest.mark.skipif(not HAS_GIT, reason="the comparison exports the base commit with git archive")
def test_quick_run_against_head_writes_both_tables(tmp_path, load_benchmark):
    name = tmp_path / "real-text-quick"  # an absolute stem: the files land in tmp_path
    assert load_benchmark("bench_real_text").main(["--base", "HEAD", "--lengths", "64", "--no-padded", "--repeats", "1", "--calls", "1",
                              "--name", str(name)]) == 0
    doc = json.loads(Path(f"{name}.json").read_text())
    (row,) = doc["rows"]
    assert row["case"] == "text-64" and row["shape"] == [1, 64] and row["padding"] == 0
    assert min(row["fwd_base"], row["fwd_now"], row["step_base"], row["step_now"]) > 0
    assert "| text-64 | 1 x 64 | 0% |" in Path(f"{name}.md").read_text()
