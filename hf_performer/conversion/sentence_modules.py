"""sentence-transformers folders: keep the modules around the converted transformer.

A sentence-transformers checkpoint (e.g. all-MiniLM-L6-v2) is a transformers checkpoint plus
``modules.json`` (the module pipeline: Transformer -> Pooling -> Normalize, ...), the Transformer module's
``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``), ``config_sentence_transformers.json``
and one subfolder per further module (``1_Pooling/config.json``, ``2_Dense/...``; ``2_Normalize`` may be
absent: it has no state). Conversion rewrites the transformer (weights, config, tokenizer) and copies the
rest unchanged, except ``max_seq_length``, which follows ``--max-position-embeddings`` (left at its old
value, sentence-transformers would truncate every input there and the extension would do nothing).

Only the layout sentence-transformers writes is supported: the Transformer module at the folder's root
(``"path": ""``). Nothing here imports sentence-transformers.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from .errors import ConversionError

MODULES_FILE = "modules.json"
PACKAGE_CONFIG = "config_sentence_transformers.json"
# the Transformer module's own config, in the order sentence-transformers looks for it
TRANSFORMER_CONFIGS = (
    "sentence_bert_config.json",
    "sentence_roberta_config.json",
    "sentence_distilbert_config.json",
    "sentence_camembert_config.json",
    "sentence_albert_config.json",
    "sentence_xlm-roberta_config.json",
    "sentence_xlnet_config.json",
)


@dataclass
class SentenceModules:
    """The sentence-transformers files of a source folder.

    Attributes:
        root: the local folder they are read from.
        modules: the entries of ``modules.json`` (dicts with ``idx``, ``name``, ``path``, ``type``).
        files: paths relative to ``root`` to copy unchanged (module subfolders, package config).
        transformer_config: the Transformer module's config file name, or None when the source has none.
    """

    root: Path
    modules: list[dict]
    files: list[str] = field(default_factory=list)
    transformer_config: str | None = None

    @property
    def types(self) -> list[str]:
        return [m["type"].rsplit(".", 1)[-1] for m in self.modules]


def _source_folder(location: str, is_local: bool) -> Path | None:
    """The local folder holding the source's sentence-transformers files, or None when it has no modules.json."""
    if is_local:
        return Path(location)
    from transformers.utils import cached_file

    try:  # same cache and offline rules as the config and weights
        found = cached_file(location, MODULES_FILE, _raise_exceptions_for_missing_entries=False)
    except OSError as e:
        raise ConversionError(f"cannot check {location!r} for sentence-transformers modules: {e}") from e
    if found is None:
        return None
    from huggingface_hub import snapshot_download

    modules = json.loads(Path(found).read_text())
    patterns = [MODULES_FILE, PACKAGE_CONFIG, *TRANSFORMER_CONFIGS]
    patterns += [f"{m['path']}/*" for m in modules if isinstance(m, dict) and m.get("path")]
    try:
        return Path(snapshot_download(location, allow_patterns=patterns))
    except Exception as e:  # noqa: BLE001 - huggingface_hub raises several unrelated types
        raise ConversionError(f"cannot download the sentence-transformers modules of {location!r}: {e}") from e


def _relative(path: str, source: str) -> str:
    p = PurePosixPath(path)
    if p.is_absolute() or ".." in p.parts or "\\" in path:
        raise ConversionError(f"{source}: module path {path!r} is not a relative path inside the folder.")
    return str(p)


def read_sentence_modules(location: str, is_local: bool, spec: str | None = None) -> SentenceModules | None:
    """Read and validate the source's sentence-transformers layout; None when it has no ``modules.json``.

    Raises ConversionError for an unreadable ``modules.json`` or a layout conversion cannot keep (the
    Transformer module in a subfolder, another module at the root)."""
    spec = spec or location
    root = _source_folder(location, is_local)
    if root is None or not (root / MODULES_FILE).is_file():
        return None
    where = f"source {spec!r} ({MODULES_FILE})"
    try:
        modules = json.loads((root / MODULES_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConversionError(f"{where}: cannot read it: {e}") from e
    if not isinstance(modules, list) or not all(isinstance(m, dict) and {"path", "type"} <= set(m) for m in modules):
        raise ConversionError(f"{where}: expected a list of modules with 'path' and 'type' entries.")
    files, roots = [], []
    for m in modules:
        path = _relative(str(m["path"]), where) if m["path"] else ""
        is_transformer = str(m["type"]).rsplit(".", 1)[-1] == "Transformer"
        if is_transformer and path:
            raise ConversionError(
                f"{where}: the Transformer module lives in the subfolder {path!r}, an old sentence-transformers "
                "layout this converter does not handle. Load it with sentence-transformers and save it again "
                "(`SentenceTransformer(src).save(new_folder)` puts the transformer at the root), then convert that."
            )
        if not path:
            roots.append(m)
            if not is_transformer:
                raise ConversionError(f"{where}: module {m['type']!r} sits at the folder's root, where the "
                                      "converted transformer is written; only the Transformer module may.")
            continue
        folder = root / path
        if folder.is_dir():
            files += sorted(str(p.relative_to(root)) for p in folder.rglob("*") if p.is_file())
    if len(roots) != 1:
        raise ConversionError(f"{where}: expected exactly one Transformer module at the folder's root (\"path\": \"\").")
    files += [name for name in (PACKAGE_CONFIG,) if (root / name).is_file()]
    config = next((name for name in TRANSFORMER_CONFIGS if (root / name).is_file()), None)
    return SentenceModules(root, modules, files, config)


def write_sentence_modules(modules: SentenceModules, out: str | Path, max_seq_length: int | None) -> dict:
    """Copy the modules into ``out`` (the converted checkpoint's folder, being written).

    ``max_seq_length``: the new token limit when positions were extended (written into the Transformer
    module's config), or None to keep the source's. Returns a summary for ``conversion.json``:
    {"modules": [type names], "max_seq_length": {"from", "to"}, or None when the config sets none (newer
    sentence-transformers keep the limit in the tokenizer's ``model_max_length``, which ``extend_positions``
    updates)}."""
    out = Path(out)
    (out / MODULES_FILE).write_text(json.dumps(modules.modules, indent=2))
    for rel in modules.files:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(modules.root / rel, out / rel)
    lengths = None
    if modules.transformer_config is not None:
        config = json.loads((modules.root / modules.transformer_config).read_text())
        old = config.get("max_seq_length")  # absent in newer folders: the tokenizer's model_max_length rules
        if old is not None:
            if max_seq_length is not None and max_seq_length > old:
                config["max_seq_length"] = max_seq_length
            lengths = {"from": old, "to": config["max_seq_length"]}
        (out / modules.transformer_config).write_text(json.dumps(config, indent=2))
    return {"modules": modules.types, "max_seq_length": lengths}
