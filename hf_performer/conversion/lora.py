"""LoRA attention transfer (``--train lora``): train low-rank adapters on the attention projections instead of
the projections themselves, then merge them, as LoLCATs (Zhang et al. 2024) does for models too large to
calibrate in full. Only the adapters get gradients and optimizer state (2·r·(d_in + d_out) numbers per
projection instead of d_in·d_out), the loss is unchanged (attention transfer), and the merged model is a plain
Performer checkpoint: same parameter names and shapes as ``--train attention`` would give.

The adapters sit on the projections ``--train attention`` trains (query/key/value and the attention output;
GPT-2: ``attn.c_attn`` and ``attn.c_proj``; DistilBERT: ``q_lin``/``k_lin``/``v_lin``/``out_lin``), through
PEFT's ``LoraModel`` (in place, no wrapper: module names, hooks and the calibration loop are unchanged).
Defaults as in LoLCATs: rank 8, alpha 16 (scale 2), no dropout.
"""

from __future__ import annotations

import importlib.util

from torch import nn

from hf_performer.integration.registry import family_traits

from .errors import ConversionError

ADAPTER = "calibration"
DEFAULT_RANK = 8

# model_type (without "performer_") -> module names (re.fullmatch, PEFT's rule for a string target_modules)
TARGETS = {
    "bert": r".*attention\.(self\.(query|key|value)|output\.dense)",
    "gpt2": r".*\battn\.(c_attn|c_proj)",
    "distilbert": r".*attention\.(q_lin|k_lin|v_lin|out_lin)",
}
TARGETS["roberta"] = TARGETS["bert"]


def require_peft() -> None:
    """Raise ConversionError (naming the fix) when peft is not installed."""
    if importlib.util.find_spec("peft") is None:
        raise ConversionError("train='lora' trains LoRA adapters through PEFT, which is not installed: "
                              "`pip install peft` (or choose --train attention / qk / all).")


def add_lora(model: nn.Module, rank: int, alpha: float):
    """Put LoRA adapters (rank ``rank``, scale alpha/rank, B = 0 so the model is unchanged) on the attention
    projections of the converted ``model``, in place, and freeze every other parameter.

    Returns the PEFT tuner to pass to ``merge_lora``. Raises ConversionError without peft, and for a model
    whose type has no attention projections listed here."""
    require_peft()
    from peft import LoraConfig, LoraModel

    family = model.config.model_type.removeprefix("performer_")
    try:
        targets = TARGETS.get(family) or family_traits(family).lora  # a row of the generic family table
    except KeyError:
        targets = None
    if targets is None:
        raise ConversionError(f"train='lora' does not know the attention projections of model_type {family!r}.")
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=targets,
                        fan_in_fan_out=family == "gpt2", bias="none")  # GPT-2's Conv1D stores W transposed
    return LoraModel(model, config, ADAPTER)


def merge_lora(tuner) -> nn.Module:
    """Merge the adapters into the projection weights and remove them (in place); returns the plain model."""
    return tuner.merge_and_unload()
