"""Unlabeled text for the statistics, calibration and report steps: reading, tokenizing, batching.

Text sources (``read_texts``):
  * a ``.txt`` file: blank-line separated paragraphs if the file has blank lines, else one document per line;
  * a folder: every ``*.txt`` file below it (sorted), each read as above;
  * a ``datasets`` name ``NAME[:CONFIG][:SPLIT]`` (default split ``train``, column ``text``), loaded with
    ``datasets.load_dataset``: needs the Hub (or a local datasets cache); offline it fails with a clear error;
  * ``python-docs`` (``BUILTIN_TEXT``, unless a file or folder of that name exists): the English prose of the
    documentation every Python ships (``corpus.pydoc_paragraphs``, 571 paragraphs, ~28k words), offline. The
    CLI's statistics step reads it when no other text is given.

Documents longer than ``max_length`` tokens are cut into consecutive windows (each with the tokenizer's
special tokens), so long documents are used whole. ``mixed_length_sequences`` instead packs the token stream
of consecutive documents into sequences of seeded, mixed lengths (log-uniform between a minimum and the
maximum): calibration then sees every length up to the model's position limit, not only short paragraphs.
``BatchSchedule`` groups sequences of similar length (little padding), optionally up to a token budget per
batch (long sequences in small batches, short ones in large batches: about the same work per step), and
yields batch ``i`` of an endless, seeded stream: the same index gives the same batch, which is what makes a
resumed calibration see the data it would have seen.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path

import torch

from .errors import ConversionError

BUILTIN_TEXT = "python-docs"  # the text source name of the offline English corpus (``corpus.pydoc_paragraphs``)


def _split_documents(text: str) -> list[str]:
    text = text.replace("\r\n", "\n")
    if "\n\n" in text.strip("\n"):
        parts = text.split("\n\n")
    else:
        parts = text.split("\n")
    return [" ".join(p.split()) for p in parts if p.strip()]


def _read_file(path: Path) -> list[str]:
    try:
        return _split_documents(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read text file {str(path)!r}: {e}") from e


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or spec.endswith(".txt") or os.sep in spec and Path(spec).parent.exists()


# data files read as tables by datasets' packaged builders (their text column, as for a datasets name)
TABLE_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


def _read_table(path: Path) -> list[str]:
    """The text column of a .json/.jsonl/.csv/.tsv/.parquet file (``TABLE_FORMATS``), read by datasets; [] for a
    table without rows (``read_texts`` then says it holds no text)."""
    import datasets

    builder = TABLE_FORMATS[path.suffix.lower()]
    kwargs = {"delimiter": "\t"} if path.suffix.lower() == ".tsv" else {}
    try:
        if path.stat().st_size < 1 << 16 and not path.read_bytes().strip():  # (datasets: StopIteration, ...)
            return []
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
        return _text_column(ds, str(path))  # (strings are decoded here, lazily: a file not in UTF-8 fails here)
    except ConversionError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure gets one clear message
        if "corresponds to no data" in str(e):  # datasets' words for a header or [] without rows
            return []
        hint = ": save it as UTF-8" if isinstance(e, UnicodeDecodeError) else ""
        raise ConversionError(f"cannot read {str(path)!r} as a {builder} table: {type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}{hint}") from e


def _text_column(ds, spec: str) -> list[str]:
    """The documents of a datasets table: its "text" column, else its only string column. Several string columns
    and none named "text" (an id and a body, say) raise ConversionError: guessing could calibrate on the ids."""
    # (datasets types the columns of csv and parquet files large_string)
    strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
    column = "text" if "text" in ds.column_names else strings[0] if len(strings) == 1 else None
    if column is None:
        which = f"string columns {strings}" if strings else f"no string column (columns: {ds.column_names})"
        raise ConversionError(f"{spec!r} has no 'text' column and {which}: name the text column 'text'.")
    return [" ".join(t.split()) for t in ds[column] if isinstance(t, str) and t.strip()]


def _load_dataset(spec: str) -> list[str]:
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise ConversionError(f"{spec!r} is not a file or folder, and `datasets` is not installed") from e
    try:
        ds = datasets.load_dataset(name, config, split=split or "train")
    except Exception as e:  # noqa: BLE001 - any failure gets one clear message
        raise ConversionError(
            f"{spec!r} is not a local .txt file or folder, and loading it as a `datasets` dataset "
            f"(name={name!r}, config={config!r}, split={split or 'train'!r}) failed: {type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}. Datasets need the Hugging Face Hub (offline: "
            "HF_DATASETS_OFFLINE/HF_HUB_OFFLINE, or no internet) unless cached; pass a local text file or folder."
        ) from e
    return _text_column(ds, spec)


def read_texts(spec: str | os.PathLike) -> list[str]:
    """Documents (whitespace-normalised strings) from a text file (lines or blank-line paragraphs), a table file
    (.json/.jsonl/.csv/.tsv/.parquet: its "text" column, else its only string column), a folder of .txt files,
    ``python-docs`` (the built-in corpus) or a datasets name. Raises ConversionError naming the source when it holds
    no text or cannot be read."""
    path = Path(os.path.expanduser(str(spec)))
    if str(spec) == BUILTIN_TEXT and not path.exists():
        return _builtin_texts()
    if path.is_file():
        texts = _read_table(path) if path.suffix.lower() in TABLE_FORMATS else _read_file(path)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise ConversionError(f"folder {str(path)!r} holds no .txt files.")
        texts = [t for f in files for t in _read_file(f)]
    elif _looks_like_path(str(spec)):
        raise ConversionError(f"text data {str(spec)!r}: no such file or folder.")
    else:
        texts = _load_dataset(str(spec))
    if not texts:
        raise ConversionError(f"text data {str(spec)!r} holds no text.")
    return texts


def _builtin_texts() -> list[str]:
    from .corpus import pydoc_paragraphs

    try:
        return pydoc_paragraphs("all")
    except ImportError as e:  # some minimal Python builds leave pydoc_data out
        raise ConversionError(f"text data {BUILTIN_TEXT!r} is the documentation Python ships (pydoc_data), which this "
                              "Python lacks: pass --calibration-data with a .txt file of your own, or --zero-shot.") from e


def tokenize(texts: list[str], tokenizer, max_length: int, min_length: int = 2) -> list[list[int]]:
    """Token id lists of at most ``max_length`` tokens; long documents become several windows."""
    if max_length < min_length:
        raise ConversionError(f"max_length={max_length} is too short (need >= {min_length}).")
    kwargs = dict(truncation=True, max_length=max_length, add_special_tokens=True)
    if getattr(tokenizer, "is_fast", False):
        kwargs["return_overflowing_tokens"] = True
    ids = tokenizer(texts, **kwargs)["input_ids"]
    return [list(x) for x in ids if len(x) >= min_length]


def special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids the tokenizer puts before and after a text (BERT: [CLS] / [SEP]; GPT-2: none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i : i + len(plain)] == plain:
            return list(full[:i]), list(full[i + len(plain) :])
    return [], []  # pragma: no cover - a tokenizer that rewrites the text itself


def mixed_length_sequences(texts: list[str], tokenizer, max_length: int, min_length: int = 32,
                           seed: int = 0) -> list[list[int]]:
    """Token id lists of mixed lengths (special tokens included) cut from the concatenated token stream of
    ``texts`` (in order, so a sequence spans consecutive documents): lengths drawn log-uniformly in
    [``min_length``, ``max_length``] with a seeded generator, the last one shorter when the text runs out.

    Raises ConversionError when ``max_length`` leaves no room for text or ``min_length`` is not in
    [2, max_length]."""
    before, after = special_tokens(tokenizer)
    room = max_length - len(before) - len(after)
    if room < 1:
        raise ConversionError(f"max_length={max_length} leaves no room for text next to the tokenizer's "
                              f"{len(before) + len(after)} special tokens.")
    if not isinstance(min_length, int) or not 2 <= min_length <= max_length:
        raise ConversionError(f"min_length={min_length!r}: expected an integer in [2, max_length={max_length}].")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:  # no "too long" warning
        stream += ids
    rng = random.Random(seed)
    low = max(1, min_length - len(before) - len(after))
    out, pos = [], 0
    while pos < len(stream):
        n = room if low >= room else int(round(math.exp(rng.uniform(math.log(low), math.log(room)))))
        piece = stream[pos : pos + n]
        pos += n
        if len(before) + len(piece) + len(after) >= 2:
            out.append(before + piece + after)
    return out


def pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def collate(sequences: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` [B, L] (1 = real token)."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return {"input_ids": ids, "attention_mask": mask}


class BatchSchedule:
    """Length-bucketed batches, in a seeded order that changes every epoch; ``batch(i)`` for any i >= 0.

    ``batch_size``: most sequences per batch. ``max_tokens``: with it, a batch also holds at most this many
    padded tokens (sequences x its longest), so batches of long sequences are smaller; a sequence longer than
    ``max_tokens`` gets a batch of its own. Raises ConversionError for empty input or bad sizes."""

    def __init__(self, sequences: list[list[int]], batch_size: int, pad_token_id: int, seed: int = 0,
                 max_tokens: int | None = None):
        if not sequences:
            raise ConversionError("no token sequences to batch (is the text empty?).")
        if batch_size < 1:
            raise ConversionError(f"batch_size={batch_size}: expected a positive integer.")
        if max_tokens is not None and max_tokens < 1:
            raise ConversionError(f"max_tokens={max_tokens}: expected a positive integer or None.")
        order = sorted(range(len(sequences)), key=lambda i: (len(sequences[i]), i))
        self.groups: list[list[int]] = []
        group: list[int] = []
        for i in order:  # ascending lengths: the newest sequence is the group's longest
            full = len(group) >= batch_size or (
                max_tokens is not None and group and (len(group) + 1) * len(sequences[i]) > max_tokens)
            if full:
                self.groups.append(group)
                group = []
            group.append(i)
        self.groups.append(group)
        self.sequences, self.pad_token_id, self.seed = sequences, pad_token_id, seed

    def __len__(self) -> int:
        return len(self.groups)

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        epoch, pos = divmod(int(index), len(self.groups))
        perm = list(range(len(self.groups)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(perm)
        return collate([self.sequences[i] for i in self.groups[perm[pos]]], self.pad_token_id)

    def epoch(self) -> list[dict[str, torch.Tensor]]:
        """Every batch once, shortest first (deterministic; for evaluation and statistics)."""
        return [collate([self.sequences[i] for i in g], self.pad_token_id) for g in self.groups]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)
