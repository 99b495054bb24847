"""Calibration by attention transfer (as in LoLCATs and T2R): train the converted student to reproduce the
original teacher on unlabeled text, with the random features fixed (never redrawn).

Loss per step, on one batch (real tokens only):
    layer_weight  * mean over layers of ||student attention output - teacher attention output||² / ||teacher||²
  + output_weight * (encoders: 1 - cos of last hidden states;  causal LMs: KL(teacher || student) of logits)
Attention outputs are captured by forward hooks on the attention modules of both models (same names).
With ``teacher_forced`` (the default) every student attention layer runs on the *teacher's* input hidden
states (forward pre-hooks substitute them), as in LoLCATs' layer-wise attention transfer: each layer learns
its own approximation error against a clean target, and one student pass suffices when output_weight is 0.

Defaults chosen by measurement (all-MiniLM-L6-v2, nb_features=256, pydoc text, batches of 8 sequences,
300 s on 2 idle CPU cores, held-out mean-embedding cosine / Spearman of pairwise cosines; zero-shot
0.889 / 0.887): teacher-forced attention-output loss only, lr 2e-3: 0.956 / 0.953 (637 steps);
free-running layers + output cosine: 0.931 / 0.907; teacher-forced *block* outputs with every parameter
trained: 0.939 / 0.932; lr 5e-3: 0.895 / 0.903. (An earlier 300-step comparison: teacher-forced layers +
output cosine 0.927 / 0.944, free-running + output at lr 1e-3 0.939 / 0.951.)

Budget and data (so that calibration carries over to other text and lengths): by default a time budget of
``DEFAULT_MAX_TIME_S`` (600 s) rather than a step count, the learning rate decaying over it; sequences of mixed
lengths up to the model's position limit (``data.mixed_length_sequences``) in batches of about ``batch_tokens``
tokens; with held-out batches (``convert`` keeps ~10% of the calibration sequences out), validation every
``eval_every`` steps, the best state kept and restored, and a stop after ``patience`` validations without gain.

``train`` picks what is trained (``params.py``); ``train="lora"`` trains LoRA adapters on the attention
projections instead and merges them at the end (``lora.py``): the model comes back as a plain Performer model.

Runs through accelerate's ``Accelerator`` (CPU, one GPU, or mixed precision with ``mixed_precision``).
Resumable: every ``save_every`` steps (and when interrupted) the trainable parameters, optimizer,
step and loss log go to ``state_dir/state.pt``; ``resume=True`` continues from there, batch ``i`` of the
seeded schedule being the same batch in both runs. The loss log is also written to
``state_dir/calibration_log.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..integration.caller import above_progress_bars
from .capture import (
    attention_inputs,
    attention_names,
    attention_outputs,
    forward_kwargs,
    is_causal_model,
    replaced_attention_inputs,
)
from .data import BatchSchedule
from .errors import ConversionError
from .lora import DEFAULT_RANK, add_lora, merge_lora, require_peft
from .losses import cosine_distance, relative_mse, token_kl
from .params import TRAIN_CHOICES, select_trainable

MIXED_PRECISION = ("no", "fp16", "bf16")
DEFAULT_MAX_TIME_S = 600.0  # the calibration budget when neither steps nor a time limit is given
DEFAULT_MIN_LENGTH = 32  # the shortest training sequence when min_length is not given
STATE_FILE, LOG_FILE = "state.pt", "calibration_log.json"


@dataclass
class CalibrationConfig:
    """Settings of the attention-transfer calibration (CLI: --calibration-steps, --max-time, --train, ...).

    Budget: ``steps`` optimizer steps and/or ``max_time_s`` seconds, whichever ends first; with neither,
    ``DEFAULT_MAX_TIME_S`` (600 s) of training (``time_limit_s``). Data (``convert``): sequences of mixed lengths,
    log-uniform in [``min_length`` (None: 32), ``max_length``] (None: the model's position limit), batched by similar length
    with at most ``batch_size`` sequences and ``batch_tokens`` padded tokens per batch. Early stopping: every
    ``eval_every`` steps the end-to-end loss on held-out calibration text is measured, the best state is kept and
    restored at the end, and training stops after ``patience`` evaluations without improvement (0: never)."""

    steps: int | None = None  # None: no step limit (the time budget decides)
    lr: float = 2e-3
    batch_size: int = 32
    max_length: int | None = None  # None: the model's (original) position limit
    train: str = "attention"
    layer_weight: float = 1.0
    output_weight: float = 0.0
    warmup_steps: int = 10
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"
    seed: int = 0
    save_every: int = 50
    max_time_s: float | None = None  # stop after this many seconds (None: DEFAULT_MAX_TIME_S unless steps is set)
    teacher_forced: bool = True  # per-layer loss with each student layer on the teacher's inputs
    lora_rank: int | None = None  # train="lora" only: adapter rank (None: 8)
    lora_alpha: float | None = None  # train="lora" only: LoRA alpha, scale alpha/rank (None: 2 x rank)
    min_length: int | None = None  # shortest training sequence (None: DEFAULT_MIN_LENGTH, or max_length if shorter)
    batch_tokens: int | None = 2048  # padded tokens per batch (None: batch_size sequences whatever their length)
    eval_every: int = 25  # held-out validation every N steps (needs validation text)
    patience: int = 4  # stop after this many validations without improvement (0: never stop early)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, accepted: str) -> None:
            if not ok:
                raise ConversionError(f"calibration {name}={getattr(self, name)!r} is invalid: {accepted}.")

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(self.steps is None or (is_int(self.steps) and self.steps >= 0), "steps", "expected an integer >= 0 or None")
        need(isinstance(self.lr, (int, float)) and 0 < self.lr < 1, "lr", "expected a float in (0, 1)")
        need(is_int(self.batch_size) and self.batch_size >= 1, "batch_size", "expected a positive integer")
        need(self.max_length is None or (is_int(self.max_length) and self.max_length >= 4), "max_length",
             "expected an integer >= 4 or None (the model's position limit)")
        need(self.min_length is None or (is_int(self.min_length) and self.min_length >= 2), "min_length",
             "expected an integer >= 2 or None")
        need(self.max_length is None or self.min_length is None or self.min_length <= self.max_length, "min_length",
             f"it must not exceed max_length={self.max_length}")
        need(self.batch_tokens is None or (is_int(self.batch_tokens) and self.batch_tokens >= 1), "batch_tokens",
             "expected a positive integer or None")
        need(is_int(self.eval_every) and self.eval_every >= 1, "eval_every", "expected a positive integer")
        need(is_int(self.patience) and self.patience >= 0, "patience", "expected an integer >= 0 (0: never stop early)")
        need(self.train in TRAIN_CHOICES, "train", f"expected one of {', '.join(TRAIN_CHOICES)}")
        for name in ("layer_weight", "output_weight"):
            need(isinstance(getattr(self, name), (int, float)) and getattr(self, name) >= 0, name, "expected a float >= 0")
        need(self.layer_weight + self.output_weight > 0, "output_weight", "layer_weight + output_weight must be > 0")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "expected an integer >= 0")
        need(isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0, "max_grad_norm", "expected > 0")
        need(self.mixed_precision in MIXED_PRECISION, "mixed_precision", f"expected one of {', '.join(MIXED_PRECISION)}")
        need(is_int(self.seed) and self.seed >= 0, "seed", "expected an integer >= 0")
        need(is_int(self.save_every) and self.save_every >= 1, "save_every", "expected a positive integer")
        need(isinstance(self.teacher_forced, bool), "teacher_forced", "expected True or False")
        t = self.max_time_s
        need(t is None or (isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0),
             "max_time_s", "expected a finite number of seconds > 0 or None")
        if self.train != "lora":
            for name in ("lora_rank", "lora_alpha"):
                need(getattr(self, name) is None, name, "it applies only with train='lora'")
        else:
            require_peft()
            if self.lora_rank is None:
                self.lora_rank = DEFAULT_RANK
            need(is_int(self.lora_rank) and self.lora_rank >= 1, "lora_rank", "expected a positive integer")
            if self.lora_alpha is None:
                self.lora_alpha = 2.0 * self.lora_rank
            need(isinstance(self.lora_alpha, (int, float)) and not isinstance(self.lora_alpha, bool)
                 and self.lora_alpha > 0, "lora_alpha", "expected a float > 0")

    @property
    def time_limit_s(self) -> float | None:
        """The time budget in seconds: ``max_time_s``, else DEFAULT_MAX_TIME_S when no ``steps`` are given."""
        if self.max_time_s is not None:
            return float(self.max_time_s)
        return DEFAULT_MAX_TIME_S if self.steps is None else None

    def fingerprint(self, extra: dict) -> str:
        """What must match for a resume (everything but steps/save_every/max_time_s)."""
        keep = {k: v for k, v in dataclasses.asdict(self).items() if k not in ("steps", "save_every", "max_time_s")}
        return hashlib.sha256(json.dumps({**keep, **extra}, sort_keys=True, default=str).encode()).hexdigest()[:16]


def output_kind(model: nn.Module) -> str:
    """"logits" (KL) for causal language models, "hidden" (cosine of last hidden states) otherwise."""
    causal = is_causal_model(model)
    has_lm_head = model.get_output_embeddings() is not None if hasattr(model, "get_output_embeddings") else False
    return "logits" if causal and has_lm_head else "hidden"


def model_outputs(model: nn.Module, batch: dict, kind: str) -> torch.Tensor:
    if kind == "logits":
        return model(**batch, **forward_kwargs(model)).logits
    return model.base_model(**batch, **forward_kwargs(model)).last_hidden_state  # the encoder's output, without any task head


def transfer_loss(student, teacher, batch, names, kind, cfg: CalibrationConfig) -> tuple[torch.Tensor, dict]:
    """The attention-transfer loss on one batch and its parts (floats)."""
    mask = batch["attention_mask"]
    with torch.no_grad(), attention_outputs(teacher, names) as t_att, attention_inputs(teacher, names) as t_in:
        t_out = model_outputs(teacher, batch, kind)
        t_att, t_in = dict(t_att), dict(t_in)
    s_out = None
    if cfg.teacher_forced:  # each student attention layer runs on the teacher's inputs (LoLCATs-style)
        with replaced_attention_inputs(student, t_in), attention_outputs(student, names) as s_att:
            model_outputs(student, batch, "hidden")
            s_att = dict(s_att)
    if not cfg.teacher_forced or cfg.output_weight > 0:
        with attention_outputs(student, names) as s_free:
            s_out = model_outputs(student, batch, kind)
            s_free = dict(s_free)
        s_att = s_att if cfg.teacher_forced else s_free
    # every attention call: a shared module (ALBERT) once per layer it serves (``capture.call_key``)
    layer = torch.stack([relative_mse(s_att[n], t_att[n], mask) for n in t_att]).mean()
    if s_out is None:
        end = torch.zeros((), device=layer.device)
    else:
        end = token_kl(s_out, t_out, mask) if kind == "logits" else cosine_distance(s_out, t_out, mask)
    loss = cfg.layer_weight * layer + cfg.output_weight * end
    return loss, {"loss": loss.item(), "layer_rel_mse": layer.item(), f"output_{'kl' if kind == 'logits' else 'cos_dist'}": end.item()}


@torch.no_grad()
def validation_loss(student, teacher, batches, names, kind, device) -> float:
    """Mean end-to-end transfer loss (free-running attention outputs + outputs, weights 1 and 1)."""
    cfg = CalibrationConfig(layer_weight=1.0, output_weight=1.0, teacher_forced=False)
    total = 0.0
    for batch in batches:
        loss, _ = transfer_loss(student, teacher, {k: v.to(device) for k, v in batch.items()}, names, kind, cfg)
        total += loss.item()
    return total / len(batches)


def learning_rate(cfg: CalibrationConfig, step: int, elapsed_s: float) -> float:
    """Linear warm-up, then cosine decay to 0 over the steps — or over ``max_time_s`` if that comes first, so a
    time-limited run still ends at a small learning rate."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = 0.0 if cfg.steps is None else (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.time_limit_s is not None:
        progress = max(progress, elapsed_s / cfg.time_limit_s)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _save_state(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _write_log(path: Path, log: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(log, indent=1))
    os.replace(tmp, path)


def make_accelerator(mixed_precision: str):
    """accelerate's ``Accelerator`` for a calibration run (``mixed_precision``: one of MIXED_PRECISION). Raises
    ConversionError when the device has no autocast for it (accelerate runs fp16 only on accelerators and would
    silently train in float32 on a CPU); convert() calls it before loading anything, to check the flag."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    # the state is a process-wide singleton: a second calibration in one process may ask for other settings
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(mixed_precision=mixed_precision)
    if mixed_precision != "no" and not accelerator.native_amp:
        raise ConversionError(
            f"--mixed-precision {mixed_precision}: accelerate runs no {mixed_precision} autocast on this "
            f"{accelerator.device.type} device (fp16 needs a GPU), so calibration would run in float32; use "
            "--mixed-precision bf16 or no."
        )
    return accelerator


def _trainable_state(model: nn.Module, names) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters())
    return {n: named[n].detach().cpu().clone() for n in names}


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        named = dict(model.named_parameters())
        for n, value in state.items():
            named[n].copy_(value)


class _Progress:
    """A tqdm bar over steps (a step budget) or over seconds (a time budget only). While it is open, any warning
    (a library's deprecation notice in the first step, say) prints above the bar instead of into its line, through
    the mechanism hf_performer's own notices use (``integration.caller.above_progress_bars``); ``close`` restores
    ``warnings.showwarning``."""

    def __init__(self, cfg: CalibrationConfig, start_step: int, start_s: float, enabled: bool):
        self.by_time = cfg.steps is None
        total = int(math.ceil(cfg.time_limit_s)) if self.by_time else cfg.steps
        self.bar = tqdm(total=total, initial=int(start_s) if self.by_time else start_step, desc="calibration",
                        unit="s" if self.by_time else "step", disable=not enabled)
        self._show = show = warnings.showwarning
        if enabled:
            def above(*args, **kwargs):
                with above_progress_bars():
                    show(*args, **kwargs)

            warnings.showwarning = above

    def update(self, step: int, elapsed_s: float, **postfix) -> None:
        self.bar.update(min(int(elapsed_s), self.bar.total) - self.bar.n if self.by_time else 1)
        self.bar.set_postfix(step=step, **postfix)

    def close(self) -> None:
        self.bar.close()
        warnings.showwarning = self._show


def calibrate(
    student: nn.Module,
    teacher: nn.Module,
    schedule: BatchSchedule,
    cfg: CalibrationConfig,
    state_dir: str | os.PathLike | None = None,
    resume: bool = False,
    fingerprint_extra: dict | None = None,
    progress: bool = True,
    validation: list[dict] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Train ``student`` (in place) to reproduce ``teacher`` within ``cfg``'s budget (``cfg.steps`` steps and/or
    ``cfg.time_limit_s`` seconds of ``clock``, validations included). Returns the loss log {"config",
    "steps_done", "wall_s", "history": [{"step", "loss", ...}, ...], "stopped_early", ...}.

    ``validation``: held-out batches ({"input_ids", "attention_mask"} [B, L] long tensors). The end-to-end
    transfer loss (free-running layers + outputs) is measured on them before training and every
    ``cfg.eval_every`` steps (``log["validation"]``); the best state seen is restored at the end (``log["best_step"]``;
    ``log["reverted"]`` when that is the starting state: calibration never leaves the model further from the
    original on held-out text), and training stops after ``cfg.patience`` validations without improvement.
    ``clock``: seconds (monotonic) for the time budget; tests pass a fake one.
    Raises ConversionError when a resume has no state or one made with other settings."""
    state_dir = Path(state_dir) if state_dir is not None else None
    fp = cfg.fingerprint(fingerprint_extra or {})
    names = attention_names(student)
    kind = output_kind(student)
    torch.manual_seed(cfg.seed)  # (also the LoRA adapters' initialisation)
    if cfg.train == "lora":  # adapters on the attention projections; everything else frozen
        lora, hooks = add_lora(student, cfg.lora_rank, cfg.lora_alpha), []
        trainable = [n for n, p in student.named_parameters() if p.requires_grad]
    else:
        lora = None
        trainable, hooks = select_trainable(student, cfg.train)
    params = [p for p in student.parameters() if p.requires_grad]

    accelerator = make_accelerator(cfg.mixed_precision)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    log = {"config": dataclasses.asdict(cfg), "time_limit_s": cfg.time_limit_s, "fingerprint": fp,
           "output_kind": kind, "trainable": len(trainable), "trainable_parameters": sum(p.numel() for p in params),
           "device": None, "steps_done": 0, "wall_s": 0.0, "history": [], "validation": []}
    start_step, best, bad = 0, None, 0
    if resume:
        state_path = state_dir / STATE_FILE if state_dir is not None else None
        if state_path is None or not state_path.is_file():
            raise ConversionError(f"cannot resume: no calibration state at {str(state_path)!r}.")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        if state["fingerprint"] != fp:
            raise ConversionError(
                f"cannot resume from {str(state_path)!r}: it was made with other settings (source, FAVOR+ or "
                "calibration flags differ). Start again without --resume or use the original flags."
            )
        missing = set(trainable) - set(state["params"])
        if missing:
            raise ConversionError(f"calibration state {str(state_path)!r} lacks parameters {sorted(missing)[:3]}...")
        _load_trainable(student, {n: state["params"][n] for n in trainable})
        optimizer.load_state_dict(state["optimizer"])
        start_step, log = state["step"], state["log"]
        log["config"] = dataclasses.asdict(cfg)
        initial, best, bad = state.get("initial"), state.get("best"), state.get("bad", 0)
    else:
        initial = _trainable_state(student, trainable)

    student, optimizer = accelerator.prepare(student, optimizer)
    teacher.to(accelerator.device).eval()
    student.eval()  # no dropout: the student must reproduce the deterministic teacher
    log["device"] = str(accelerator.device)
    raw = accelerator.unwrap_model(student)
    limit = cfg.time_limit_s
    t0, wall0 = clock(), log["wall_s"]
    elapsed = lambda: wall0 + clock() - t0  # noqa: E731

    def validate(step: int) -> bool:
        """Measure the held-out loss; keep the state if it is the best so far. True when patience ran out."""
        nonlocal best, bad
        with accelerator.autocast():
            loss = validation_loss(raw, teacher, validation, names, kind, accelerator.device)
        log["validation"].append({"step": step, "loss": loss, "wall_s": round(elapsed(), 3)})
        if best is None or loss < best["loss"]:
            best = {"step": step, "loss": loss,
                    "params": None if step == 0 else _trainable_state(raw, trainable)}  # None: the initial state
            bad = 0
        else:
            bad += 1
        return cfg.patience > 0 and bad >= cfg.patience

    if validation and "validation_start" not in log:
        validate(0)
        log["validation_start"] = log["validation"][0]["loss"]

    def save(step: int) -> None:
        if state_dir is None:
            return
        named = dict(raw.named_parameters())
        _save_state(state_dir / STATE_FILE, {
            "step": step, "fingerprint": fp, "log": log,
            "params": {n: named[n].detach().cpu().clone() for n in trainable}, "initial": initial,
            "best": best, "bad": bad, "optimizer": optimizer.state_dict(),
        })
        _write_log(state_dir / LOG_FILE, log)

    bar = _Progress(cfg, start_step, wall0, progress)
    step = start_step
    try:
        while cfg.steps is None or step < cfg.steps:
            if limit is not None and elapsed() >= limit:
                log["stopped_early"] = f"time budget of {limit:g} s reached after {step} steps"
                break
            lr = learning_rate(cfg, step, elapsed())
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = {k: v.to(accelerator.device) for k, v in schedule.batch(step).items()}
            # (the losses reach past the prepared model's forward, e.g. through base_model: autocast spans them all)
            with accelerator.autocast():
                loss, parts = transfer_loss(student, teacher, batch, names, kind, cfg)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            log["history"].append({"step": step, **parts, "lr": lr, "tokens": int(batch["attention_mask"].sum()),
                                   "length": int(batch["input_ids"].shape[1]), "wall_s": round(elapsed(), 3)})
            log["steps_done"], log["wall_s"] = step, elapsed()
            if validation and step % cfg.eval_every == 0 and validate(step):
                log["stopped_early"] = (f"no held-out improvement in {cfg.patience} validations (every "
                                        f"{cfg.eval_every} steps) after {step} steps; best at step {best['step']}")
                break
            bar.update(step, elapsed(), loss=f"{parts['loss']:.4f}",
                       **({"val": f"{best['loss']:.4f}"} if best is not None else {}))
            if step % cfg.save_every == 0 and (cfg.steps is None or step < cfg.steps):
                save(step)
    except KeyboardInterrupt:
        save(step)
        raise
    finally:
        bar.close()
    if validation:
        if not log["validation"] or log["validation"][-1]["step"] != step:
            validate(step)
        log["validation_last"] = log["validation"][-1]["loss"]  # the last trained state
        log["best_step"], log["validation_end"] = best["step"], best["loss"]  # the state returned
        log["reverted"] = best["params"] is None and step > 0
        _load_trainable(raw, initial if best["params"] is None else best["params"])
    log["steps_done"], log["wall_s"] = step, elapsed()
    save(step)
    for h in hooks:
        h.remove()
    if lora is not None:  # W += (alpha / r) B A, adapters removed: a plain Performer model again
        merge_lora(lora)
        log["lora"] = {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "merged": True}
    for p in raw.parameters():
        p.requires_grad_(True)
    accelerator.free_memory()
    return log
