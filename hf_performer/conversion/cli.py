"""``hf-performer`` command line: ``convert`` and ``report`` (thin wrappers over ``hf_performer.conversion.convert`` and
``hf_performer.conversion.report``).

    hf-performer convert bert-base-uncased ./bert-performer --nb-features 256 --max-position-embeddings 4096 \\
        --calibrate --calibration-data ./my_texts.txt --max-time 600
    hf-performer report bert-base-uncased ./bert-performer --data ./heldout.txt

FAVOR+ flags are generated from ``PerformerConfig``'s fields (``--nb-features``, ``--kernel``, ``--seed``,
``--chunk-size``, ``--redraw-interval``, ``--orthogonal/--no-orthogonal``, ...); an unset flag keeps the
PerformerConfig default. Errors print one line ``hf-performer: error: ...`` and exit with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shlex
import sys

from hf_performer.settings import FEATURE_NORMS, KERNELS, PerformerConfig

from .calibrate import DEFAULT_MAX_TIME_S, DEFAULT_MIN_LENGTH, MIXED_PRECISION, CalibrationConfig
from .data import BUILTIN_TEXT
from .errors import ConversionError
from .lora import DEFAULT_RANK
from .params import TRAIN_CHOICES

_CHOICES = {"kernel": KERNELS, "feature_norm": FEATURE_NORMS}
_HELP = {
    "nb_features": "random features per head (more: lower estimator variance, more compute)",
    "kernel": "feature map: softmax (FAVOR+), favor++ (lower variance), relu, trig. With --aligned-features (the "
              "default) the statistics step (--calibration-data) replaces softmax and favor++ features by "
              "importance-sampled softmax features, so both then give the same model (conversion.json "
              "'estimator' records what runs)",
    "orthogonal": "draw the random projection in orthogonal blocks (lower variance) instead of iid",
    "feature_norm": "row norms of orthogonal projections: chi (unbiased) or sqrt_d (fixed)",
    "redraw_interval": "redraw the random features every N optimizer steps during fine-tuning (0 = never)",
    "seed": "seed of the random features (each layer and draw derives its own)",
    "chunk_size": "tokens per chunk of the linear-attention ops (bounds peak memory)",
    "eps": "guard of the normaliser (never added to softmax features)",
    "center_keys": "shift keys by E[q] + E[k] before the feature map (exact; lowers variance)",
    "balance_qk": "rescale q by a and k by 1/a to balance their norms (exact; lowers variance)",
    "aligned_features": "after the statistics step, draw features by importance sampling where the layer's "
                        "q + k fall (softmax/favor++ kernels; unbiased, far lower variance)",
    "local_window": "take the w nearest keys on each side (causal: the w previous) exactly, FAVOR+ for the rest; "
                    "0 = pure FAVOR+; 4 brings converted models much closer to the original",
}


def _length(text: str) -> int | None:
    """A --lengths item: a positive integer, or '' (no timing at all)."""
    if not text.strip():
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid length {text!r}: expected a positive integer or ''") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid length {text!r}: expected a positive integer or ''")
    return value


def _add_performer_flags(parser: argparse.ArgumentParser) -> list[str]:
    group = parser.add_argument_group("FAVOR+ settings (PerformerConfig; defaults from hf_performer)")
    defaults = PerformerConfig()
    names = []
    for f in dataclasses.fields(PerformerConfig):
        value = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            group.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{_HELP[f.name]} (default {value})")
        elif isinstance(value, (int, float, str)):
            kind = type(value)
            group.add_argument(flag, dest=f.name, type=kind, default=None, choices=_CHOICES.get(f.name),
                               metavar=None if f.name in _CHOICES else kind.__name__.upper(),
                               help=f"{_HELP[f.name]} (default {value})")
        else:
            continue  # dict fields (extra) are Python-only
        names.append(f.name)
    return names


def _flag_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    """Each option's dest -> its long flag, for errors that name a setting (``_in_flags``)."""
    return {a.dest: next(o for o in a.option_strings if o.startswith("--")) for a in parser._actions
            if a.option_strings and a.dest != "help"}


