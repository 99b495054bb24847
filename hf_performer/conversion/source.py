"""The source checkpoint: a local folder or a Hugging Face Hub id, inspected (config only) before anything
heavy happens, then loaded.

``inspect_source`` reads only the config and decides the stock model class to load (``config.architectures``
or ``model_class``); unsupported architectures, already converted checkpoints, missing folders and hub ids
that cannot be reached (offline, not cached) raise ``ConversionError`` with one clear message.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_performer.integration.refusals import unconvertible_reason
from hf_performer.integration.registry import FAMILIES, family_traits

from .errors import ConversionError


@dataclass
class Source:
    spec: str  # as given
    location: str  # the local folder (absolute) or the hub id
    is_local: bool
    config: object  # the stock PreTrainedConfig
    model_class: type  # the stock class to load

    @property
    def family(self) -> str:
        return self.config.model_type


def supported_classes(model_type: str) -> dict[str, type]:
    return {cls.__name__: cls for cls in FAMILIES[model_type][1]}


def _looks_local(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or os.path.isabs(spec) or spec.count("/") > 1 or "\\" in spec


def _load_config(location: str, spec: str, is_local: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(location)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if is_local:
            raise ConversionError(f"cannot read the config of {spec!r}: {first}") from e
        if "model type" in first.lower() or isinstance(e, (KeyError, ValueError)) and "does not recognize" in first:
            raise ConversionError(f"source {spec!r}: {first}") from e
        raise ConversionError(
            f"cannot load source {spec!r}: it is not a local folder, and the Hugging Face Hub copy is not available "
            f"(offline — HF_HUB_OFFLINE=1 or no internet — and not in the local cache). Download it first "
            f"(`hf download {spec}`) or pass a local folder. ({first})"
        ) from e


def inspect_source(spec: str | os.PathLike, model_class: str | None = None, converted_from: bool = False) -> Source:
    """Validate ``spec`` and pick the model class from its config alone (no weights are read). ``model_class``: the
    stock class to load (``--model-class``; None = from the config). ``converted_from``: ``model_class`` is the class a
    converted checkpoint was made from (``report``), so a mismatch says so instead of naming ``--model-class``."""
    spec = str(spec)
    path = Path(os.path.expanduser(spec))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConversionError(f"source folder {spec!r} has no config.json (is it a transformers checkpoint?).")
        location, is_local = str(path.resolve()), True
    elif path.exists():
        raise ConversionError(f"source {spec!r} is a file; pass the checkpoint's folder or a hub id.")
    elif _looks_local(spec):
        raise ConversionError(f"source folder {spec!r} does not exist.")
    else:
        location, is_local = spec, False
    config = _load_config(location, spec, is_local)
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str) and model_type.startswith("performer_"):
        raise ConversionError(f"source {spec!r} is already a Performer checkpoint ({model_type}); convert the original.")
    reason = unconvertible_reason(model_type)
    if reason is not None:
        raise ConversionError(
            f"source {spec!r} has an unsupported architecture: model_type {model_type!r} cannot be converted "
            f"honestly, its attention uses {reason}, which FAVOR+ cannot compute."
        )
    if model_type not in FAMILIES:
        raise ConversionError(
            f"source {spec!r} has an unsupported architecture: model_type {model_type!r} "
            f"({', '.join(getattr(config, 'architectures', None) or [])}). Supported model types: "
            f"{', '.join(FAMILIES)}."
        )
    classes = supported_classes(model_type)
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = next((a for a in archs if a in classes), None)
        if model_class is None and archs:
            raise ConversionError(
                f"source {spec!r} is a {archs[0]}, which has no Performer class. Supported: {', '.join(classes)} "
                "(choose one with --model-class)."
            )
        model_class = model_class or family_traits(model_type).default_class
    if model_class not in classes and converted_from:
        raise ConversionError(f"the converted checkpoint was made from a {model_class}, but source {spec!r} is a "
                              f"{model_type} checkpoint: pass the checkpoint it was converted from.")
    if model_class not in classes:
        raise ConversionError(f"--model-class {model_class!r} is not supported for {model_type}; choose from {', '.join(classes)}.")
    return Source(spec, location, is_local, config, classes[model_class])


def load_model(source: Source, dtype: torch.dtype = torch.float32):
    """The stock model (eval mode, ``dtype``)."""
    try:
        model = source.model_class.from_pretrained(source.location, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot load the weights of {source.spec!r}: {str(e).strip().splitlines()[0]}") from e
    return model.eval()


def is_empty_tokenizer(tokenizer) -> bool:
    """True when ``tokenizer`` knows no token beyond its special tokens: what transformers 5 builds from a folder
    that has no tokenizer files (every word then encodes to [UNK] or to nothing)."""
    special = set(tokenizer.all_special_tokens)
    return not any(token not in special for token in tokenizer.get_vocab())


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def load_tokenizer(source: Source, required: bool, tokenizer: str | os.PathLike | None = None):
    """The tokenizer to convert with: from ``tokenizer`` (a hub id or folder) when given, else the source's own.

    Returns None when the source has no usable tokenizer (none at all, or one with an empty vocabulary) and
    ``required`` is False. Raises ``ConversionError`` when the ``tokenizer`` given is unusable, when one is
    ``required`` (text to read) and the source has none (the message names ``--tokenizer``), and when the
    tokenizer has more tokens than the model's embedding table."""
    from transformers import AutoTokenizer

    location = str(os.path.expanduser(str(tokenizer))) if tokenizer is not None else source.location
    if tokenizer is not None and _looks_local(str(tokenizer)) and not os.path.isdir(location):
        raise ConversionError(f"--tokenizer {str(tokenizer)!r}: no such folder (pass a tokenizer's folder or a hub id).")
    problem, tok = None, None
    try:
        tok = AutoTokenizer.from_pretrained(location)
    except (OSError, ValueError, TypeError) as e:
        problem = _first_line(e)
    if tok is not None and is_empty_tokenizer(tok):
        problem = "no tokenizer files: its vocabulary would hold only special tokens"
    if problem is not None:
        if tokenizer is not None:
            raise ConversionError(f"--tokenizer {str(tokenizer)!r} is not a usable tokenizer ({problem}).")
        if required:
            raise ConversionError(
                f"source {source.spec!r} has no usable tokenizer ({problem}); the statistics and calibration steps "
                "need one to read --calibration-data. Pass --tokenizer NAME_OR_FOLDER (the tokenizer the model was "
                "trained with), or --zero-shot for no statistics step."
            )
        return None
    vocab = getattr(source.config, "vocab_size", None)
    if isinstance(vocab, int) and len(tok) > vocab:
        raise ConversionError(
            f"the tokenizer of {str(tokenizer or source.spec)!r} has {len(tok)} tokens but the model's embedding table "
            f"has {vocab} rows; pass the tokenizer the model was trained with (--tokenizer)."
        )
    return tok
