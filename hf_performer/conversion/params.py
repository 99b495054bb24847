"""Which parameters calibration trains (``--train``):

* ``qk``: the query and key projections (GPT-2's fused ``c_attn``: only its query/key columns receive
  gradient; a hook zeroes the value columns' gradient; Phi-3's fused ``qkv_proj`` is trained whole);
* ``attention``: query, key, value and the attention output projection (the default);
* ``all``: every parameter;
* ``lora``: LoRA adapters on the ``attention`` projections, merged after training (``lora.py``; the
  calibration loop adds them, ``select_trainable`` handles the other three).

The random features are buffers, never trained; calibration never redraws them.
"""

from __future__ import annotations

import re

from torch import nn

from hf_performer.integration.registry import family_traits

TRAIN_CHOICES = ("qk", "attention", "all", "lora")
PLAIN_CHOICES = ("qk", "attention", "all")  # the choices select_trainable handles

# model_type (without "performer_") -> {choice: regex on parameter names}
_PATTERNS = {
    "bert": {
        "qk": r"attention\.self\.(query|key)\.",
        "attention": r"attention\.(self\.(query|key|value)|output\.dense)\.",
    },
    "gpt2": {"qk": r"\.attn\.c_attn\.", "attention": r"\.attn\.(c_attn|c_proj)\."},
    "distilbert": {"qk": r"attention\.(q_lin|k_lin)\.", "attention": r"attention\.(q_lin|k_lin|v_lin|out_lin)\."},
}
_PATTERNS["roberta"] = _PATTERNS["bert"]


def _zero_value_columns(param, hidden: int):
    """GPT-2 Conv1D c_attn: weight [C, 3C], bias [3C]; columns 2C: are the values."""

    def hook(grad):
        grad = grad.clone()
        grad[..., 2 * hidden :] = 0
        return grad

    return param.register_hook(hook)


def select_trainable(model: nn.Module, choice: str) -> tuple[list[str], list]:
    """Set requires_grad for ``choice`` (everything else frozen). Returns the trainable parameter names and
    the gradient-hook handles to ``remove()`` after training (GPT-2 ``qk`` only)."""
    if choice not in PLAIN_CHOICES:
        raise ValueError(f"train={choice!r}: expected one of {', '.join(PLAIN_CHOICES)} (lora: see lora.add_lora).")
    family = model.config.model_type.removeprefix("performer_")
    patterns = _PATTERNS.get(family)
    if patterns is None:  # a row of the generic family table
        traits = family_traits(family)
        patterns = {"qk": traits.qk, "attention": traits.projections}
    names, handles = [], []
    for name, p in model.named_parameters():
        if choice == "all":
            keep = True
        else:
            keep = re.search(patterns[choice], "." + name) is not None
        p.requires_grad_(keep)
        if keep:
            names.append(name)
            if family == "gpt2" and choice == "qk":
                handles.append(_zero_value_columns(p, model.config.n_embd))
    if not names:
        raise ValueError(f"train={choice!r} selected no parameters of {type(model).__name__}.")
    return names, handles
