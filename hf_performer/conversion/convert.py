"""``convert``: source checkpoint -> ready-to-load Performer checkpoint (the CLI calls this function).

Order: validate every argument and the source's config (no weights read, nothing written) -> read the text ->
load tokenizer and weights -> convert_to_performer -> extend positions -> statistics step (whenever text is
given) -> calibration (``calibrate=True``) -> write safetensors, config, tokenizer, the sentence-transformers
modules of a sentence-transformers source (``sentence_modules``), README.md, conversion.json (and
calibration_log.json) into a temporary folder next to the target, then rename it.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

from huggingface_hub.utils import HFValidationError, validate_repo_id

from hf_performer import PerformerConfig, __version__
from hf_performer.attention import FavorAttention
from hf_performer.integration import convert_to_performer
from hf_performer.integration.portable import auto_class_name
from hf_performer.settings import ALIGNED_ESTIMATOR, ALIGNED_KERNELS

from .calibrate import DEFAULT_MIN_LENGTH, STATE_FILE, CalibrationConfig, calibrate, make_accelerator
from .data import BUILTIN_TEXT, BatchSchedule, mixed_length_sequences, pad_id, read_texts
from .errors import ConversionError
from .model_card import model_card, source_card_metadata
from .positions import check_extension, extend_positions, is_rotary, max_tokens
from .sentence_modules import read_sentence_modules, write_sentence_modules
from .source import inspect_source, load_model, load_tokenizer
from .statistics import calibrate_model_statistics
from .writer import atomic_directory, check_free_space, check_target

logger = logging.getLogger(__name__)


def performer_settings(settings: PerformerConfig | dict | None) -> PerformerConfig:
    try:
        return PerformerConfig.from_dict(settings or {}) if not isinstance(settings, PerformerConfig) else settings
    except (TypeError, ValueError) as e:
        raise ConversionError(str(e)) from e


MAX_HELD_OUT = 24  # validation sequences at most: validation runs every eval_every steps, it must stay cheap
MIN_TO_HOLD_OUT = 20  # fewer calibration sequences than this: none is held out
# fewer real tokens than this in the statistics step: a warning (all-MiniLM-L6-v2 fitted on one 3-token text encoded
# worse than without any statistics step, 0.70 against 0.77 embedding cosine; one 41-word paragraph gave 0.86)
MIN_STATISTICS_TOKENS = 128


def held_out_sequences(sequences: list, seed: int, max_held_out: int = MAX_HELD_OUT) -> list[int]:
    """Indices of calibration sequences kept out of training to validate it (early stopping, keeping the best
    state): ~10%, at most ``max_held_out``, none when there are fewer than MIN_TO_HOLD_OUT sequences."""
    if len(sequences) < MIN_TO_HOLD_OUT:
        return []
    n = min(max(2, len(sequences) // 10), max_held_out)
    return sorted(random.Random(seed).sample(range(len(sequences)), n))


def default_state_dir(output: str | os.PathLike) -> Path:
    path = Path(os.path.expanduser(str(output))).absolute()
    return path.parent / f".{path.name}.calibration"


def _fix_output_capture(model) -> None:
    # transformers keys `_can_record_outputs` (output_hidden_states) by the class the model was built as;
    # convert_to_performer swaps the class in place, so register the Performer class too.
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # pragma: no cover - other transformers layouts
        return
    _CAN_RECORD_REGISTRY[model] = getattr(model, "_can_record_outputs", None)


def checkpoint_bytes(model) -> int:
    """The size in bytes of ``model``'s state dict as ``save_pretrained`` writes it (each storage once: tied weights
    are saved once), the lower bound of its checkpoint's size."""
    tensors = {(t.data_ptr(), t.numel(), t.dtype, t.device): t.numel() * t.element_size()
               for t in model.state_dict().values()}
    return sum(tensors.values())


def estimator_record(model, kernel: str) -> dict:
    """What the converted model's attention layers actually compute with (``PerformerConfig.estimator`` of each
    layer, from its own settings, its causality and whether its statistics were calibrated), against the
    ``kernel`` asked for: {"kernel", "effective" (one name, or the sorted names when layers differ), "note"}."""
    per_layer = [m.favor.config.estimator(m.favor.calibrated, causal=bool(getattr(m, "is_causal", False)))
                 for m in model.modules() if isinstance(getattr(m, "favor", None), FavorAttention)]
    effective = sorted(set(per_layer))
    note = None
    if ALIGNED_ESTIMATOR in effective and kernel in ALIGNED_KERNELS:
        note = (f"the statistics step replaced the {kernel} kernel's random features by importance-sampled softmax "
                "features (aligned_features): softmax and favor++ give the same model here; the kernel matters "
                "without a statistics step or with aligned_features off")
    return {"kernel": kernel, "effective": effective[0] if len(effective) == 1 else effective, "note": note}


