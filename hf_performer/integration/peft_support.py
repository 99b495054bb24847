"""PEFT: a converted model gets its stock model type's default target modules.

PEFT picks the modules an adapter config without ``target_modules`` adapts from dicts keyed by
``config.model_type`` (``peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING``:
``"bert": ["query", "value"]``, ``"gpt2": ["c_attn"]``, ...; one dict per PEFT method). A converted model's
type is ``performer_bert`` etc. and its modules keep the stock names, so each ``performer_<type>`` entry is
a copy of the stock ``<type>`` entry (the way PEFT's documentation adds a model type: an entry in these
dicts). Stock types PEFT has no default for (DistilBERT for LoRA) stay without one: PEFT then asks for
``target_modules``, exactly as for the stock model.

``import hf_performer`` registers the entries when peft is already imported, or else right after peft's
own import finishes (a one-shot import hook), so neither import order nor importing peft for nothing
matters.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable

PEFT = "peft"


def register_peft_mappings() -> list[str]:
    """Add ``performer_<type>`` to every PEFT ``TRANSFORMERS_MODELS_TO_*`` dict that has ``<type>`` (idempotent).

    Returns the names of the dicts that gained or already had an entry. Raises ImportError without peft."""
    from peft.utils import constants

    from .registry import FAMILIES

    touched = []
    for name, mapping in vars(constants).items():
        if not (name.startswith("TRANSFORMERS_MODELS_TO_") and isinstance(mapping, dict)):
            continue
        for stock_type, (config_cls, _) in FAMILIES.items():
            if stock_type in mapping:
                mapping.setdefault(config_cls.model_type, mapping[stock_type])
                touched.append(name)
    return sorted(set(touched))


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs ``callback`` once, right after the top-level package ``name`` has been imported."""

    def __init__(self, name: str, callback: Callable[[], object]):
        self.name, self.callback = name, callback

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        if self in sys.meta_path:
            sys.meta_path.remove(self)  # one shot; the lookup below must not find this finder again
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module, callback = spec.loader.exec_module, self.callback

        def exec_then_register(module):
            exec_module(module)
            try:
                callback()
            except Exception as e:  # noqa: BLE001 - never break the user's `import peft`
                warnings.warn(f"hf_performer could not register its model types with {fullname}: {e!r}",
                              stacklevel=2)

        spec.loader.exec_module = exec_then_register  # this loader instance loads only this module
        return spec


def register_peft_hook() -> None:
    """Register the PEFT entries now if peft is imported, else as soon as it is (nothing when peft is absent)."""
    if PEFT in sys.modules:
        register_peft_mappings()
    elif importlib.util.find_spec(PEFT) is not None and not any(
        isinstance(f, _AfterImport) and f.name == PEFT for f in sys.meta_path
    ):
        sys.meta_path.insert(0, _AfterImport(PEFT, register_peft_mappings))
