"""Position extension: grow learned absolute position embeddings by tiling the pretrained table.

The Longformer recipe (Beltagy et al. 2020): position ``p`` of the longer table copies pretrained position
``p mod n`` (n = the pretrained length), so the first n positions are unchanged — a model run on at most n
tokens gives exactly the outputs it gave before — and later positions start from embeddings the model knows.

* BERT (512) and DistilBERT (learned, not sinusoidal): ``embeddings.position_embeddings`` plus the
  ``position_ids`` / ``token_type_ids`` buffers sized by ``max_position_embeddings``.
* RoBERTa: positions start at ``padding_idx + 1`` (2): rows 0..padding_idx are kept, the rest is tiled; a
  model for N tokens needs ``max_position_embeddings = N + padding_idx + 1``.
* GPT-2 (1024): ``wpe`` and ``n_positions``.
* OPT: ``decoder.embed_positions``, whose first 2 rows are not token positions (position p reads row p + 2; padding
  reads row 1): those are kept, the rest is tiled; ``max_position_embeddings`` counts tokens.
* ALBERT, ELECTRA, ERNIE (like BERT) and XLM-RoBERTa, CamemBERT (like RoBERTa): rows of the generic table.
* Rotary families (``integration.generic``: Llama, Qwen2, ...): no table; only ``max_position_embeddings`` (and the
  tokenizer's ``model_max_length``) grow. Rotary positions are computed for any index, but a model trained on n
  tokens has never seen larger rotations: quality beyond n is what the checkpoint gives (FAVOR+ changes nothing there).

``max_position_embeddings`` below always counts *tokens* (what the tokenizer's ``model_max_length`` says).
"""

from __future__ import annotations

import torch
from torch import nn

from hf_performer.integration.generic import GENERIC_FAMILIES

from .errors import ConversionError

SUPPORTED = ("bert", "roberta", "distilbert", "gpt2", "opt")


def is_rotary(config) -> bool:
    """True for rotary position embeddings (no learned position table)."""
    return _family(config) == "rotary"


def position_offset(config) -> int:
    """Rows of the position table that are not token positions (RoBERTa: padding_idx + 1)."""
    return config.pad_token_id + 1 if _family(config) == "roberta" else 0


def _family(config) -> str:
    """The position layout: "bert", "roberta", "distilbert", "gpt2", "opt", or "rotary" (rows of the generic table say
    which of these they use)."""
    family = config.model_type.removeprefix("performer_")
    row = GENERIC_FAMILIES.get(family)
    return row.row.positions if row is not None else family


def max_tokens(config) -> int:
    """Longest input (in tokens) the config's position table covers."""
    if _family(config) == "gpt2":
        return int(config.n_positions)
    return int(config.max_position_embeddings) - position_offset(config)


def check_extension(config, new_max: int | None) -> None:
    """Validate a requested length against a (stock or Performer) config, before anything is loaded."""
    if new_max is None:
        return
    family = _family(config)
    if isinstance(new_max, bool) or not isinstance(new_max, int) or new_max < 1:
        raise ConversionError(f"--max-position-embeddings {new_max!r}: expected a positive integer.")
    if family not in SUPPORTED and not is_rotary(config):
        raise ConversionError(
            f"position extension supports {', '.join(SUPPORTED)} and the families of the generic table "
            f"({', '.join(GENERIC_FAMILIES)}); got model_type {config.model_type!r}."
        )
    if family == "distilbert" and getattr(config, "sinusoidal_pos_embds", False):
        raise ConversionError("this DistilBERT uses fixed sinusoidal position embeddings; tiling applies to learned ones.")
    current = max_tokens(config)
    if new_max < current:
        raise ConversionError(
            f"--max-position-embeddings {new_max} is shorter than the model's {current} positions; it can only grow."
        )


def _tile(old: torch.Tensor, rows: int, keep: int) -> torch.Tensor:
    """[rows, H]: the first ``keep`` rows of ``old`` unchanged, then old[keep:] repeated."""
    body = old[keep:]
    reps = -(-(rows - keep) // body.shape[0])
    return torch.cat([old[:keep], body.repeat(reps, 1)[: rows - keep]])


def _grow_embedding(embedding: nn.Embedding, rows: int, keep: int) -> None:
    with torch.no_grad():
        weight = _tile(embedding.weight.detach(), rows, keep)
    embedding.weight = nn.Parameter(weight, requires_grad=embedding.weight.requires_grad)
    embedding.num_embeddings = rows


def _grow_buffers(embeddings: nn.Module, rows: int) -> None:
    for name in ("position_ids", "token_type_ids"):
        buf = getattr(embeddings, name, None)
        if isinstance(buf, torch.Tensor):
            new = torch.arange(rows, device=buf.device) if name == "position_ids" else torch.zeros(rows, device=buf.device)
            embeddings._buffers[name] = new.to(buf.dtype).expand(1, -1)


def extend_positions(model: nn.Module, new_max: int, tokenizer=None) -> dict:
    """Grow ``model``'s position table to ``new_max`` tokens in place (tiling), update its config and the
    tokenizer's ``model_max_length``. Returns {"from": old tokens, "to": new tokens}."""
    config = model.config
    check_extension(config, new_max)
    old = max_tokens(config)
    if new_max == old:  # nothing to grow; the tokenizer keeps its own limit
        return {"from": old, "to": new_max}
    family, offset = _family(config), position_offset(config)
    base = model.base_model
    if is_rotary(config):  # nothing to tile: rotary positions are computed for any index
        config.max_position_embeddings = new_max
    elif family == "gpt2":
        _grow_embedding(base.wpe, new_max, 0)
        config.n_positions = new_max
    elif family == "opt":  # the table's first ``offset`` (2) rows are not token positions
        table = base.decoder.embed_positions
        _grow_embedding(table, new_max + table.offset, table.offset)
        config.max_position_embeddings = new_max
    else:
        embeddings = base.embeddings
        _grow_embedding(embeddings.position_embeddings, new_max + offset, offset)
        _grow_buffers(embeddings, new_max + offset)
        config.max_position_embeddings = new_max + offset
    if tokenizer is not None:
        tokenizer.model_max_length = new_max
    return {"from": old, "to": new_max}