def _summary_calibration(log: dict) -> dict:
    keep = {k: v for k, v in log.items() if k != "history"}
    keep["final"] = log["history"][-1] if log["history"] else {}
    keep["first"] = log["history"][0] if log["history"] else {}
    return keep


STATISTICS_FIELDS = ("batch_size", "max_length", "min_length", "batch_tokens", "seed")  # shape the statistics batches
_FLAGS = {"steps": "--calibration-steps", "seed": "--calibration-seed", "max_time_s": "--max-time"}


def _given_calibration_fields(calibration) -> list[str]:
    """The calibration fields the caller set: a dict's keys, or a CalibrationConfig's non-default fields."""
    if calibration is None:
        return []
    if isinstance(calibration, dict):
        return list(calibration)
    default = CalibrationConfig()
    return [f.name for f in dataclasses.fields(CalibrationConfig) if getattr(calibration, f.name) != getattr(default, f.name)]


def _check_unused_settings(data, calibrate_model, given, statistics_batches, keep_state, cal_cfg) -> None:
    """No setting may silently do nothing: refuse those that the requested steps would never read."""
    flag = lambda f: _FLAGS.get(f, "--" + f.replace("_", "-"))  # noqa: E731
    if data is None:
        unused = [flag(f) for f in given] + (["--statistics-batches"] if statistics_batches is not None else [])
        if unused:
            raise ConversionError(f"{', '.join(unused)} would do nothing with --zero-shot (no statistics step or "
                                  "calibration runs without --calibration-data): drop them or --zero-shot.")
    if not calibrate_model:
        unused = [flag(f) for f in given if f not in STATISTICS_FIELDS] + (
            ["--keep-calibration-state"] if keep_state else [])
        if unused:
            raise ConversionError(f"{', '.join(unused)} {'applies' if len(unused) == 1 else 'apply'} only to "
                                  "attention-transfer calibration: pass --calibrate or drop "
                                  f"{'it' if len(unused) == 1 else 'them'}.")
    elif cal_cfg.steps == 0:
        raise ConversionError("--calibrate with --calibration-steps 0 would train nothing: give steps > 0, or drop "
                              "--calibrate (the statistics step runs whenever --calibration-data is given).")