def _convert_parser(sub) -> argparse.ArgumentParser:
    from hf_performer.integration.convert import supported_model_types

    families = ", ".join(supported_model_types())
    p = sub.add_parser(
        "convert", help=f"convert a checkpoint ({families}) to FAVOR+ attention",
        description=f"Convert a checkpoint (model types: {families}) to Performer FAVOR+ attention and write a "
                    "ready-to-load folder: weights, "
                    "config, tokenizer, a model card (README.md) and the modeling code, so that it also loads where "
                    "hf-performer is not installed, with AutoModel*.from_pretrained(OUT, trust_remote_code=True). "
                    "Share it with `hf upload NAME OUT .`.")
    p.add_argument("source", help="hub id (needs the Hub or its local cache) or local checkpoint folder")
    p.add_argument("output", help="output folder (written atomically; see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder that holds a model (config.json) or nothing; any other folder is refused")
    p.add_argument("--model-class", help="stock class to load, e.g. BertForMaskedLM (default: config.architectures)")
    p.add_argument("--base-model", metavar="HUB_ID",
                   help="the source's Hub id, for the model card's base_model when SOURCE is a local folder "
                        "(a Hub id SOURCE is used as it is)")
    p.add_argument("--tokenizer", metavar="NAME_OR_FOLDER",
                   help="tokenizer to read --calibration-data with and to write to the output (default: the "
                        "source's; a source without one gets none written)")
    p.add_argument("--max-position-embeddings", type=int, metavar="N",
                   help="grow learned absolute positions to N tokens by tiling the pretrained table (rotary models: "
                        "raise the limit only, in config and tokenizer)")
    p.set_defaults(performer_fields=_add_performer_flags(p))
    d = CalibrationConfig()
    g = p.add_argument_group("statistics and calibration")
    g.add_argument("--calibration-data", metavar="TEXT",
                   help=".txt file (lines or blank-line paragraphs), .jsonl/.json/.csv/.tsv/.parquet file (its 'text' "
                        "column, or its only string column), folder of .txt files, datasets NAME[:CONFIG][:SPLIT], "
                        f"or {BUILTIN_TEXT} (English prose of the documentation Python ships, offline) (default "
                        f"{BUILTIN_TEXT}; text of the kind the model will see fits it better)")
    g.add_argument("--zero-shot", action="store_true",
                   help="no statistics step: keep the untuned random features (the model warns at its first forward)")
    g.add_argument("--statistics-batches", type=int, help="batches for the statistics step (default 4)")
    g.add_argument("--calibrate", action="store_true", help="attention-transfer calibration on --calibration-data")
    # unset flags stay None: convert() refuses a flag that the requested steps would not read
    g.add_argument("--calibration-steps", dest="steps", type=int, metavar="N",
                   help="optimizer steps (default: no step limit, the time budget --max-time decides)")
    g.add_argument("--train", choices=TRAIN_CHOICES,
                   help="what calibration trains: qk = query/key projections, attention = query/key/value/output "
                        "projections, all = every parameter, lora = LoRA adapters on the attention projections, "
                        f"merged before saving (LoLCATs; for models too big to train in full; needs peft) (default {d.train})")
    g.add_argument("--lora-rank", type=int, metavar="R", help=f"--train lora: adapter rank (default {DEFAULT_RANK})")
    g.add_argument("--lora-alpha", type=float, metavar="ALPHA",
                   help="--train lora: LoRA alpha, the update is scaled by alpha / rank (default 2 x rank)")
    g.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    g.add_argument("--batch-size", type=int, help=f"most sequences per batch (default {d.batch_size})")
    g.add_argument("--batch-tokens", type=int, metavar="N",
                   help=f"most padded tokens per batch: long sequences come in smaller batches (default {d.batch_tokens})")
    g.add_argument("--max-length", type=int,
                   help="longest sequence in tokens (default: the source's position limit, e.g. 512 for BERT)")
    g.add_argument("--min-length", type=int,
                   help=f"shortest sequence in tokens; lengths are mixed, log-uniform in [min, max] (default "
                        f"{DEFAULT_MIN_LENGTH}, or --max-length if shorter)")
    g.add_argument("--layer-weight", type=float, help=f"weight of per-layer attention matching (default {d.layer_weight})")
    g.add_argument("--output-weight", type=float, help=f"weight of end-to-end matching (default {d.output_weight})")
    g.add_argument("--teacher-forced", action=argparse.BooleanOptionalAction, default=None,
                   help="per-layer loss with each converted layer on the original's inputs (LoLCATs-style; "
                        f"default {d.teacher_forced})")
    g.add_argument("--warmup-steps", type=int, help=f"linear learning-rate warm-up steps (default {d.warmup_steps})")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION,
                   help=f"autocast dtype of the calibration (default {d.mixed_precision})")
    g.add_argument("--calibration-seed", dest="calibration_seed", type=int, metavar="N", help=f"data order seed (default {d.seed})")
    g.add_argument("--save-every", type=int, help=f"save resumable state every N steps (default {d.save_every})")
    g.add_argument("--max-time", dest="max_time_s", type=float, metavar="SECONDS",
                   help=f"calibration time budget, validations included (default {DEFAULT_MAX_TIME_S:g} s when "
                        "--calibration-steps is not given, else none)")
    g.add_argument("--eval-every", type=int, metavar="N",
                   help=f"measure the loss on held-out calibration text every N steps; the best state is kept "
                        f"(default {d.eval_every})")
    g.add_argument("--patience", type=int, metavar="N",
                   help=f"stop after N validations without improvement, 0 = never (default {d.patience})")
    g.add_argument("--resume", nargs="?", const=True, default=False, metavar="STATE_DIR",
                   help="continue an interrupted calibration (default state folder: .<output>.calibration next to it)")
    g.add_argument("--keep-calibration-state", action="store_true", help="keep the resumable state after success")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(flag_names=_flag_names(p))
    return p


