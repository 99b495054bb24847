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
  Some RoPE variants derive their parameters from ``max_position_embeddings`` (transformers'
  ``modeling_rope_utils``): longrope's and yarn's ``factor`` defaults to max_position_embeddings /
  original_max_position_embeddings (it sets longrope's attention factor, which scales cos and sin at every length),
  so it is written out first with the old limit's value; dynamic NTK scaling rescales the frequencies beyond
  max_position_embeddings, which nothing can pin, so raising its limit is refused. A check compares transformers'
  RoPE computation for the old and the new config at both limits and refuses any variant it would change.

``max_position_embeddings`` below always counts *tokens* (what the tokenizer's ``model_max_length`` says).
"""

from __future__ import annotations

import copy

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
    if is_rotary(config) and new_max != current and (kind := _rope_change(config, _pinned_rope(config, new_max))):
        raise ConversionError(
            f"--max-position-embeddings {new_max}: this model's RoPE ({kind!r} in rope_parameters) computes its "
            f"rotation frequencies from max_position_embeddings ({current}), so raising it would change the model's "
            "outputs. Rotary positions need no table to grow: leave --max-position-embeddings out (the model takes "
            f"inputs longer than {current} tokens as it is; raise the tokenizer's model_max_length if it truncates)."
        )


def _rope_sets(config) -> list[tuple[str | None, dict]]:
    """[(layer type or None, RoPE parameter dict)] of a rotary config: its one ``rope_parameters`` dict, or one per
    layer type when they are nested by layer type."""
    params = getattr(config, "rope_parameters", None)
    if not isinstance(params, dict):
        return []
    if "rope_type" in params or "rope_theta" in params:
        return [(None, params)]
    return [(name, p) for name, p in params.items() if isinstance(p, dict)]


def _pinned_rope(config, new_max: int):
    """A copy of a rotary config with ``max_position_embeddings = new_max`` and the RoPE parameters that transformers
    derives from the old limit written out: longrope's and yarn's unset ``factor`` (max_position_embeddings /
    original_max_position_embeddings, which sets their attention factor)."""
    new = copy.deepcopy(config)
    for _, params in _rope_sets(new):
        original = params.get("original_max_position_embeddings")
        if params.get("rope_type") in ("longrope", "yarn") and params.get("factor") is None and original:
            params["factor"] = config.max_position_embeddings / original
    new.max_position_embeddings = new_max
    return new


def _rope_change(old, new) -> str | None:
    """The first RoPE type of ``old`` whose frequencies or attention factor transformers computes differently for
    ``new`` (at initialisation and at lengths around both limits), else None. The default RoPE does not read the
    limit (and has no entry in ``ROPE_INIT_FUNCTIONS``)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    lengths = (None, old.max_position_embeddings, old.max_position_embeddings + 1, new.max_position_embeddings)
    for layer_type, params in _rope_sets(old):
        kind = params.get("rope_type", "default")
        compute = ROPE_INIT_FUNCTIONS.get(kind)
        if compute is None:
            continue
        extra = {} if layer_type is None else {"layer_type": layer_type}
        for seq_len in lengths:
            (f_old, a_old), (f_new, a_new) = (compute(c, "cpu", seq_len=seq_len, **extra) for c in (old, new))
            if a_old != a_new or not torch.equal(f_old, f_new):
                return kind
    return None


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
        config.rope_parameters = _pinned_rope(config, new_max).rope_parameters  # (check_extension: the same RoPE)
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