def convert(
    source: str | os.PathLike,
    output: str | os.PathLike,
    performer: PerformerConfig | dict | None = None,
    *,
    max_position_embeddings: int | None = None,
    calibration_data: str | os.PathLike | None = None,
    calibrate_model: bool = False,
    calibration: CalibrationConfig | dict | None = None,
    statistics_batches: int | None = None,
    model_class: str | None = None,
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    resume: bool | str | os.PathLike = False,
    keep_calibration_state: bool = False,
    progress: bool = True,
    command: str | None = None,
    base_model: str | None = None,
) -> dict:
    """Convert ``source`` (hub id or local folder) into a Performer checkpoint at ``output``.

    Args:
        performer: the FAVOR+ settings (PerformerConfig or its dict).
        max_position_embeddings: grow learned absolute positions to this many tokens (tiling).
        calibration_data: text for the statistics step and calibration (.txt file, folder, datasets name, or
            ``"python-docs"``: the English prose of the documentation Python ships, offline; the CLI's default).
            None: no statistics step (zero-shot; the CLI's ``--zero-shot``).
        calibrate_model: run attention-transfer calibration (needs ``calibration_data``).
        calibration: CalibrationConfig (or its dict of the fields to change): steps, lr, batch_size, max_length,
            train, ... (batch_size, max_length and seed also shape the statistics step's batches).
        statistics_batches: batches of text for the statistics step (None: 4).
        model_class: stock class to load (default: the config's ``architectures``).
        tokenizer: hub id or folder of the tokenizer to read the text with and to write into ``output``
            (default: the source's own). A source without a usable tokenizer gets none written (a warning
            says so), and then ``calibration_data`` needs ``tokenizer``: never an empty tokenizer.
        resume: continue an interrupted calibration: True = the default state folder next to ``output``
            (``.<name>.calibration``), or a folder path.
        base_model: the source's Hub id, for the model card's ``base_model`` (default: ``source`` when it is a Hub
            id; a local source has none unless given).
    Returns the summary written to ``output/conversion.json``.

    Raises ConversionError before anything is written for bad input, including a setting that would do nothing:
    statistics or calibration settings without ``calibration_data``, attention-transfer settings (or
    ``keep_calibration_state``) without ``calibrate_model``, or ``calibrate_model`` with 0 steps; and, once the
    model is loaded but before the statistics step, when the output's disk has less free space than the checkpoint
    needs. A disk that fills up while the folder is written is a ConversionError too (the partial folder removed).
    """
    t_start = time.perf_counter()
    # ---------------------------------------------------------------- validate everything first
    settings = performer_settings(performer)
    given = _given_calibration_fields(calibration)
    if isinstance(calibration, dict):
        calibration = CalibrationConfig(**calibration)
    cal_cfg = calibration or CalibrationConfig()
    _check_unused_settings(calibration_data, calibrate_model, given, statistics_batches, keep_calibration_state,
                           cal_cfg)
    if calibration_data is not None and not calibrate_model and not settings.uses_statistics():
        raise ConversionError(
            f"the statistics step would change nothing: kernel {settings.kernel!r} with --no-center-keys, "
            "--no-balance-qk and --no-aligned-features reads no fitted statistic. Pass --zero-shot (no statistics "
            "step), or keep one of those on."
        )
    if calibrate_model and cal_cfg.mixed_precision != "no":
        make_accelerator(cal_cfg.mixed_precision)  # raises if this device has no autocast for it
    statistics_batches = 4 if statistics_batches is None else statistics_batches
    if not isinstance(statistics_batches, int) or statistics_batches < 1:
        raise ConversionError(f"statistics_batches={statistics_batches!r}: expected a positive integer.")
    if calibrate_model and calibration_data is None:
        raise ConversionError("--calibrate needs text to calibrate on, and --zero-shot gives none: drop --zero-shot "
                              f"(--calibration-data: a .txt file, a folder of .txt files, a datasets name or {BUILTIN_TEXT}).")
    if resume and not calibrate_model:
        raise ConversionError("--resume continues a calibration: pass --calibrate as well.")
    if base_model is not None:
        try:
            validate_repo_id(base_model)
        except HFValidationError as e:
            raise ConversionError(f"--base-model {base_model!r} is not a Hugging Face Hub id such as 'org/name' ({e})") from e
    src = inspect_source(source, model_class)
    out_path = Path(os.path.expanduser(str(output))).resolve()
    if src.is_local and (out_path == Path(src.location) or out_path in Path(src.location).parents):
        raise ConversionError(f"output {str(output)!r} would replace the source checkpoint {src.spec!r}"
                              + ("" if out_path == Path(src.location) else " (a folder that holds it)")
                              + ": write the converted model to another folder.")
    target = check_target(output, overwrite)
    state_dir = Path(resume) if isinstance(resume, (str, os.PathLike)) and not isinstance(resume, bool) else default_state_dir(target)
    if resume and not (state_dir / STATE_FILE).is_file():
        raise ConversionError(f"--resume: no calibration state at {str(state_dir / STATE_FILE)!r} (it is kept there when "
                              "a calibration is interrupted, or with --keep-calibration-state); drop --resume to start "
                              "afresh.")
    check_extension(src.config, max_position_embeddings)
    sentence_modules = read_sentence_modules(src.location, src.is_local, src.spec)
    texts = read_texts(calibration_data) if calibration_data is not None else None

    # ---------------------------------------------------------------- load and convert
    tokenizer_spec = tokenizer
    tokenizer = load_tokenizer(src, required=texts is not None, tokenizer=tokenizer_spec)
    if tokenizer is None:
        logger.warning("source %r has no usable tokenizer (no tokenizer files): none is written to %s (pass --tokenizer "
                       "NAME_OR_FOLDER to include one).", src.spec, str(output))
    model = load_model(src)
    teacher = copy.deepcopy(model) if calibrate_model else None
    try:
        convert_to_performer(model, settings)
    except (TypeError, ValueError) as e:
        raise ConversionError(f"cannot convert {src.spec!r}: {e}") from e
    _fix_output_capture(model)
    positions = extend_positions(model, max_position_embeddings or max_tokens(model.config), tokenizer)
    check_free_space(target, checkpoint_bytes(model))  # before the statistics step and calibration, not after
    summary = {
        "source": src.spec, "source_name": Path(src.location).name if src.is_local else src.location,
        "source_is_local": src.is_local, "model_class": type(model).__name__, "stock_class": src.model_class.__name__,
        "hf_performer_version": __version__, "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"),
        "performer": settings.to_dict(), "positions": positions, "positions_tiled": not is_rotary(model.config),
        "base_model": base_model or (None if src.is_local else src.location),
        "source_card": source_card_metadata(src.location, src.is_local),
        "same_task_as_source": src.model_class.__name__ in (getattr(src.config, "architectures", None) or []),
        "auto_class": auto_class_name(type(model)), "model_module": type(model).__module__,
        "causal": any(getattr(m, "is_causal", False) for m in model.modules()
                      if isinstance(getattr(m, "favor", None), FavorAttention)),
        "calibration_data": str(calibration_data) if calibration_data is not None else None,
        "tokenizer": None if tokenizer is None else (str(tokenizer_spec) if tokenizer_spec is not None else src.spec),
        "statistics": None, "calibration": None, "command": command, "sentence_transformers": None,
    }

    # ---------------------------------------------------------------- statistics and calibration
    log = None
    if texts is not None:
        # the teacher (the source) runs on these too: its own position limit, not an extended one
        length = min(cal_cfg.max_length or max_tokens(src.config), max_tokens(src.config))
        if cal_cfg.max_length is not None and cal_cfg.max_length > length:
            logger.warning("--max-length %d is past the source model's position limit (%d tokens): the source (the "
                           "teacher of the statistics step and calibration) cannot run longer inputs, so both use "
                           "sequences of at most %d tokens.", cal_cfg.max_length, length, length)
        shortest = min(cal_cfg.min_length or DEFAULT_MIN_LENGTH, length)
        sequences = mixed_length_sequences(texts, tokenizer, length, shortest, cal_cfg.seed)
        held_out = held_out_sequences(sequences, cal_cfg.seed) if calibrate_model else []
        if calibrate_model and not held_out:
            logger.warning("the calibration text gives only %d sequence%s (%d or more are needed to hold some out): "
                           "none is held out, so calibration runs without early stopping or keeping its best state "
                           "(--eval-every and --patience do nothing); give more text.", len(sequences),
                           "" if len(sequences) == 1 else "s", MIN_TO_HOLD_OUT)
        hold = set(held_out)
        schedule = BatchSchedule([s for i, s in enumerate(sequences) if i not in hold] or sequences,
                                 cal_cfg.batch_size, pad_id(tokenizer), cal_cfg.seed, max_tokens=cal_cfg.batch_tokens)
        batches = [schedule.batch(i) for i in range(min(statistics_batches, len(schedule)))]
        layers = calibrate_model_statistics(model, batches, pad_token_id=pad_id(tokenizer))
        summary["statistics"] = {"layers": layers, "batches": len(batches),
                                 "tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
                                 "texts": len(texts), "sequences": len(schedule.sequences)}
        if summary["statistics"]["tokens"] < MIN_STATISTICS_TOKENS:
            logger.warning("the statistics step read only %d tokens of text: statistics fitted on so little can make "
                           "the model worse than none at all. Give --calibration-data a few paragraphs of text like "
                           "the model's inputs (or leave it out: the step then reads built-in English text).",
                           summary["statistics"]["tokens"])
        if calibrate_model:
            fingerprint = {"source": src.location, "performer": settings.to_dict(), "positions": positions,
                           "data": str(calibration_data), "sequences": len(schedule.sequences)}
            validation = BatchSchedule([sequences[i] for i in held_out], cal_cfg.batch_size, pad_id(tokenizer),
                                       max_tokens=cal_cfg.batch_tokens).epoch() if held_out else None
            log = calibrate(model, teacher, schedule, dataclasses.replace(cal_cfg, max_length=length),
                            state_dir=state_dir, resume=bool(resume), fingerprint_extra=fingerprint, progress=progress,
                            validation=validation)
            summary["calibration"] = _summary_calibration(log)
            del teacher
    summary["estimator"] = estimator_record(model, settings.kernel)
    summary["convert_wall_s"] = round(time.perf_counter() - t_start, 2)

    # ---------------------------------------------------------------- write atomically
    with atomic_directory(target, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if sentence_modules is not None:
            # --max-position-embeddings N sets max_seq_length to N, also where the positions already reach N
            summary["sentence_transformers"] = write_sentence_modules(sentence_modules, tmp, max_position_embeddings)
        (tmp / "conversion.json").write_text(json.dumps(summary, indent=1))
        if log is not None:
            (tmp / "calibration_log.json").write_text(json.dumps(log, indent=1))
        (tmp / "README.md").write_text(model_card(summary))
    if log is not None and not keep_calibration_state:
        shutil.rmtree(state_dir, ignore_errors=True)
    return summary