def _report_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="fidelity of a converted checkpoint against its source",
                       description="Per-layer and end-to-end fidelity, time and memory, and how to read them: JSON, "
                                   "markdown and (with matplotlib) a PNG.")
    p.add_argument("source", help="the original checkpoint (hub id or folder)")
    p.add_argument("converted", help="the converted checkpoint folder")
    p.add_argument("--data", required=True, help="held-out text (.txt or .jsonl/.json/.csv/.tsv/.parquet file with a "
                   "'text' column, folder of .txt files, or datasets name)")
    p.add_argument("--out", help="output folder (default <converted>/fidelity_report)")
    p.add_argument("--max-texts", type=int, help="use at most this many texts")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sequence (default 128)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    p.add_argument("--tokenizer", metavar="NAME_OR_FOLDER",
                   help="tokenizer for --data (default: the converted folder's, else the source's)")
    p.add_argument("--lengths", type=_length, nargs="*", default=None, metavar="N",
                   help="sequence lengths for forward time and memory (default: 128, 512, 2048, ... up to the "
                        "converted model's position limit; '' = none)")
    p.add_argument("--repeats", type=int, help="timed forward passes per length, median (default 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(flag_names={**_flag_names(p), "out_dir": "--out"})  # (report()'s name for what --out sets)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse's parser with the command's error format: a value argparse itself rejects (a type, a choice, a missing
    argument) prints one ``hf-performer: error: ...`` line that names the subcommand's ``--help``, like the command's
    own checks, instead of the whole usage text before it. Subparsers are made of this class too."""

    def error(self, message: str):
        self.exit(2, f"hf-performer: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="hf-performer", description="Performer FAVOR+ conversion tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    _convert_parser(sub)
    _report_parser(sub)
    return parser


_CALIBRATION_DESTS = {"seed": "calibration_seed"}  # CalibrationConfig fields whose flag dest differs (clash)


def _run_convert(args, argv) -> None:
    from .convert import convert

    performer = {n: getattr(args, n) for n in args.performer_fields if getattr(args, n) is not None}
    # the flags given; CalibrationConfig.seed comes from --calibration-seed (--seed is the FAVOR+ seed)
    dest = lambda name: _CALIBRATION_DESTS.get(name, name)  # noqa: E731
    calibration = {f.name: getattr(args, dest(f.name)) for f in dataclasses.fields(CalibrationConfig)
                   if getattr(args, dest(f.name), None) is not None}
    if args.zero_shot and args.calibration_data is not None:
        raise ConversionError("--zero-shot runs no statistics step, so it reads no --calibration-data: drop one of them.")
    data = None if args.zero_shot else BUILTIN_TEXT if args.calibration_data is None else args.calibration_data
    summary = convert(
        args.source, args.output, performer, max_position_embeddings=args.max_position_embeddings,
        calibration_data=data, calibrate_model=args.calibrate, calibration=calibration,
        statistics_batches=args.statistics_batches, model_class=args.model_class, tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        resume=args.resume, keep_calibration_state=args.keep_calibration_state, progress=not args.no_progress,
        command="hf-performer " + shlex.join(argv), base_model=args.base_model,
    )
    est = summary["estimator"]
    window = summary["performer"].get("local_window", 0)
    print(f"hf-performer: wrote {args.output} ({summary['model_class']}, nb_features={summary['performer']['nb_features']}, "
          + (f"local_window={window}, " if window else "")
          + f"estimator {est['effective']}, {summary['positions']['to']} positions" + (
              _calibration_words(summary["calibration"]) if summary["calibration"] else "") + (
              ", sentence-transformers modules " + " -> ".join(summary["sentence_transformers"]["modules"])
              if summary.get("sentence_transformers") else "") + ")")
    if est["note"]:
        print(f"hf-performer: note: {est['note']}")
    if summary["statistics"] is None:
        print("hf-performer: note: --zero-shot, so no statistics step ran (the model warns at its first forward). The "
              "step takes seconds, without training, and brings the model much closer to the original: convert again "
              "without --zero-shot, with --overwrite (the step then reads built-in English text, or yours with "
              "--calibration-data texts.txt: a few dozen texts of the kind the model will see).")
    elif args.calibration_data is None:
        print(f"hf-performer: note: the statistics step{' and calibration' if summary['calibration'] else ''} read "
              f"the built-in English text ({BUILTIN_TEXT}: the documentation Python ships). For a model of another "
              "language or domain, convert again with --calibration-data texts.txt --overwrite (text of the kind "
              "the model will see).")
    auto, out = summary.get("auto_class") or "AutoModel", repr(str(args.output))
    print(f"hf-performer: load it with {auto}.from_pretrained({out}) (and AutoTokenizer.from_pretrained({out})) after "
          "`import hf_performer`, or pass trust_remote_code=True to both where hf-performer is not installed "
          f"({args.output}/README.md has more).")


def _run_report(args) -> None:
    from .report import report

    lengths = None if args.lengths is None else tuple(n for n in args.lengths if n is not None)
    r = report(args.source, args.converted, args.data, args.out, max_texts=args.max_texts, max_length=args.max_length,
               batch_size=args.batch_size, lengths=lengths, repeats=args.repeats, tokenizer=args.tokenizer,
               progress=not args.no_progress)
    end = ", ".join(f"{k} {v:.4f}" for k, v in r["end_to_end"].items() if isinstance(v, float))
    print(f"hf-performer: report in {r['out_dir']}: {end}")


def _in_flags(message: str, flags: dict[str, str]) -> str:
    """A settings error in the command line's terms (the Python API's errors name the fields and their values; the
    command's name the flags that set them): ``PerformerConfig.nb_features=0`` -> ``--nb-features 0``,
    ``calibration min_length=40 ... max_length=20`` -> ``--min-length 40 ... --max-length 20``,
    ``statistics_batches=0`` -> ``--statistics-batches 0``, and "or None" (which no flag can pass) -> "or no flag".
    flags: the subcommand's argument dest -> flag; names that are not a flag's dest stay as they are."""
    def swap(name: str, text: str) -> str:
        return f"{flags[name]} " if name in flags else text

    message = re.sub(r"PerformerConfig\.(\w+)=", lambda m: swap(m[1], m[0]), message)
    message = re.sub(r"^calibration (\w+)=", lambda m: swap(_CALIBRATION_DESTS.get(m[1], m[1]), m[0]), message)
    message = re.sub(r"(?<![\w.-])(\w+)=", lambda m: swap(m[1], m[0]), message)
    return message.replace(" or None", " or no flag")


def _calibration_words(cal: dict) -> str:
    """The closing line's words on attention-transfer calibration (its log, ``calibrate.calibrate``'s)."""
    if cal.get("reverted"):
        return (f", calibration reverted to the starting weights after {cal['steps_done']} steps (no held-out "
                "gain)")
    kept = cal.get("best_step")
    if kept is not None and kept < cal["steps_done"]:  # the held-out check kept an earlier state
        return f", calibrated {cal['steps_done']} steps (kept step {kept}: the lowest held-out loss)"
    return f", calibrated {cal['steps_done']} steps"


class _StderrHandler(logging.Handler):
    """``hf-performer: warning: ...`` on the current sys.stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"hf-performer: {record.levelname.lower()}: {record.getMessage()}", file=sys.stderr)


def _log_warnings_to_stderr() -> None:
    """hf_performer's logged warnings (and errors) print as one ``hf-performer: warning: ...`` line each."""
    log = logging.getLogger("hf_performer")
    if not any(isinstance(h, _StderrHandler) for h in log.handlers):
        log.addHandler(_StderrHandler(logging.WARNING))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    _log_warnings_to_stderr()
    if args.no_progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    try:
        if args.command == "convert":
            _run_convert(args, argv)
        else:
            _run_report(args)
    except ConversionError as e:
        print(f"hf-performer: error: {_in_flags(str(e), getattr(args, 'flag_names', {}))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hf-performer: interrupted; nothing was written (a calibration keeps its state: rerun with --resume).",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
